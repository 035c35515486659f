# billing -- PGXS build.  See README.md for the two entry points:
#   make demo    build, install, start a throwaway cluster + Redis, run a workload
#   make check   build, install, run every test, print "N passed, N failed"
#
# On a machine without the Debian packages (postgresql-15,
# postgresql-server-dev-15, libhiredis-dev, redis-server) the PGXS include is
# not available yet; the bootstrap branch below installs them first
# (test/deps.sh) and re-runs make.

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGXS := $(wildcard $(shell $(PG_CONFIG) --pgxs 2>/dev/null))

MODULE_big = billing
OBJS = \
	src/billing.o \
	src/input.o \
	src/spi.o \
	src/ledger.o \
	src/account.o \
	src/direct.o \
	src/verify.o \
	src/snapshot.o \
	src/holds.o \
	src/jobs.o \
	src/append_only.o \
	src/guard.o \
	src/sync.o \
	src/worker.o

EXTENSION = billing
DATA = $(wildcard billing--*.sql)
PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lhiredis

# pg_regress files (sql/*.sql, expected/*.out); test/run.sh runs them against
# a cluster it starts itself.
REGRESS = $(sort $(patsubst sql/%.sql,%,$(wildcard sql/*.sql)))

.PHONY: check demo bench deps

# The three entry points only run scripts (which call "make" themselves), so
# they do not include PGXS: PGXS has its own "check" target, and redefining
# it would make every build print override warnings.
ifneq ($(filter check demo bench deps,$(MAKECMDGOALS)),)
check:
	+@bash test/run.sh

demo:
	+@bash demo/run.sh

bench:
	+@bash bench/run.sh

deps:
	@bash test/deps.sh
else ifeq ($(PGXS),)
# no PGXS yet: install the Debian packages, then build as asked
all install installcheck:
	bash test/deps.sh
	$(MAKE) $@
else
include $(PGXS)
# PGXS tracks no header dependencies: a changed struct in a header must
# rebuild every object that uses it, or objects disagree on its layout.
$(OBJS): $(wildcard src/*.h)
endif

# the Redis Lua scripts, read by the worker (billing.lua_dir overrides)
ifneq ($(PGXS),)
install: install-lua
.PHONY: install-lua
install-lua:
	$(MKDIR_P) '$(DESTDIR)$(datadir)/extension/billing'
	$(INSTALL_DATA) $(wildcard lua/*.lua) '$(DESTDIR)$(datadir)/extension/billing/'
endif

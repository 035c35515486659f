# billing -- PGXS build of the billing extension.
#
#   make, make install   build and install into the PostgreSQL that PG_CONFIG names
#                        (default: the pg_config on PATH); never installs packages
#   make installcheck    the regression and isolation suites against a running
#                        server (PGHOST, PGPORT, ...), default settings, the
#                        extension installed (make install); TAP_TESTS=1 adds
#                        the TAP tests (below)
#   make check           every test (test/run.sh): installs missing Debian
#                        packages when run as root, builds, installs, runs the
#                        regression and isolation suites on a throwaway
#                        instance and the TAP tests (test/t/*.pl); ends with
#                        "N passed, N failed"
#   make matrix          make check inside cached Debian chroots with
#                        PostgreSQL 17 and 18 (test/matrix.sh)
#   make demo            a throwaway cluster + Redis and a realistic workload
#   make bench           the benchmark harness (bench/run.sh)
#   make deps            install the Debian packages the targets above need
#   make dist            billing-<version>.zip for PGXN, from git HEAD

PG_CONFIG ?= pg_config

EXTENSION = billing
EXTVERSION := $(shell sed -n "s/^default_version = '\([^']*\)'.*/\1/p" billing.control)

MODULE_big = billing
OBJS = \
	src/billing.o \
	src/input.o \
	src/spi.o \
	src/ledger.o \
	src/account.o \
	src/grants.o \
	src/credits.o \
	src/direct.o \
	src/citus.o \
	src/verify.o \
	src/snapshot.o \
	src/holds.o \
	src/jobs.o \
	src/append_only.o \
	src/guard.o \
	src/sync.o \
	src/resp.o \
	src/redis.o \
	src/mirror.o \
	src/worker.o \
	src/events.o \
	src/metrics.o \
	src/outbox.o \
	src/logwindow.o \
	src/engine.o \
	src/engine_worker.o

# The install script of the current version is built from schema/*.sql (one
# file per area, concatenated in name order); released versions keep their
# frozen install script in releases/ and every upgrade path its script in
# updates/.  Released files never change (test/t/010_releases.pl).
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA = $(filter-out releases/$(EXTENSION)--$(EXTVERSION).sql,$(wildcard releases/$(EXTENSION)--*.sql)) \
	$(wildcard updates/$(EXTENSION)--*--*.sql)
EXTRA_CLEAN = $(EXTENSION)--$(EXTVERSION).sql tmp_check_iso output_iso results regression.diffs regression.out

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lhiredis

# Redis over TLS needs hiredis 1.0 or later with hiredis_ssl (Debian 13's
# libhiredis-dev; Debian 12's hiredis 0.14 has none) and OpenSSL's headers.
# Detected here (a test program must compile and link against hiredis_ssl);
# BILLING_TLS=no builds without, BILLING_TLS=yes fails when it is missing.
# Without it the worker refuses billing.redis_tls = on (it never falls back
# to plain text).  Every build says which it is, in one line.
BILLING_TLS ?= auto
ifneq ($(BILLING_TLS),no)
BILLING_TLS_HASH := \#
BILLING_TLS_FOUND := $(shell printf '$(BILLING_TLS_HASH)include <hiredis/hiredis.h>\n$(BILLING_TLS_HASH)include <hiredis/hiredis_ssl.h>\n$(BILLING_TLS_HASH)include <openssl/ssl.h>\n$(BILLING_TLS_HASH)if HIREDIS_MAJOR < 1\n$(BILLING_TLS_HASH)error old\n$(BILLING_TLS_HASH)endif\nint main(void) { return redisInitOpenSSL(); }\n' | $(CC) -x c - -o /dev/null -lhiredis_ssl -lhiredis -lssl -lcrypto >/dev/null 2>&1 && echo yes)
endif
ifeq ($(BILLING_TLS_FOUND),yes)
PG_CPPFLAGS += -DBILLING_REDIS_TLS
SHLIB_LINK += -lhiredis_ssl -lssl -lcrypto
BILLING_TLS_SAYS = Redis TLS: yes (hiredis >= 1.0 with hiredis_ssl)
else ifeq ($(BILLING_TLS),no)
BILLING_TLS_SAYS = Redis TLS: off (BILLING_TLS=no; billing.redis_tls = on will be refused)
else
BILLING_TLS_SAYS = Redis TLS: unavailable (needs hiredis >= 1.0 with hiredis_ssl and OpenSSL headers, e.g. Debian 13's libhiredis-dev and libssl-dev; billing.redis_tls = on will be refused)
endif
ifeq ($(BILLING_TLS),yes)
ifneq ($(BILLING_TLS_FOUND),yes)
$(error BILLING_TLS=yes but hiredis >= 1.0 with hiredis_ssl (and OpenSSL headers) was not found)
endif
endif

# Regression tests (sql/, expected/) and isolation specs (test/isolation/).
# make installcheck runs those that need nothing but default settings (not
# prepared transactions, nor the preload: the metrics counters of 190_events
# and the engine of 200_engine live in its shared memory);
# make check runs them all on an instance configured by test/check.conf.
REGRESS_CHECK_ONLY = 170_two_phase 190_events 200_engine
REGRESS = $(filter-out $(REGRESS_CHECK_ONLY),$(sort $(patsubst sql/%.sql,%,$(wildcard sql/*.sql))))
REGRESS_OPTS = --encoding=UTF8 --no-locale
# the charge engine needs billing in shared_preload_libraries
ISOLATION_CHECK_ONLY = $(patsubst test/isolation/specs/%.spec,%,$(wildcard test/isolation/specs/engine_*.spec))
ISOLATION = $(filter-out $(ISOLATION_CHECK_ONLY),$(sort $(patsubst test/isolation/specs/%.spec,%,$(wildcard test/isolation/specs/*.spec))))
ISOLATION_OPTS = --inputdir=test/isolation --encoding=UTF8 --no-locale

# make installcheck TAP_TESTS=1 runs the TAP tests (test/t/*.pl) too, by
# PGXS's prove_installcheck: their PostgreSQL::Test::Cluster nodes run the
# installed PostgreSQL and billing (not the running server), as a non-root
# user; they need redis-server and libipc-run-perl (make deps).  t/080_citus
# skips unless Citus is installed (make check builds it).
PROVE_TESTS ?= $(sort $(wildcard test/t/*.pl))

.PHONY: check matrix demo bench deps dist

# The entry points that run scripts do not include PGXS: PGXS defines its
# own "check" (which refuses to run), and redefining it would make every
# build print override warnings.  The scripts call make for the build.
ifneq ($(filter check matrix demo bench deps dist,$(MAKECMDGOALS)),)
check:
	+@PG_CONFIG='$(PG_CONFIG)' bash test/run.sh

matrix:
	+@bash test/matrix.sh

demo:
	+@PG_CONFIG='$(PG_CONFIG)' bash demo/run.sh

bench:
	+@PG_CONFIG='$(PG_CONFIG)' bash bench/run.sh

deps:
	@PG_CONFIG='$(PG_CONFIG)' bash test/deps.sh

dist:
	git archive --format zip --prefix=$(EXTENSION)-$(EXTVERSION)/ -o $(EXTENSION)-$(EXTVERSION).zip HEAD
	@echo "wrote $(EXTENSION)-$(EXTVERSION).zip"
else
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifeq ($(PGXS),)
$(error pg_config not found or not working (PG_CONFIG=$(PG_CONFIG)): install the PostgreSQL server development package (Debian: postgresql-server-dev-15, or run "make deps" as root), or pass PG_CONFIG=/path/to/pg_config)
endif
include $(PGXS)

PG_PROVE_FLAGS += -I $(srcdir)/test/perl
installcheck: export BILLING_INSTALLCHECK = 1

$(EXTENSION)--$(EXTVERSION).sql: $(sort $(wildcard schema/*.sql))
	cat $^ > $@

# PGXS tracks no header dependencies: a changed struct in a header must
# rebuild every object that uses it, or objects disagree on its layout.
$(OBJS): $(wildcard src/*.h)

# say once per build whether this build can talk TLS to Redis (order-only:
# it never makes the library out of date)
$(shlib): | billing-tls-note
.PHONY: billing-tls-note
billing-tls-note:
	@echo "billing: $(BILLING_TLS_SAYS)"

# the Redis Lua scripts, read by the worker (billing.lua_dir overrides)
install: install-lua
.PHONY: install-lua
install-lua:
	$(MKDIR_P) '$(DESTDIR)$(datadir)/extension/billing'
	$(INSTALL_DATA) $(wildcard lua/*.lua) '$(DESTDIR)$(datadir)/extension/billing/'
endif

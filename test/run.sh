#!/usr/bin/env bash
# test/run.sh -- every test of the billing extension; `make check` runs it.
#
#   1. as root: install the Debian packages that are missing (test/deps.sh)
#   2. build and install (make, make install) for PG_CONFIG
#   3. pg_regress: every sql/*.sql on a throwaway instance (--temp-instance,
#      configured by test/check.conf: billing preloaded, prepared transactions)
#   4. pg_isolation_regress: every test/isolation/specs/*.spec, likewise
#   5. the TAP tests test/t/*.pl (PostgreSQL::Test::Cluster + test/perl/
#      BillingTest.pm): each starts its own nodes and Redis servers; before
#      t/080_citus, Citus is built (test/citus/build.sh, cached outside the
#      work tree) and installed into the PostgreSQL under test
#   6. no server log of steps 3-4 shows a crashed backend (the TAP tests check
#      their own nodes, allowing only what they killed on purpose)
# and prints "N passed, N failed" last: one per regression test, isolation
# spec and TAP file.  Exit status 1 on any failure.
#
# PostgreSQL refuses to run as root: as root, steps 3-5 run as the `postgres`
# OS user (the one the Debian package creates), in BILLING_TMP.
#
# Knobs: PG_CONFIG (default: pg_config on PATH; after step 1 the one of the
# newest installed PostgreSQL if none is on PATH), BILLING_TMP (default
# <repo>/tmp_check), BILLING_TAP_TIMEOUT (seconds per TAP file, default 1200),
# BILLING_TESTS (a space-separated subset of TAP files to run, e.g.
# "001_no_preload"), BILLING_SKIP (any of: regress isolation tap),
# PROVE_FLAGS (e.g. -v), BILLING_PORT_BASE (below), BILLING_CITUS_SRC (the
# Citus source for t/080_citus, default <repo>/../shared/citus; absent: that
# test skips, or fails when BILLING_CITUS_REQUIRED=1, the default in CI).
#
# TCP ports: by default the TAP framework picks free ports in 10200-32767,
# reserved in /tmp/billing-test-ports (PG_TEST_PORT_DIR) for every run on
# the machine.  With BILLING_PORT_BASE=B (test/matrix.sh sets it per
# chroot, whose /tmp is its own) they come from B+100 .. B+999 instead
# (test/perl/BillingTest.pm), so that a run in a chroot never shares a port
# with a native run.
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cd "$repo"
export LC_ALL=C.UTF-8 2>/dev/null || export LC_ALL=C

passed=0 failed=0 failures=() finished=0
fail() { failed=$((failed + 1)); failures+=("$1"); }

on_exit() {
	local rc=$?
	if ((!finished)); then
		echo "run.sh: aborted (exit $rc) before the suite finished" >&2
		fail setup
		echo "$passed passed, $failed failed"
		exit 1
	fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# 1. packages (root only; otherwise deps.sh only says what is missing)
if ((EUID == 0)); then
	bash "$here/deps.sh"
fi
PG_CONFIG=${PG_CONFIG:-pg_config}
if ! command -v "$PG_CONFIG" >/dev/null 2>&1; then
	# Debian puts pg_config in /usr/bin only with postgresql-common's wrapper;
	# take the newest server-dev installation
	newest=$(ls -d /usr/lib/postgresql/*/bin/pg_config 2>/dev/null | sort -V | tail -n 1 || true)
	[[ -n $newest ]] || { echo "run.sh: no pg_config (set PG_CONFIG, or run as root to install the packages)" >&2; exit 1; }
	PG_CONFIG=$newest
fi
PG_CONFIG=$(command -v "$PG_CONFIG")
export PG_CONFIG
bindir=$("$PG_CONFIG" --bindir)
pgxs_src=$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")") # .../lib/pgxs/src
echo "== PostgreSQL $("$PG_CONFIG" --version | sed 's/^PostgreSQL //') ($PG_CONFIG)"

# 2. build and install
make -s PG_CONFIG="$PG_CONFIG"
make -s install PG_CONFIG="$PG_CONFIG" >/dev/null

# Where the tests write.  As root the servers run as postgres, which must be
# able to write there and to read the work tree; if it cannot read the tree
# (e.g. under /root), the tests run from a copy of it.
tmp=$(realpath -m "${BILLING_TMP:-$repo/tmp_check}")
rm -rf "$tmp"
mkdir -p "$tmp"
src=$repo
as_tester() { "$@"; }
if ((EUID == 0)); then
	chown postgres:postgres "$tmp"
	as_tester() { (cd / && runuser -u postgres -- "$@"); }
	if ! as_tester test -w "$tmp" -a -x "$tmp" 2>/dev/null; then
		tmp=/tmp/billing-check-$(printf %s "$repo" | md5sum | cut -c1-8)
		rm -rf "$tmp"
		mkdir -p "$tmp"
		chown postgres:postgres "$tmp"
	fi
	if ! as_tester test -r "$repo/test/run.sh" 2>/dev/null; then
		src=$tmp/src
		mkdir -p "$src"
		git -C "$repo" ls-files -z --cached --others --exclude-standard |
			(cd "$repo" && xargs -0 cp --parents -t "$src")
		chown -R postgres:postgres "$src"
	fi
fi
skip=" ${BILLING_SKIP:-} "
# one directory of port reservations for every run on this machine
# (PostgreSQL::Test::Cluster's get_free_port; BillingTest's Redis ports too)
ports=${PG_TEST_PORT_DIR:-/tmp/billing-test-ports}
mkdir -p "$ports"
chmod 1777 "$ports" 2>/dev/null || true
if [[ -n ${BILLING_PORT_BASE:-} ]]; then
	if ! [[ $BILLING_PORT_BASE =~ ^[0-9]+$ ]] || ((BILLING_PORT_BASE < 1024 || BILLING_PORT_BASE > 64535)); then
		echo "run.sh: BILLING_PORT_BASE must be a port number from 1024 to 64535" >&2
		exit 1
	fi
	export BILLING_PORT_BASE
fi

# run_regress LABEL PROGRAM OUTDIR ARGS... -- pg_regress or
# pg_isolation_regress on a temporary instance; counts its per-test lines.
run_regress() {
	local label=$1 prog=$2 out=$3 rc=0 counts p f
	shift 3
	echo "== $label"
	as_tester mkdir -p "$out"
	as_tester "$prog" --temp-instance="$out/instance" --temp-config="$src/test/check.conf" \
		--bindir="$bindir" --outputdir="$out" --encoding=UTF8 --no-locale "$@" \
		</dev/null 2>&1 | tee "$tmp/$label.log" || rc=$?
	# PG15 lines: "test NAME ... ok  12 ms", "     NAME ... FAILED  12 ms";
	# PG16+: TAP lines "ok 1 - NAME  12 ms", "not ok 1 - NAME".
	counts=$(awk '
		/^(test +| +)[^ ]+ +\.\.\. / {
			if (/\.\.\. +FAILED/ && !/\(ignored\)/) bad++; else ok++
			next
		}
		/^ok [0-9]+ /     { ok++ }
		/^not ok [0-9]+ / { if (/# \(ignored\)/) ok++; else bad++ }
		END { print ok + 0, bad + 0 }' "$tmp/$label.log")
	read -r p f <<<"$counts"
	passed=$((passed + p))
	((f == 0)) || failures+=("$label: $f test(s)")
	failed=$((failed + f))
	if ((rc != 0 && f == 0)); then
		echo "$label exited with status $rc without reporting a failed test"
		fail "$label (exit $rc)"
	fi
	if ((rc != 0 || f != 0)) && [[ -f $out/regression.diffs ]]; then
		echo "== $label: first 300 lines of $out/regression.diffs"
		head -n 300 "$out/regression.diffs"
	fi
}

names() { # names DIR EXT -- sorted basenames of DIR/*.EXT
	find "$1" -maxdepth 1 -type f -name "*.$2" -printf '%f\n' | sed "s/\.$2\$//" | LC_ALL=C sort
}

# 3. regression tests, all of them (make installcheck skips those that need
# test/check.conf)
if [[ $skip != *" regress "* ]]; then
	mapfile -t tests < <(names sql sql)
	run_regress regress "$pgxs_src/test/regress/pg_regress" "$tmp/regress" \
		--inputdir="$src" --dbname=contrib_regression "${tests[@]}"
fi

# 4. isolation specs
if [[ $skip != *" isolation "* ]]; then
	mapfile -t tests < <(names test/isolation/specs spec)
	run_regress isolation "$pgxs_src/test/isolation/pg_isolation_regress" "$tmp/isolation" \
		--inputdir="$src/test/isolation" --dbname=isolation_regression "${tests[@]}"
fi

# 5. TAP tests, one prove run per file (a time limit each, and a verdict per file)
if [[ $skip != *" tap "* ]]; then
	mapfile -t tests < <(names test/t pl)
	if [[ -n ${BILLING_TESTS:-} ]]; then
		read -r -a tests <<<"$BILLING_TESTS"
	fi
	# Citus for t/080_citus (as the invoking user: as root the build script
	# installs its Debian build dependencies); the test skips when the
	# source is absent or does not support this server version (exit 3),
	# and fails when the build failed
	export BILLING_CITUS_SRC=${BILLING_CITUS_SRC:-$(realpath -m "$repo/../shared/citus")}
	# in CI (CI=true) the source must be there: the test fails instead of
	# skipping; a server version the Citus source does not support skips
	# everywhere (PostgreSQL 18 with Citus 13.2)
	if [[ -z ${BILLING_CITUS_REQUIRED:-} ]]; then
		BILLING_CITUS_REQUIRED=0
		[[ ${CI:-} == true ]] && BILLING_CITUS_REQUIRED=1
	fi
	export BILLING_CITUS_REQUIRED
	BILLING_CITUS_BUILD=
	if [[ " ${tests[*]} " == *" 080_citus "* || " ${tests[*]} " == *" 080_citus.pl "* ]]; then
		echo "== Citus for t/080_citus (test/citus/build.sh)"
		crc=0
		cerr=$(bash "$here/citus/build.sh" 2>&1 >/dev/null) || crc=$?
		case $crc in
		0) BILLING_CITUS_BUILD=ok ;;
		2) BILLING_CITUS_BUILD="skip: $(tail -n 1 <<<"$cerr" | sed "s/^skipped: //")" ;;
		3) BILLING_CITUS_BUILD=$(tail -n 1 <<<"$cerr") ;; # unsupported: ...
		*) BILLING_CITUS_BUILD="fail: test/citus/build.sh exited $crc: $(tail -n 30 <<<"$cerr")" ;;
		esac
		printf '%s\n' "$cerr" | tail -n 3
	fi
	as_tester mkdir -p "$tmp/tap"
	for name in "${tests[@]}"; do
		name=${name%.pl}
		log=$tmp/tap/$name.out
		started=$SECONDS
		rc=0
		as_tester mkdir -p "$tmp/tap/$name"
		# TESTDIR for PostgreSQL 15, TESTDATADIR and TESTLOGDIR from 16 on
		as_tester env -C "$src" TESTDIR="$tmp/tap/$name" PATH="$bindir:$PATH" \
			TESTDATADIR="$tmp/tap/$name/tmp_check" TESTLOGDIR="$tmp/tap/$name/tmp_check/log" \
			PG_REGRESS="$pgxs_src/test/regress/pg_regress" PG_CONFIG="$PG_CONFIG" \
			PG_TEST_PORT_DIR="$ports" BILLING_PORT_BASE="${BILLING_PORT_BASE:-}" \
			BILLING_REPO="$src" CI="${CI:-}" \
			BILLING_CITUS_SRC="$BILLING_CITUS_SRC" BILLING_CITUS_BUILD="$BILLING_CITUS_BUILD" \
			timeout -k 10 "${BILLING_TAP_TIMEOUT:-1200}" \
			prove -I "$pgxs_src/test/perl" -I "$src/test/perl" ${PROVE_FLAGS:-} "test/t/$name.pl" \
			>"$log" 2>&1 </dev/null || rc=$?
		if ((rc == 0)); then
			# a skip_all passes (prove: "... skipped: <why>"): say so
			skipped=$(sed -n 's/^.* \.\. skipped: //p' "$log" | head -n 1)
			echo "t/$name ... ok ($((SECONDS - started)) s${skipped:+; skipped: $skipped})"
			passed=$((passed + 1))
		else
			why="exit $rc"
			((rc == 124)) && why="timed out"
			echo "t/$name ... FAILED ($why, $((SECONDS - started)) s); last 80 lines of $log:"
			tail -n 80 "$log"
			echo "   (node logs: $tmp/tap/$name/tmp_check/log/)"
			# the failed checks' names go into the summary too, which is what
			# a CI log's tail shows (the first 3 named ones, each cut to 160
			# characters; one awk: no pipe that a closed reader could break)
			checks=$(awk -v q="'" '
				n < 3 && sub("^#[ \t]*Failed test " q, "") {
					sub(q "$", ""); names = names (n++ ? "; " : "") substr($0, 1, 160)
				}
				END { print names }' "$log") || checks=
			fail "t/$name${checks:+ (failed: $checks)}"
		fi
	done
fi

# 6. did a backend of the regression or isolation instances crash?
for log in "$tmp"/regress/log/postmaster.log "$tmp"/isolation/log/postmaster.log; do
	[[ -f $log ]] || continue
	if crashes=$(grep -E 'terminated by signal|server process .* was terminated|PANIC:' "$log"); then
		echo "server-crash-check ... FAILED; from $log:"
		printf '%s\n' "$crashes"
		fail "server-crash-check ($log)"
	fi
done

if ((${#failures[@]})); then
	printf 'FAILED: %s\n' "${failures[@]}"
fi
finished=1
echo "$passed passed, $failed failed"
((failed == 0))

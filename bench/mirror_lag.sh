#!/usr/bin/env bash
# One tenant's commit -> Redis lag while a tenant with many API keys is
# charged (issue 12, M6): bench/mirror_lag.pl on a throwaway node and
# redis-server of its own.  Not part of make bench (about 1 minute plus the
# setup of the keys).
#
#   PG_CONFIG=... bash bench/mirror_lag.sh      # LAG_KEYS=20000 LAG_RATE=100 LAG_SAMPLES=200
#
# Installs this tree into PG_CONFIG's installation first (make install).
# As root, the servers run as the postgres OS user.  Prints a "# keys ..." line with the result.
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cd "$repo"
PG_CONFIG=$(command -v "${PG_CONFIG:-pg_config}")
bindir=$("$PG_CONFIG" --bindir)
pgxs_src=$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")
make -s PG_CONFIG="$PG_CONFIG"
make -s install PG_CONFIG="$PG_CONFIG" >/dev/null

tmp=$repo/tmp_bench/lag
rm -rf "$tmp"
mkdir -p "$tmp"
as_tester() { "$@"; }
if ((EUID == 0)); then
	chown postgres:postgres "$tmp"
	as_tester() { (cd / && runuser -u postgres -- "$@"); }
fi
ports=${PG_TEST_PORT_DIR:-/tmp/billing-test-ports}
mkdir -p "$ports"
chmod 1777 "$ports" 2>/dev/null || true
as_tester env -C "$repo" TESTDIR="$tmp" PATH="$bindir:$PATH" \
	PG_REGRESS="$pgxs_src/test/regress/pg_regress" PG_CONFIG="$PG_CONFIG" \
	PG_TEST_PORT_DIR="$ports" BILLING_REPO="$repo" \
	LAG_KEYS="${LAG_KEYS:-20000}" LAG_RATE="${LAG_RATE:-100}" LAG_SAMPLES="${LAG_SAMPLES:-200}" \
	perl -I "$pgxs_src/test/perl" -I "$repo/test/perl" bench/mirror_lag.pl 2>&1 | tee "$tmp/mirror_lag.out" |
	grep -E '^(not ok|# )' || true
grep -q '^# keys' "$tmp/mirror_lag.out"

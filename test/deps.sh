#!/usr/bin/env bash
# test/deps.sh -- install the Debian packages that building and testing
# billing needs, when they are missing (`make deps`; `make check` and
# `make demo` call it as root).  Idempotent; prints nothing when everything
# is present.  Not as root it lists what is missing and exits 1.  A plain
# `make` / `make install` never calls it.
#
# The PostgreSQL major version: that of PG_CONFIG if it works, else the newest
# one installed under /usr/lib/postgresql, else BILLING_PG_VERSION (default
# 15, Debian 12's).
set -euo pipefail

ver=
if [[ -n ${PG_CONFIG:-} ]] && command -v "$PG_CONFIG" >/dev/null 2>&1; then
	ver=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
fi
if [[ -z $ver ]]; then
	ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1 || true)
fi
ver=${ver:-${BILLING_PG_VERSION:-15}}
bin=/usr/lib/postgresql/$ver/bin
missing=()
need() { # need <package> -- add the package unless already queued
	local p
	for p in "${missing[@]}"; do [[ $p == "$1" ]] && return 0; done
	missing+=("$1")
}

[[ -x $bin/postgres ]] || need "postgresql-$ver"
if ! { [[ -x $bin/pg_config ]] && pgxs=$("$bin/pg_config" --pgxs 2>/dev/null) && [[ -f $pgxs ]] &&
	inc=$("$bin/pg_config" --includedir-server 2>/dev/null) && [[ -f $inc/postgres.h ]]; }; then
	need "postgresql-server-dev-$ver"
fi
[[ -f /usr/include/hiredis/hiredis.h ]] || need libhiredis-dev
command -v redis-server >/dev/null 2>&1 || need redis-server
command -v redis-cli >/dev/null 2>&1 || need redis-tools
# PostgreSQL's Perl TAP framework (PostgreSQL::Test::Cluster) runs on IPC::Run
perl -MIPC::Run -e 1 >/dev/null 2>&1 || need libipc-run-perl
command -v prove >/dev/null 2>&1 || need perl
# promtool checks billing_metrics() (test/t/090_events.pl)
command -v promtool >/dev/null 2>&1 || need prometheus
command -v make >/dev/null 2>&1 || need make
command -v gcc >/dev/null 2>&1 || need gcc
[[ -f /usr/include/stdio.h ]] || need libc6-dev

((${#missing[@]} == 0)) && exit 0

if ((EUID != 0)); then
	echo "deps.sh: missing packages: ${missing[*]}" >&2
	echo "deps.sh: as root: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
	exit 1
fi

echo "deps.sh: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# the packages' maintainer scripts must not start services (prometheus,
# redis-server, postgresql): a policy-rc.d saying "no", unless there is one
policy=
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
	policy=/usr/sbin/policy-rc.d
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	trap 'rm -f "$policy"' EXIT
fi
apt-get update </dev/null
apt-get install -y --no-install-recommends "${missing[@]}" </dev/null

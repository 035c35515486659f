#!/usr/bin/env bash
# Ensure the Debian packages needed to build and test the billing extension
# are installed.  Idempotent; prints nothing when everything is present.
# As root, missing packages are installed with apt-get (non-interactive);
# otherwise the needed command is printed and we exit 1.
set -euo pipefail

PGBIN=/usr/lib/postgresql/15/bin
missing=()

need() { # need <package> -- add the package unless already queued
	local p
	for p in "${missing[@]}"; do [[ $p == "$1" ]] && return 0; done
	missing+=("$1")
}

# Server binary.
[[ -x $PGBIN/postgres ]] || need postgresql-15

# pg_config, PGXS makefile and server headers.
if [[ -x $PGBIN/pg_config ]] &&
	pgxs=$("$PGBIN/pg_config" --pgxs 2>/dev/null) && [[ -f $pgxs ]] &&
	inc=$("$PGBIN/pg_config" --includedir-server 2>/dev/null) && [[ -f $inc/postgres.h ]]; then
	:
else
	need postgresql-server-dev-15
fi

# hiredis headers, redis server and client.
[[ -f /usr/include/hiredis/hiredis.h ]] || need libhiredis-dev
command -v redis-server >/dev/null 2>&1 || need redis-server
command -v redis-cli >/dev/null 2>&1 || need redis-tools

# C toolchain (gcc only *recommends* libc6-dev, so check it explicitly).
command -v make >/dev/null 2>&1 || need make
command -v gcc >/dev/null 2>&1 || need gcc
[[ -f /usr/include/stdio.h ]] || need libc6-dev

# Fast path: all present.
((${#missing[@]} == 0)) && exit 0

if ((EUID != 0)); then
	echo "deps.sh: missing packages: ${missing[*]}" >&2
	echo "deps.sh: run as root: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
	exit 1
fi

echo "deps.sh: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update </dev/null
apt-get install -y --no-install-recommends "${missing[@]}" </dev/null

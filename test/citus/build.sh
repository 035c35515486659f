#!/usr/bin/env bash
# test/citus/build.sh: build Citus from the vendored source tarball and install
# it into the PostgreSQL that PG_CONFIG names, with the build cached outside the
# work tree so that only the first run compiles (about 3 minutes on 2 cores) and
# later runs only do `make install` (seconds).
#
#   PG_CONFIG=/path/to/pg_config bash test/citus/build.sh
#
# Environment:
#   PG_CONFIG             pg_config of the target server (default: pg_config on PATH)
#   BILLING_CITUS_SRC     folder with citus-v<version>-notests.tar.gz and, optionally,
#                         citus-pg15.20.patch (default: <repo>/../shared/citus)
#   BILLING_CITUS_CACHE   cache root (default: /var/cache/billing-citus); the build
#                         lives in <cache>/<key>, key = sha256 of the tarball, the
#                         patch and `pg_config --version`
#
# The patch (a duplicate static have_createdb_privilege) is applied only when the
# server's headers declare that function themselves (PostgreSQL 15.20 and later
# 15.x; 16+ are handled by Citus itself), and only if it applies cleanly.
#
# As root, missing Debian build dependencies are installed with apt-get; as
# another user the script lists them and fails.  `make install` writes into the
# server's lib and share directories, so it needs the rights to do that.
#
# Exit status: 0 installed; 2 the Citus source is missing (one line on stderr,
# "skipped: ..." for a test to report); 3 this Citus does not support the
# server's major version (its configure.ac's check, read before anything is
# installed; one line "unsupported: ..."); 1 any other failure.
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(cd "$here/../.." && pwd)
src=${BILLING_CITUS_SRC:-$repo/../shared/citus}
cache_root=${BILLING_CITUS_CACHE:-/var/cache/billing-citus}
PG_CONFIG=${PG_CONFIG:-pg_config}

say() { echo "citus-build: $*" >&2; }
die() { say "$*"; exit 1; }
elapsed() { echo "$((SECONDS - $1))s"; }

# --- the source ---------------------------------------------------------------
shopt -s nullglob
tarballs=("$src"/citus-v*-notests.tar.gz)
shopt -u nullglob
if ((${#tarballs[@]} == 0)); then
	echo "skipped: no Citus source (citus-v*-notests.tar.gz) in $src; set BILLING_CITUS_SRC" >&2
	exit 2
fi
((${#tarballs[@]} == 1)) || die "several Citus tarballs in $src: ${tarballs[*]}"
tarball=${tarballs[0]}
patchfile=$src/citus-pg15.20.patch
[[ -f $patchfile ]] || patchfile=

command -v "$PG_CONFIG" >/dev/null 2>&1 || die "pg_config not found: $PG_CONFIG (set PG_CONFIG)"
pg_version=$("$PG_CONFIG" --version)
pg_major=$(sed -E 's/^PostgreSQL ([0-9]+).*/\1/' <<<"$pg_version")
[[ $pg_major =~ ^[0-9]+$ ]] || die "cannot parse the version of $PG_CONFIG: $pg_version"

# --- the versions this Citus supports (configure.ac refuses the others) --------
# the line: elif test "$version_num" != '15' -a  "$version_num" != '16' ...
supported=$(tar xzf "$tarball" -O configure.ac 2>/dev/null |
	grep -m1 'version_num" != ' | grep -o "!= '[0-9]*'" | tr -dc '0-9 \n' | xargs || true)
if [[ -n $supported && " $supported " != *" $pg_major "* ]]; then
	echo "unsupported: Citus $(basename "$tarball" | sed -E 's/^citus-v(.*)-notests\.tar\.gz$/\1/') supports PostgreSQL ${supported// /, } only, not $pg_major" >&2
	exit 3
fi

# --- build dependencies (Debian) ----------------------------------------------
# configure (default options) needs libcurl, lz4 and zstd; the server's
# libpq/libpq-be.h includes <gssapi/gssapi.h> (Debian builds PostgreSQL with
# GSSAPI): libkrb5-dev; utils/pg_locale.h includes <unicode/ucol.h> (built
# with ICU; postgresql-server-dev pulls it in, the matrix chroots' PGXS does
# not): libicu-dev; the link needs libpq (-lpq).  libselinux1-dev,
# libpam0g-dev, autoconf, flex and bison are NOT needed (tried): configure is
# shipped generated and Citus has no grammar files.
deps=(gcc make patch libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev libpq-dev libicu-dev)
missing=()
for p in "${deps[@]}"; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
	if ((EUID == 0)); then
		say "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >/dev/null ||
			{ apt-get update </dev/null >/dev/null &&
				apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >/dev/null; } ||
			die "apt-get install ${missing[*]} failed"
	else
		die "missing Debian packages: ${missing[*]} (as root: apt-get install ${missing[*]})"
	fi
fi

# --- the cache key ------------------------------------------------------------
tar_sha=$(sha256sum "$tarball" | cut -d' ' -f1)
patch_sha=none
[[ -n $patchfile ]] && patch_sha=$(sha256sum "$patchfile" | cut -d' ' -f1)
key=$(printf '%s\n%s\n%s\n' "$tar_sha" "$patch_sha" "$pg_version" | sha256sum | cut -c1-16)
citus_version=$(basename "$tarball" | sed -E 's/^citus-v(.*)-notests\.tar\.gz$/\1/')
dir=$cache_root/citus-$citus_version-pg$pg_major-$key

mkdir -p "$cache_root" || die "cannot create the cache $cache_root (set BILLING_CITUS_CACHE)"
# one build per key at a time; a second run waits and then finds it done
exec 9>"$dir.lock"
flock 9

t0=$SECONDS
if [[ ! -f $dir/.built ]]; then
	say "cold build in $dir (Citus $citus_version for $pg_version)"
	# built in place: configure records absolute paths, the tree cannot move;
	# .built marks a finished build, anything else is removed and redone
	rm -rf "$dir"
	mkdir -p "$dir"
	trap 'rm -rf "$dir"' EXIT
	tar xzf "$tarball" --no-same-owner -C "$dir"

	# the patch: needed when the server exports have_createdb_privilege (15.20+)
	hdr=$("$PG_CONFIG" --includedir-server)/commands/dbcommands.h
	if ((pg_major < 16)) && grep -q 'have_createdb_privilege' "$hdr"; then
		[[ -n $patchfile ]] || die "$hdr declares have_createdb_privilege: Citus needs citus-pg15.20.patch, not found in $src"
		patch --dry-run -p0 -d "$dir" src/include/pg_version_compat.h <"$patchfile" >/dev/null ||
			die "$patchfile does not apply to $(basename "$tarball")"
		patch -p0 -s -d "$dir" src/include/pg_version_compat.h <"$patchfile"
		say "applied $(basename "$patchfile")"
		patched=yes
	else
		patched=no
	fi

	t=$SECONDS
	(cd "$dir" && ./configure PG_CONFIG="$PG_CONFIG" >configure.log 2>&1) ||
		{ tail -20 "$dir/configure.log" >&2; die "configure failed (log above)"; }
	say "configure: $(elapsed "$t")"
	t=$SECONDS
	(cd "$dir" && make -j2 with_llvm=no >make.log 2>&1) ||
		{ tail -30 "$dir/make.log" >&2; die "make failed (log above)"; }
	say "make: $(elapsed "$t")"
	printf 'tarball %s %s\npatch %s %s (applied: %s)\npg %s (%s)\n' \
		"$(basename "$tarball")" "$tar_sha" "${patchfile:+$(basename "$patchfile")}" "$patch_sha" \
		"$patched" "$pg_version" "$PG_CONFIG" >"$dir/.key"
	touch "$dir/.built"
	trap - EXIT
else
	say "cached build $dir"
fi

# PG_CONFIG on the command line: install where this pg_config says, whatever
# pg_config the cached tree was configured with (same version by the key)
t=$SECONDS
(cd "$dir" && make install with_llvm=no PG_CONFIG="$PG_CONFIG" >install.log 2>&1) ||
	{ tail -20 "$dir/install.log" >&2; die "make install failed (log above)"; }
say "make install: $(elapsed "$t"); total $(elapsed "$t0")"

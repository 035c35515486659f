#!/usr/bin/env bash
# Run the whole test suite (`make check`) on other PostgreSQL versions, each
# inside a cached Debian chroot.  Run as root.
#
#   test/matrix.sh [VERSION...]      (default: $BILLING_MATRIX_VERSIONS, else 17 18)
#
# Versions and their Debian suites: 17 = trixie, 18 = sid (the mirror
# below); also 15 = bookworm, the native version, in a clean room.
# For each version in turn:
#   1. The chroot <cache>/<suite> is reused when its stamp matches this
#      script's recipe (MATRIX_RECIPE, the package lists, the mirror);
#      otherwise it is (re)built with `debootstrap --variant=minbase` in a
#      temporary sibling directory and renamed into place when complete.
#   2. The source tree that holds this script (tracked files plus untracked
#      files git does not ignore, so uncommitted work is tested too) is copied
#      to a fresh /build/billing inside the chroot; what an earlier run
#      installed there (billing.so, billing*.sql, the Lua scripts) is removed.
#      The Citus source for t/080_citus (BILLING_CITUS_SRC, default
#      ../shared/citus, as test/run.sh finds it) goes to /build/citus;
#      test/run.sh builds it into the chroot's /var/cache/billing-citus
#      (installing its Debian build dependencies in the chroot), once per
#      chroot.
#   3. /proc and a tmpfs on /dev/shm are mounted; as root inside the chroot,
#      with a clean environment, it runs
#        make check PG_CONFIG=/usr/lib/postgresql/<N>/bin/pg_config
#      (the suite starts its servers as the chroot's `postgres` user).
#   4. Every process whose root is the chroot is killed, then everything
#      mounted below the chroot is unmounted.
# Output: the suite's output, each line prefixed "[pgN] "; per version a line
# "pgN (suite): <the suite's final line> -- suite S s, wall W s"; at the very
# end one line "N passed, N failed" summed over the versions (parsed from the
# suite's own final line).  A version whose chroot cannot be prepared, whose
# suite exits non-zero, or whose suite prints no such final line counts as
# (at least) one failure.  Exit status 0 only if every version passed.
#
# Environment inside the chroot: PATH, HOME=/root, LANG=C.UTF-8 (C if the
# chroot lacks it), CI and the caller's BILLING_* and BENCH_* variables, except
# BILLING_MATRIX_* (this script's knobs), BILLING_CITUS_* (the chroot gets
# BILLING_CITUS_SRC=/build/citus) and the per-cluster values of a
# native run (BILLING_TMP, BILLING_PGPORT, BILLING_REDIS_PORT, BILLING_PGBIN:
# host paths and host ports).  BILLING_PORT_BASE is set per version (17:
# 61000, 18: 62000, 15: 64000): the harness takes every TCP port it uses
# from there, so a matrix run never shares a port with a native run (the
# chroot shares the host's network).  All lie above Linux's ephemeral port
# range (32768-60999), where an outgoing connection could hold a port and
# make a server's bind fail.
# Logs: <cache>/pgN.log (the suite's output), <cache>/<suite>.build.log.
#
# Knobs:
#   BILLING_MATRIX_VERSIONS the versions to run when none are given (default
#                           "17 18"; `make matrix` passes none)
#   BILLING_MATRIX_CACHE    chroot cache (default /var/cache/billing-matrix),
#                           outside the work tree; 0.6-0.75 GiB per suite,
#                           plus 0.3-0.4 GiB for the last run's /build
#                           (kept for inspection: regression.diffs, logs)
#   BILLING_MATRIX_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   BILLING_MATRIX_TIMEOUT  seconds one version's suite may run (default 1500,
#                           so that two hung versions still fit CI's 90 min)
#   BILLING_MATRIX_DEADLINE instead, a time (seconds since 1970) by which every
#                           version must be done: once its chroot is ready, a
#                           version's suite may run its share of the time left
#                           (the time left divided by the versions still to
#                           run, at least 5 min); .ci/run sets it
#   BILLING_MATRIX_REBUILD  1 = rebuild the chroots even if their stamp matches
#                           (sid moves daily; a cached sid chroot does not)
#   BILLING_MATRIX_TARGET   the make target run in each chroot (default check;
#                           bench: `make bench` there, its RESULTS.md copied to
#                           <cache>/pgN-RESULTS.md; the verdict is make's status)
#   BILLING_MATRIX_LLVM     1 = install clang/LLVM and build the JIT bitcode
#                           too (+0.65 GiB per chroot).  Default 0: a stand-in
#                           package satisfies postgresql-server-dev's clang
#                           and llvm-dev dependencies and the chroot's PGXS
#                           says with_llvm = no, as a PostgreSQL built
#                           without LLVM would.
#
# Guarantees: chroots live only under the cache; one that is incomplete
# (interrupted creation) never carries a valid stamp under the final name,
# and leftovers of an interrupted creation are removed (after unmounting)
# by the next run.  One run at a time per chroot (flock on
# <cache>/.<suite>.lock).  On every exit path (failure, timeout, Ctrl-C,
# TERM) the processes inside the chroot are killed and its mounts removed
# (after a SIGKILL of this script, the next run does it first); no
# directory is ever removed while something is mounted below it.
# Maintainer scripts start no servers (policy-rc.d exits 101) and no
# `main` cluster is created.  Nothing is installed on the host except the
# Debian package debootstrap, when it is missing.
set -euo pipefail

# Bump when the way a chroot is built changes: every cached chroot is rebuilt.
MATRIX_RECIPE=1

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cache=${BILLING_MATRIX_CACHE:-/var/cache/billing-matrix}
# the Citus source copied into each chroot (as test/run.sh finds it)
citus_src=${BILLING_CITUS_SRC:-$(realpath -m "$repo/../shared/citus")}
mirror=${BILLING_MATRIX_MIRROR:-http://deb.debian.org/debian}
suite_timeout=${BILLING_MATRIX_TIMEOUT:-1500}
deadline=${BILLING_MATRIX_DEADLINE:-}
llvm=${BILLING_MATRIX_LLVM:-0}
target=${BILLING_MATRIX_TARGET:-check}
stamp_name=.billing-matrix-stamp
umask 022

say() { printf 'matrix: %s\n' "$*"; }
warn() { printf 'matrix: %s\n' "$*" >&2; }
die() {
	warn "$*"
	exit 2
}

# version -> "<Debian suite> <BILLING_PORT_BASE>"
version_info() {
	case $1 in
	15) echo bookworm 64000 ;;
	17) echo trixie 61000 ;;
	18) echo sid 62000 ;;
	*) return 1 ;;
	esac
}
suite_of() {
	local i
	i=$(version_info "$1") || return 1
	echo "${i% *}"
}

# Packages debootstrap installs (it follows Depends, not Recommends).
# libssl-dev: the Makefile builds Redis TLS where hiredis >= 1.0 has
# hiredis_ssl (17, 18), which needs OpenSSL's headers; openssl: the TLS test
# (072_redis_auth_tls) makes its certificates with it.
base_packages() {
	echo "postgresql-$1 libhiredis-dev libssl-dev openssl redis-server redis-tools make gcc libc6-dev perl libipc-run-perl"
}

# ---------------------------------------------------------------------------
# Processes and mounts below a directory

# pids of the processes whose root directory is $1 or below it (one find:
# a readlink per process is far too slow with thousands of processes)
procs_in() {
	find /proc/[0-9]*/root -maxdepth 0 -printf '%l\t%p\n' 2>/dev/null |
		awk -F '\t' -v root="$1" '$1 == root || index($1, root "/") == 1 {
			split($2, part, "/"); print part[3] }'
}

# TERM, then (after 10 s) KILL every process rooted in $1.
kill_procs_in() {
	local pids i p list=()
	mapfile -t pids < <(procs_in "$1")
	((${#pids[@]})) || return 0
	for p in "${pids[@]}"; do list+=("$p($(cat "/proc/$p/comm" 2>/dev/null))"); done
	say "stopping ${#pids[@]} process(es) left in $1: ${list[*]}"
	kill -TERM "${pids[@]}" 2>/dev/null || true
	for i in {1..100}; do
		mapfile -t pids < <(procs_in "$1")
		((${#pids[@]})) || return 0
		if ((i == 50)); then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
		sleep 0.2
	done
	warn "processes still running in $1: ${pids[*]}"
	return 1
}

# mount points at or below $1, deepest first
mounts_under() {
	local m
	while read -r _ _ _ _ m _; do
		m=$(printf '%b' "$m") # mountinfo escapes blanks as \040 etc.
		if [[ $m == "$1" || $m == "$1"/* ]]; then
			echo "$m"
		fi
	done </proc/self/mountinfo | LC_ALL=C sort -r
}

# Refuse to touch anything but a chroot directory in the cache.
check_path() {
	case $1 in
	"$cache"/?*) ;;
	*)
		warn "internal error: refusing to release or remove '$1' (not below $cache)"
		return 1
		;;
	esac
}

# Kill what runs in $1, unmount everything below it.
release() {
	local m mounts
	check_path "$1" || return 1
	kill_procs_in "$1" || true
	mapfile -t mounts < <(mounts_under "$1")
	for m in "${mounts[@]}"; do
		umount "$m" 2>/dev/null || umount -l "$m" || warn "cannot unmount $m"
	done
	if [[ -n $(mounts_under "$1") ]]; then
		warn "still mounted below $1"
		return 1
	fi
}

# Remove a chroot directory, never with anything mounted below it.
remove_tree() {
	[[ -e $1 ]] || return 0
	release "$1" || {
		warn "not removing $1: something is still mounted below it"
		return 1
	}
	rm -rf --one-file-system "$1"
}

# Directories to release (and, for temporary ones, remove) on exit, and the
# pid of a running debootstrap (not inside the chroot, so not found by
# kill_procs_in).
active=() temporary=() child=
forget_active() {
	local d keep=()
	for d in "${active[@]}"; do [[ $d == "$1" ]] || keep+=("$d"); done
	active=("${keep[@]}")
}
on_exit() {
	local rc=$? d
	trap - EXIT INT TERM
	if [[ -n $child ]]; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
	for d in "${active[@]}"; do release "$d" || rc=1; done
	for d in "${temporary[@]}"; do remove_tree "$d" || rc=1; done
	exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Chroots

# mount what the suite needs inside chroot $1 (released by `release`)
mount_chroot() {
	local root=$1 n
	mount -t proc proc "$root/proc" &&
		mkdir -p "$root/dev/shm" &&
		mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm" || return 1
	# debootstrap creates these with mknod; where it could not (e.g. in a
	# container), bind the host's.
	for n in null zero full random urandom tty; do
		if [[ ! -c $root/dev/$n ]]; then
			rm -f "$root/dev/$n" && : >"$root/dev/$n" &&
				mount --bind "/dev/$n" "$root/dev/$n" || return 1
		fi
	done
	[[ -e $root/dev/fd ]] || ln -s /proc/self/fd "$root/dev/fd" || return 1
}

# run a command inside chroot $1 with a clean environment
in_chroot() {
	local root=$1
	shift
	chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C DEBIAN_FRONTEND=noninteractive "$@" {lockfd}>&-
}

# the hash that a current chroot of version $1 carries in its stamp
recipe_hash() {
	printf '%s\n' "recipe=$MATRIX_RECIPE" "suite=$(suite_of "$1")" "mirror=$mirror" \
		"packages=$(base_packages "$1")" "dev=postgresql-server-dev-$1" "llvm=$llvm" |
		sha256sum | cut -d' ' -f1
}

# Files written into the target before debootstrap, so that they are in
# force while its packages are configured.
preseed() {
	local t=$1
	mkdir -p "$t/usr/sbin" "$t/etc/dpkg/dpkg.cfg.d" "$t/etc/apt/apt.conf.d" \
		"$t/etc/postgresql-common/createcluster.d"
	# maintainer scripts start no service (invoke-rc.d asks this)
	printf '#!/bin/sh\n# billing matrix: no service starts in this chroot\nexit 101\n' \
		>"$t/usr/sbin/policy-rc.d"
	chmod 755 "$t/usr/sbin/policy-rc.d"
	# postgresql-N's postinst would create (and try to start) 'main'
	echo 'create_main_cluster = false' >"$t/etc/postgresql-common/createcluster.d/billing-matrix.conf"
	# a throwaway chroot: no fsync per file, no documentation
	printf '%s\n' force-unsafe-io 'path-exclude /usr/share/doc/*' \
		'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
		>"$t/etc/dpkg/dpkg.cfg.d/billing-matrix"
	# sid's Release can carry a Valid-Until in the past
	printf '%s\n' 'Acquire::Check-Valid-Until "false";' 'APT::Install-Recommends "false";' \
		'Dpkg::Use-Pty "0";' >"$t/etc/apt/apt.conf.d/90billing-matrix"
}

# postgresql-server-dev-N without clang/llvm-dev (see BILLING_MATRIX_LLVM)
install_dev_package() {
	local t=$1 v=$2 deps
	if [[ $llvm != 1 ]]; then
		# the clang-NN and llvm-NN-dev that postgresql-server-dev-N depends on
		deps=$(in_chroot "$t" apt-cache show --no-all-versions "postgresql-server-dev-$v" |
			sed -n 's/^Depends: //p' | sed 's/[,|]/\n/g' | sed 's/(.*)//; s/ //g' |
			grep -E '^(clang|llvm)-[0-9.]+(-dev)?$' | sort -u | paste -sd, | sed 's/,/, /g') || true
		if [[ -n $deps ]]; then
			mkdir -p "$t/tmp/no-llvm/DEBIAN"
			cat >"$t/tmp/no-llvm/DEBIAN/control" <<-EOF
				Package: billing-matrix-no-llvm
				Version: 1
				Architecture: all
				Maintainer: billing test matrix <root@localhost>
				Provides: $deps
				Description: stands in for clang and LLVM in the billing test chroot
				 PGXS is set to with_llvm = no here: no JIT bitcode is built.
			EOF
			in_chroot "$t" dpkg-deb --build /tmp/no-llvm /tmp/no-llvm.deb >/dev/null &&
				in_chroot "$t" dpkg -i /tmp/no-llvm.deb || return 1
			rm -rf "$t/tmp/no-llvm" "$t/tmp/no-llvm.deb"
		fi
	fi
	if ! in_chroot "$t" apt-get install -y -q "postgresql-server-dev-$v" </dev/null; then
		# lists missing or stale: fetch them once and try again
		in_chroot "$t" apt-get -q update </dev/null &&
			in_chroot "$t" apt-get install -y -q "postgresql-server-dev-$v" </dev/null || return 1
	fi
	if [[ $llvm != 1 ]]; then
		sed -i 's/^with_llvm[[:space:]]*=.*/with_llvm = no/' \
			"$t/usr/lib/postgresql/$v/lib/pgxs/src/Makefile.global" || return 1
		grep -q '^with_llvm = no$' "$t/usr/lib/postgresql/$v/lib/pgxs/src/Makefile.global"
	fi
}

# Does chroot $1 have what the suite needs for version $2?
check_chroot() {
	local t=$1 v=$2 major
	major=$(in_chroot "$t" "/usr/lib/postgresql/$v/bin/pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
	[[ $major == "$v" ]] || {
		warn "pg_config in the chroot reports '$major', not $v"
		return 1
	}
	# shellcheck disable=SC2016 # expanded by the chroot's sh
	in_chroot "$t" sh -c '
		for c in postgres initdb pg_ctl psql pgbench pg_dump pg_restore; do
			test -x "/usr/lib/postgresql/$1/bin/$c" || { echo "no $c"; exit 1; }
		done
		test -f "$(/usr/lib/postgresql/$1/bin/pg_config --pgxs)" || { echo "no PGXS"; exit 1; }
		for c in gcc make redis-server redis-cli runuser perl diff timeout; do
			command -v "$c" >/dev/null || { echo "no $c"; exit 1; }
		done
		test -f /usr/include/hiredis/hiredis.h || { echo "no hiredis.h"; exit 1; }
		if ! grep -Eq "define HIREDIS_MAJOR 0\>" /usr/include/hiredis/hiredis.h; then
			test -f /usr/include/hiredis/hiredis_ssl.h || { echo "hiredis >= 1.0 without hiredis_ssl.h"; exit 1; }
			test -f /usr/include/openssl/ssl.h || { echo "no openssl/ssl.h"; exit 1; }
			command -v openssl >/dev/null || { echo "no openssl command"; exit 1; }
		fi
		perl -MIPC::Run -e 1 || { echo "no IPC::Run"; exit 1; }
		id postgres >/dev/null || { echo "no postgres user"; exit 1; }
		test ! -e "/etc/postgresql/$1/main" || { echo "a main cluster exists"; exit 1; }
	' sh "$v" >&2
}

# Build the chroot of version $1 at $2 (a temporary directory).  Called in
# a condition, where set -e does not apply: every step is checked.
build_chroot() {
	local t=$1 v=$2 suite log rc=0
	suite=$(suite_of "$v")
	log=$cache/$suite.build.log
	mkdir -p "$t" && preseed "$t" || return 1
	say "pg$v: debootstrap $suite into $t (log: $log)"
	# in the background, so that on_exit can stop it
	debootstrap --variant=minbase --include="$(base_packages "$v" | tr ' ' ,)" \
		"$suite" "$t" "$mirror" >"$log" 2>&1 </dev/null {lockfd}>&- &
	child=$!
	wait "$child" || rc=$?
	child=
	if ((rc != 0)); then
		warn "pg$v: debootstrap $suite failed (exit $rc); last lines of $log:"
		tail -n 30 "$log" >&2
		return 1
	fi
	active+=("$t")
	mount_chroot "$t" || return 1
	if ! install_dev_package "$t" "$v" >>"$log" 2>&1; then
		warn "pg$v: installing postgresql-server-dev-$v failed; last lines of $log:"
		tail -n 30 "$log" >&2
		return 1
	fi
	# should a package have created the main cluster after all, drop it
	if [[ -d $t/etc/postgresql/$v/main ]]; then
		in_chroot "$t" pg_dropcluster --stop "$v" main >>"$log" 2>&1 || return 1
	fi
	check_chroot "$t" "$v" || return 1
	in_chroot "$t" apt-get clean || return 1
	rm -rf "$t/var/lib/apt/lists/"* "$t/build" || return 1
	release "$t" || return 1
	forget_active "$t"
	{
		recipe_hash "$v"
		printf 'PostgreSQL %s on Debian %s from %s, built %s\n' "$v" "$suite" "$mirror" \
			"$(date -u +%FT%TZ)"
	} >"$t/$stamp_name"
}

# Make <cache>/<suite> a current chroot for version $1 (caller holds the lock).
prepare_chroot() {
	local v=$1 suite root t old d
	suite=$(suite_of "$v")
	root=$cache/$suite
	# leftovers of an interrupted creation or swap (we hold the lock)
	for d in "$cache/.$suite".new.* "$cache/.$suite".old.*; do
		[[ -e $d ]] || continue
		warn "pg$v: removing the leftover $d"
		remove_tree "$d" || return 1
	done
	if [[ ${BILLING_MATRIX_REBUILD:-0} != 1 && -f $root/$stamp_name &&
		$(head -n 1 "$root/$stamp_name") == "$(recipe_hash "$v")" ]]; then
		return 0
	fi
	if [[ ${BILLING_MATRIX_REBUILD:-0} == 1 ]]; then
		say "pg$v: rebuilding $root (BILLING_MATRIX_REBUILD=1)"
	elif [[ -e $root ]]; then
		say "pg$v: $root is out of date: rebuilding it"
	fi
	if ! command -v debootstrap >/dev/null; then
		say "installing debootstrap on the host"
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; } </dev/null >&2 ||
			{
				warn "cannot install debootstrap"
				return 1
			}
	fi
	if (($(df -Pk "$cache" | awk 'NR == 2 { print $4 }') < 3 * 1024 * 1024)); then
		warn "pg$v: less than 3 GiB free in $cache"
		return 1
	fi
	t=$cache/.$suite.new.$$
	temporary+=("$t")
	build_chroot "$t" "$v" || return 1
	# swap in: never a half-built chroot under the final name
	if [[ -e $root ]]; then
		old=$cache/.$suite.old.$$
		temporary+=("$old")
		release "$root" && mv -T "$root" "$old" || return 1
	fi
	mv -T "$t" "$root" || return 1
	if [[ -n ${old:-} ]]; then remove_tree "$old" || return 1; fi
	say "pg$v: $root ready ($(du -sh --one-file-system "$root" | cut -f1))"
}

# Copy the source tree into a fresh /build/billing of chroot $1 (version
# $2), and remove what an earlier run installed: make check installs again.
copy_tree() {
	local root=$1 v=$2 f
	rm -rf --one-file-system "$root/build" \
		"$root/usr/share/postgresql/$v/extension/billing"* \
		"$root/usr/lib/postgresql/$v/lib/billing.so" \
		"$root/usr/lib/postgresql/$v/lib/bitcode/billing"*
	mkdir -p "$root/build/billing" "$root/build/citus"
	# the Citus source for t/080_citus, if the host has it
	for f in "$citus_src"/citus-v*-notests.tar.gz "$citus_src"/citus-pg*.patch; do
		if [[ -f $f ]]; then cp "$f" "$root/build/citus/"; fi
	done
	git -C "$repo" ls-files -z --cached --others --exclude-standard |
		while IFS= read -r -d '' f; do
			# a tracked file deleted in the work tree is not part of it
			if [[ -e $repo/$f || -L $repo/$f ]]; then printf '%s\0' "$f"; fi
		done |
		tar -C "$repo" --null --no-recursion -T - -cf - |
		tar -C "$root/build/billing" --no-same-owner -xf -
}

# environment of the suite inside the chroot, one NAME=value per element
suite_env() {
	local v=$1 root=$2 kv name lang=C
	[[ -d $root/usr/lib/locale/C.utf8 ]] && lang=C.UTF-8
	env_args=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "LANG=$lang")
	if [[ -v CI ]]; then env_args+=("CI=$CI"); fi
	while IFS= read -r -d '' kv; do
		name=${kv%%=*}
		case $name in
		BILLING_MATRIX_* | BILLING_PORT_BASE | BILLING_TMP | BILLING_PGPORT | BILLING_REDIS_PORT | BILLING_PGBIN | \
			BILLING_CITUS_*) ;;
		BILLING_* | BENCH_*) env_args+=("$kv") ;;
		esac
	done < <(env -0)
	env_args+=("BILLING_PORT_BASE=$(version_info "$v" | cut -d' ' -f2)")
	# t/080_citus: the Citus source copy_tree put in the chroot (built into
	# the chroot's /var/cache/billing-citus, which lasts as long as the
	# chroot); required in CI as natively, skipped where Citus does not
	# support the version (18 with Citus 13.2)
	env_args+=("BILLING_CITUS_SRC=/build/citus")
}

# Run make $target for version $1 in chroot $2; output to log $3 and, with a
# prefix, to stdout.  Returns the status of make (124: timed out).
run_suite() {
	local v=$1 root=$2 log=$3 rc=0
	# shellcheck disable=SC2016 # $1 and $2 are expanded by the chroot's bash
	timeout -k 30 "$suite_timeout" chroot "$root" /usr/bin/env -i "${env_args[@]}" \
		/bin/bash -c 'cd /build/billing && exec make "$2" PG_CONFIG="$1"' \
		bash "/usr/lib/postgresql/$v/bin/pg_config" "$target" </dev/null 2>&1 |
		tee "$log" | sed -u "s/^/[pg$v] /" || rc=${PIPESTATUS[0]}
	return "$rc"
}

# ---------------------------------------------------------------------------

((EUID == 0)) || die "run as root (debootstrap, chroot and mount need it)"
[[ $suite_timeout =~ ^[0-9]+$ ]] || die "BILLING_MATRIX_TIMEOUT must be a number of seconds"
[[ -z $deadline || $deadline =~ ^[0-9]+$ ]] || die "BILLING_MATRIX_DEADLINE must be a time in seconds since 1970"
[[ $target == check || $target == bench ]] || die "BILLING_MATRIX_TARGET must be check or bench"
versions=("$@")
((${#versions[@]})) || read -r -a versions <<<"${BILLING_MATRIX_VERSIONS:-17 18}"
((${#versions[@]})) || die "BILLING_MATRIX_VERSIONS names no version"
mkdir -p "$cache"
cache=$(realpath "$cache")
case $cache/ in
"$repo"/*) die "the cache $cache must be outside the work tree" ;;
esac

total_passed=0 total_failed=0 results=()
left=${#versions[@]}
for v in "${versions[@]}"; do
	started=$SECONDS
	left=$((left - 1)) # the versions after this one (counted down before any skip)
	if ! suite=$(suite_of "$v"); then
		warn "pg$v: no Debian suite known for PostgreSQL '$v' (known: 15 17 18)"
		results+=("pg$v: FAILED: unknown version")
		total_failed=$((total_failed + 1))
		continue
	fi
	root=$cache/$suite
	log=$cache/pg$v.log
	exec {lockfd}>"$cache/.$suite.lock"
	if ! flock -n "$lockfd"; then
		say "pg$v: waiting for another matrix run that uses $root"
		flock -w "$suite_timeout" "$lockfd" || {
			warn "pg$v: $root stayed locked"
			results+=("pg$v ($suite): FAILED: chroot locked by another run")
			total_failed=$((total_failed + 1))
			exec {lockfd}>&-
			continue
		}
	fi
	if ! prepare_chroot "$v"; then
		warn "pg$v: FAILED: the $suite chroot could not be prepared"
		results+=("pg$v ($suite): FAILED: chroot could not be prepared -- wall $((SECONDS - started)) s")
		total_failed=$((total_failed + 1))
		exec {lockfd}>&-
		continue
	fi
	ready=$((SECONDS - started))
	if [[ -n $deadline ]]; then
		suite_timeout=$(((deadline - $(date +%s)) / (left + 1)))
		((suite_timeout >= 300)) || suite_timeout=300
	fi
	say "pg$v: chroot $root ready after $ready s; running make $target (at most $suite_timeout s)"
	active+=("$root")
	release "$root" # nothing left over from an earlier run
	copy_tree "$root" "$v"
	mount_chroot "$root"
	suite_env "$v" "$root"
	rc=0
	# in the background: a signal's trap runs at once, not after the suite.
	# The lock's descriptor stays here: a server left behind by a killed run
	# must not hold the lock against the next run, which stops it.
	run_suite "$v" "$root" "$log" {lockfd}>&- &
	child=$!
	wait "$child" || rc=$?
	child=
	suite_s=$((SECONDS - started - ready))
	release "$root"
	forget_active "$root"
	exec {lockfd}>&-

	if [[ $target == bench ]]; then
		# no "N passed" line: make's status, and the results kept
		if ((rc == 0)) && cp "$root/build/billing/bench/RESULTS.md" "$cache/pg$v-RESULTS.md"; then
			results+=("pg$v ($suite): bench ok -- $cache/pg$v-RESULTS.md, wall $((SECONDS - started)) s")
			total_passed=$((total_passed + 1))
		else
			results+=("pg$v ($suite): bench FAILED (exit status $rc; log: $log)")
			total_failed=$((total_failed + 1))
		fi
		continue
	fi
	# the suite's final line; make's own complaint about a failed recipe
	# ("make: *** [Makefile:46: check] Error 1") may follow it
	last=$(grep -Ev '^[[:space:]]*$|^make(\[[0-9]+\])?: ' "$log" | tail -n 1 || true)
	if [[ $last =~ ^([[:alnum:]_]+:[[:space:]]+)?([0-9]+)\ passed,\ ([0-9]+)\ failed(,\ [0-9]+\ skipped)?$ ]]; then
		p=${BASH_REMATCH[2]} f=${BASH_REMATCH[3]}
	else
		p=0 f=0
		last="(no 'N passed, N failed' line)"
	fi
	if ((rc != 0 && f == 0)); then
		f=1
		if ((rc == 124)); then
			last+=" -- timed out after $suite_timeout s"
		else
			last+=" -- exit status $rc"
		fi
	fi
	total_passed=$((total_passed + p))
	total_failed=$((total_failed + f))
	status=ok
	((f == 0)) || status=FAILED
	results+=("pg$v ($suite): $status: $last -- suite $suite_s s, wall $((SECONDS - started)) s (log: $log)")
done

printf '%s\n' "${results[@]}"
echo "$total_passed passed, $total_failed failed"
((total_failed == 0))

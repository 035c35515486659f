#!/usr/bin/env bash
# Throwaway PostgreSQL cluster + redis-server for the billing tests.
#
#   test/cluster.sh start          (re)create and start both (stops old ones first)
#   test/cluster.sh stop           stop both (no-op if not running)
#   test/cluster.sh env            print "export VAR=value" lines for eval
#   test/cluster.sh psql [args]    psql -X -v ON_ERROR_STOP=1 against the cluster
#   test/cluster.sh pg_ctl [args]  pg_ctl -D <pgdata> -l <log> [args] (e.g. restart)
#   test/cluster.sh redis-start | redis-stop
#
# When sourced (". test/cluster.sh"), it only exports the `env` variables and
# defines `billing_cluster <cmd> [args]`; the caller's shell options are untouched.
#
# Knobs: BILLING_PGBIN (the PostgreSQL binaries; default: PG_CONFIG's bindir
# if PG_CONFIG is set, else /usr/lib/postgresql/15/bin),
# BILLING_TMP (default <repo>/tmp_check, or /tmp/billing-check-<hash> if
# the postgres user cannot use that), BILLING_PGPORT (54329), BILLING_REDIS_PORT
# (63799), BILLING_PRELOAD (1 = shared_preload_libraries='billing'),
# BILLING_FSYNC (off|on), BILLING_EXTRA_CONF (lines appended to postgresql.conf),
# BILLING_PG_TCP (0 = postgres listens only on its Unix socket in
# <BILLING_TMP>/sock, where the port number just names the socket file; 1 =
# also on 127.0.0.1:<port>).  The tests use the socket: their port numbers lie
# in Linux's ephemeral range (32768-60999), where any outgoing connection on
# the machine (a redis-cli, the worker's Redis link) may hold 127.0.0.1:<port>
# and make a TCP bind fail with "Address already in use".
# As root, postgres and redis run as the `postgres` OS user (via runuser).

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
	_billing_cluster_sh=$(realpath "${BASH_SOURCE[0]}")
	billing_cluster() { bash "$_billing_cluster_sh" "$@"; }
	eval "$(bash "$_billing_cluster_sh" env)"
	return 0
fi

set -euo pipefail

if [[ -n ${BILLING_PGBIN:-} ]]; then
	PGBIN=$BILLING_PGBIN
elif [[ -n ${PG_CONFIG:-} ]]; then
	PGBIN=$("$PG_CONFIG" --bindir) || { echo "cluster.sh: $PG_CONFIG --bindir failed" >&2; exit 1; }
else
	PGBIN=/usr/lib/postgresql/15/bin
fi
repo=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")/.." && pwd)
pgport=${BILLING_PGPORT:-54329}
redis_port=${BILLING_REDIS_PORT:-63799}

die() { echo "cluster.sh: $*" >&2; exit 1; }

# Run a command as the postgres OS user when we are root (from / so that an
# unreadable cwd such as /root does not bother it); else as ourselves.
as_pg() {
	if ((EUID == 0)); then
		(cd / && runuser -u postgres -- "$@")
	else
		"$@"
	fi
}

# Create a directory owned by the user that runs the servers.
mkdir_pg() {
	mkdir -p "$1"
	if ((EUID == 0)); then chown postgres:postgres "$1"; fi
	chmod "${2:-0755}" "$1"
}

# Pick BILLING_TMP: <repo>/tmp_check unless the postgres user cannot write or
# reach it (e.g. repo under /root) or the socket path would be too long.
pick_tmp() {
	local d=$repo/tmp_check ok=1
	if ((EUID == 0)); then
		mkdir_pg "$d"
		runuser -u postgres -- test -w "$d" -a -x "$d" 2>/dev/null || ok=0
	fi
	# Unix socket paths are limited to 107 bytes.
	((${#d} + ${#pgport} + 20 <= 107)) || ok=0
	if ((ok)); then
		echo "$d"
	else
		rmdir "$d" 2>/dev/null || true
		echo "/tmp/billing-check-$(printf %s "$repo" | md5sum | cut -c1-8)"
	fi
}

if [[ -n ${BILLING_TMP:-} ]]; then
	tmp=$(realpath -m "$BILLING_TMP")
else
	tmp=$(pick_tmp)
fi
pgdata=$tmp/pgdata
sock=$tmp/sock
rdir=$tmp/redis
pglog=$tmp/postgres.log

pg_ctl_() { as_pg "$PGBIN/pg_ctl" -D "$pgdata" -l "$pglog" "$@"; }

stop_pg() {
	[[ -f $pgdata/postmaster.pid ]] || return 0
	pg_ctl_ stop -m fast -w -t 60 >/dev/null 2>&1 && return 0
	# Still running (fast shutdown hung)? Force it.
	if pg_ctl_ status >/dev/null 2>&1; then
		pg_ctl_ stop -m immediate -w -t 60 >/dev/null 2>&1 || true
	fi
}

redis_cli() { redis-cli -h 127.0.0.1 -p "$redis_port" "$@"; }

# Pid of the redis answering on our port (empty if none).
redis_port_pid() { redis_cli info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p'; }

is_redis() { [[ $(cat "/proc/$1/comm" 2>/dev/null) == redis-server* ]]; }

# Stop the redis recorded in our pidfile (a foreign redis is left alone).
stop_redis() {
	local pid deadline sig
	pid=$(cat "$rdir/redis.pid" 2>/dev/null) || return 0
	if is_redis "$pid"; then
		if [[ $(redis_port_pid) == "$pid" ]]; then
			redis_cli shutdown nosave >/dev/null 2>&1 || true
		fi
		# Wait for it to exit; nudge with SIGTERM, then SIGKILL after 10 s.
		deadline=$((SECONDS + 10))
		while is_redis "$pid"; do
			if ((SECONDS >= deadline)); then sig=KILL; else sig=TERM; fi
			kill -"$sig" "$pid" 2>/dev/null || true
			sleep 0.1
		done
	fi
	rm -f "$rdir/redis.pid"
}

start_redis() {
	local deadline pid
	stop_redis
	if [[ -n $(redis_port_pid) ]]; then
		die "port $redis_port is already served by another redis (pid $(redis_port_pid))"
	fi
	mkdir_pg "$rdir"
	as_pg redis-server --bind 127.0.0.1 --port "$redis_port" --daemonize yes \
		--dir "$rdir" --save '' --appendonly no \
		--pidfile "$rdir/redis.pid" --logfile "$rdir/redis.log"
	deadline=$((SECONDS + 30))
	until [[ $(redis_cli ping 2>/dev/null) == PONG && -s $rdir/redis.pid ]]; do
		if ((SECONDS >= deadline)); then
			tail -n 20 "$rdir/redis.log" >&2 || true
			die "redis-server did not answer on port $redis_port"
		fi
		sleep 0.1
	done
	# Make sure the redis answering on the port is the one we started.
	pid=$(redis_port_pid)
	[[ $pid == "$(cat "$rdir/redis.pid")" ]] ||
		die "port $redis_port is served by another redis (pid $pid)"
	return 0
}

start() {
	local fsync
	case ${BILLING_FSYNC:-off} in
	on | 1 | true) fsync=on ;;
	off | 0 | false) fsync=off ;;
	*) die "BILLING_FSYNC must be on or off" ;;
	esac

	mkdir_pg "$tmp"
	stop_redis
	stop_pg
	trap 'stop_pg; stop_redis' EXIT # tear down again if anything below fails
	rm -rf "$pgdata" "$sock"
	mkdir_pg "$pgdata" 0700
	mkdir_pg "$sock"

	as_pg "$PGBIN/initdb" -D "$pgdata" -U postgres -A trust -E UTF8 --no-locale --no-sync \
		>"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; die "initdb failed"; }

	{
		echo "# --- added by test/cluster.sh ---"
		if [[ ${BILLING_PG_TCP:-0} == 1 ]]; then
			echo "listen_addresses = '127.0.0.1'"
		else
			echo "listen_addresses = ''"
		fi
		echo "port = $pgport"
		echo "unix_socket_directories = '$sock'"
		echo "max_connections = 100"
		echo "max_prepared_transactions = 4 # sql/170_two_phase"
		echo "shared_buffers = 256MB"
		echo "fsync = $fsync"
		echo "synchronous_commit = $fsync"
		echo "full_page_writes = $fsync"
		echo "logging_collector = off"
		echo "log_line_prefix = '%m [%p] '"
		if [[ ${BILLING_PRELOAD:-1} == 1 ]]; then
			echo "shared_preload_libraries = 'billing'"
		fi
		if [[ -n ${BILLING_EXTRA_CONF:-} ]]; then
			printf '%s\n' "$BILLING_EXTRA_CONF"
		fi
	} >>"$pgdata/postgresql.conf"

	if ! pg_ctl_ start -w -t 60 >/dev/null; then
		tail -n 40 "$pglog" >&2 || true
		die "postgres failed to start (log: $pglog)"
	fi
	start_redis
	trap - EXIT
	echo "cluster.sh: postgres on $sock:$pgport$([[ ${BILLING_PG_TCP:-0} == 1 ]] && echo " and 127.0.0.1:$pgport"), redis on 127.0.0.1:$redis_port (BILLING_TMP=$tmp)"
}

print_env() {
	printf 'export %s=%q\n' PGHOST "$sock" PGPORT "$pgport" PGUSER postgres \
		PGDATA "$pgdata" BILLING_PGPORT "$pgport" BILLING_REDIS_PORT "$redis_port" \
		BILLING_TMP "$tmp" BILLING_PGBIN "$PGBIN"
}

cmd=${1:-}
shift || true
case $cmd in
start) start ;;
stop)
	stop_pg
	stop_redis
	;;
env) print_env ;;
psql) exec "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$sock" -p "$pgport" -U postgres "$@" ;;
pg_ctl) pg_ctl_ "$@" ;;
redis-start) start_redis ;;
redis-stop) stop_redis ;;
*) die "usage: $0 start|stop|env|psql [args]|pg_ctl [args]|redis-start|redis-stop" ;;
esac

#!/usr/bin/env bash
# test/citus/lab.sh: a throwaway Citus cluster on loopback for billing, plus a
# single-node baseline, all from one PostgreSQL installation (PG_CONFIG).
#
#   lab.sh init         initdb every node (removes an old lab), start them,
#                       create database billing, Citus extension, add workers
#   lab.sh start|stop   start / stop every node (stop: fast shutdown)
#   lab.sh billing [N]  (re)create database billing everywhere: Citus and billing
#                       on the cluster, distributed (billing.citus_distribute()),
#                       billing alone on single; N funded tenants t1..tN on both
#   lab.sh psql NODE [psql args]   NODE = coord | w1 | w2 | single
#   lab.sh env          print "export VAR=value" lines (PGBIN, ports, socket dir)
#
# Nodes: coord (coordinator) on port BASE+1, w1 BASE+2, w2 BASE+3, all with
# shared_preload_libraries = 'citus,billing'; single on BASE+4 with 'billing'
# only.  Clients use the Unix socket in $LAB/sock; the nodes talk to each other
# over TCP on 127.0.0.1 (Citus needs a host name).  Redis is not started here.
#
# Environment: PG_CONFIG (default pg_config on PATH), CITUS_LAB (default
# /tmp/citus-lab), CITUS_LAB_PORT (BASE, default 57000), CITUS_LAB_CONF (extra
# postgresql.conf lines for every node).  As root, servers run as `postgres`.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-pg_config}
PGBIN=$("$PG_CONFIG" --bindir)
LAB=${CITUS_LAB:-/tmp/citus-lab}
BASE=${CITUS_LAB_PORT:-57000}
SOCK=$LAB/sock
nodes=(coord w1 w2 single)

die() { echo "lab.sh: $*" >&2; exit 1; }
port_of() {
	case $1 in
	coord) echo $((BASE + 1)) ;; w1) echo $((BASE + 2)) ;; w2) echo $((BASE + 3)) ;;
	single) echo $((BASE + 4)) ;; *) die "unknown node $1" ;;
	esac
}
as_pg() {
	if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}
pg_ctl_node() {
	local n=$1
	shift
	as_pg "$PGBIN/pg_ctl" -D "$LAB/$n" -l "$LAB/$n.log" -w -t 120 "$@"
}
psql_node() {
	local n=$1
	shift
	"$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$(port_of "$n")" -U postgres "$@"
}

cmd=${1:-}
shift || true
case $cmd in
env)
	echo "export PGBIN=$PGBIN LAB=$LAB SOCK=$SOCK"
	for n in "${nodes[@]}"; do echo "export PORT_${n^^}=$(port_of "$n")"; done
	;;
init)
	"$0" stop >/dev/null 2>&1 || true
	rm -rf "$LAB"
	mkdir -p "$SOCK"
	((EUID == 0)) && chown -R postgres: "$LAB"
	for n in "${nodes[@]}"; do
		as_pg "$PGBIN/initdb" -D "$LAB/$n" -U postgres --auth=trust --no-locale -E UTF8 >"$LAB/$n.initdb.log"
		preload="'citus,billing'"
		[[ $n == single ]] && preload="'billing'"
		as_pg tee -a "$LAB/$n/postgresql.conf" >/dev/null <<-EOF
			port = $(port_of "$n")
			listen_addresses = '127.0.0.1'
			unix_socket_directories = '$SOCK'
			shared_preload_libraries = $preload
			max_connections = 200
			max_prepared_transactions = 200
			billing.database = 'billing'
			log_min_messages = warning
			log_line_prefix = '%m [%p] $n '
			${CITUS_LAB_CONF:-}
		EOF
		if [[ $n != single ]]; then
			as_pg tee -a "$LAB/$n/postgresql.conf" >/dev/null <<-EOF
				citus.enable_unsafe_triggers = on
				citus.node_conninfo = 'sslmode=disable'
			EOF
		fi
	done
	"$0" start
	for n in "${nodes[@]}"; do
		psql_node "$n" -d postgres -c "CREATE DATABASE billing"
	done
	for n in coord w1 w2; do
		psql_node "$n" -d billing -c "CREATE EXTENSION citus"
	done
	psql_node coord -d billing <<-EOF
		SELECT citus_set_coordinator_host('127.0.0.1', $(port_of coord));
		SELECT citus_add_node('127.0.0.1', $(port_of w1));
		SELECT citus_add_node('127.0.0.1', $(port_of w2));
	EOF
	echo "lab: coordinator $(port_of coord), workers $(port_of w1) $(port_of w2), single $(port_of single); socket $SOCK"
	;;
start)
	for n in "${nodes[@]}"; do
		[[ -d $LAB/$n ]] || die "no lab in $LAB: run init"
		as_pg "$PGBIN/pg_ctl" -D "$LAB/$n" status >/dev/null 2>&1 || pg_ctl_node "$n" start >/dev/null
	done
	;;
stop)
	for n in "${nodes[@]}"; do
		if [[ -d $LAB/$n ]] && as_pg "$PGBIN/pg_ctl" -D "$LAB/$n" status >/dev/null 2>&1; then
			pg_ctl_node "$n" stop -m fast >/dev/null
		fi
	done
	;;
billing)
	ntenants=${1:-100}
	for n in "${nodes[@]}"; do
		psql_node "$n" -d postgres -c "DROP DATABASE IF EXISTS billing WITH (FORCE)" -c "CREATE DATABASE billing"
	done
	for n in coord w1 w2; do
		psql_node "$n" -d billing -c "CREATE EXTENSION citus"
	done
	psql_node coord -d billing -Atq <<-EOF
		SELECT citus_set_coordinator_host('127.0.0.1', $(port_of coord));
		SELECT citus_add_node('127.0.0.1', $(port_of w1));
		SELECT citus_add_node('127.0.0.1', $(port_of w2));
		CREATE EXTENSION billing;
		SELECT billing.citus_distribute();
	EOF
	psql_node single -d billing -c "CREATE EXTENSION billing"
	for n in coord single; do
		# one statement per call: Citus delegates each to the tenant's node
		psql_node "$n" -d billing -Atq >/dev/null <<-EOF
			SELECT format('SELECT billing_account_create(%L)', 't' || i) FROM generate_series(1, $ntenants) i \gexec
			SELECT format('SELECT billing_credit(%L, 1000000, %L)', 't' || i, 'seed-' || i) FROM generate_series(1, $ntenants) i \gexec
		EOF
	done
	;;
restart-node)
	pg_ctl_node "${1:?node}" restart -m fast >/dev/null
	;;
psql)
	n=${1:?node}
	shift
	psql_node "$n" "$@"
	;;
*)
	sed -n '2,18p' "$0" >&2
	exit 1
	;;
esac

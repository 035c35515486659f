#!/usr/bin/env bash
# What one apply of a tenant snapshot costs inside redis-server: the
# worker's EVALSHA of lua/apply_snapshot.lua, against a bare EVALSHA with the
# same arguments (a script that only returns 1), on an otherwise idle
# redis-server of its own.
#
#   bash bench/lua_apply.sh            # LUA_CALLS=100000 LUA_TENANTS=1000 LUA_PORT=63997
#
# Every call is a tenant hash with its four pending keys and 13 fields (a
# tenant without limits, as bench/setup.sql creates them), versions rising,
# spread over LUA_TENANTS tenants, sent pipelined with redis-cli --pipe.
# Prints per call Redis' own usec_per_call of EVALSHA (INFO commandstats)
# and redis-server's CPU time (from /proc: reading the commands and writing
# the replies included); the difference to the bare script is the script's
# work.  Needs redis-server and redis-cli (test/deps.sh installs them).
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
calls=${LUA_CALLS:-100000}
tenants=${LUA_TENANTS:-1000}
port=${LUA_PORT:-63997}
dir=$(mktemp -d)

cleanup() {
	redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
	rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
	--dir "$dir" --daemonize yes --logfile "$dir/redis.log"
for _ in $(seq 50); do
	[[ $(redis-cli -p "$port" ping 2>/dev/null) == PONG ]] && break
	sleep 0.1
done
pid=$(redis-cli -p "$port" INFO server | tr -d '\r' | sed -n 's/^process_id://p')

# commands SHA -> RESP of $calls EVALSHA calls on stdout
commands() {
	awk -v n="$calls" -v t="$tenants" -v sha="$1" 'function arg(s) { printf "$%d\r\n%s\r\n", length(s), s }
	BEGIN {
		split("status active currency USD balance 999123456 credit_limit 0 holds 0 available 999123456 " \
		      "day_requests 12 day_spend 123456 month_requests 55 month_spend 1234567 " \
		      "day_resets_at_ms 1763856000000 month_resets_at_ms 1764547200000 synced_at_ms 1763800000000", f, " ")
		for (i = 1; i <= n; i++) {
			h = "bench:{t" (i % t) "}"
			printf "*%d\r\n", 3 + 5 + 2 + 26
			arg("EVALSHA"); arg(sha); arg("5")
			arg(h); arg(h ":pending"); arg(h ":pending_amt"); arg(h ":pending_ver"); arg(h ":pending_key")
			arg(i ""); arg("0")
			for (j = 1; j <= 26; j++) arg(f[j])
		}
	}'
}

# CPU time (user + system, clock ticks) of redis-server so far
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat"; }

measure() { # measure NAME SCRIPT-FILE
	local sha us t0 t1
	sha=$(redis-cli -p "$port" -x SCRIPT LOAD <"$2")
	redis-cli -p "$port" FLUSHALL >/dev/null
	redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
	commands "$sha" >"$dir/commands"
	t0=$(ticks)
	redis-cli -p "$port" --pipe <"$dir/commands" >/dev/null
	t1=$(ticks)
	us=$(redis-cli -p "$port" INFO commandstats | tr -d '\r' |
		sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
	awk -v name="$1" -v us="$us" -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v n="$calls" \
		'BEGIN { printf "%-32s %6.2f us in the call, %6.2f us of redis-server CPU per call\n", name, us, t / hz * 1e6 / n }'
}

echo 'return 1' >"$dir/bare.lua"
echo "# $calls pipelined EVALSHA calls, 5 keys + 28 arguments each, on $tenants tenants (redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'))"
measure "bare EVALSHA (return 1)" "$dir/bare.lua"
measure "lua/apply_snapshot.lua" "$repo/lua/apply_snapshot.lua"
measure "bare EVALSHA (return 1), again" "$dir/bare.lua"
measure "lua/apply_snapshot.lua, again" "$repo/lua/apply_snapshot.lua"

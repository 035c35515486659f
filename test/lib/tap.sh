# test/lib/tap.sh -- sourced by the long integration scripts (redis_sync.sh,
# fault.sh): TAP-style result lines, counters and polling.
#
#   ok DESCRIPTION / not_ok DESCRIPTION [DETAIL]...   one result line
#   check DESCRIPTION EXPECTED ACTUAL                  ok if ACTUAL == EXPECTED
#   check_true DESCRIPTION CMD...                      ok if CMD succeeds
#   info TEXT                                          a "# " comment line
#   wait_until TIMEOUT_S CMD...                        poll CMD every 0.1 s
#   tap_summary                                        "N passed, N failed";
#                                                      its status is the verdict
# passed / failed count the results; WAITED_MS is the last wait_until's time.

passed=0 failed=0
WAITED_MS=0

now_ms() {
	local t=${EPOCHREALTIME/./}
	echo $((t / 1000))
}

ok() {
	passed=$((passed + 1))
	echo "ok - $1"
}

not_ok() {
	failed=$((failed + 1))
	echo "not ok - $1"
	shift
	local l
	for l in "$@"; do
		printf '#   %s\n' "$l"
	done
}

check() {
	if [[ $3 == "$2" ]]; then
		ok "$1"
	else
		not_ok "$1" "expected: $2" "     got: $3"
	fi
}

check_true() {
	local d=$1
	shift
	if "$@"; then ok "$d"; else not_ok "$d" "false: $*"; fi
}

info() { echo "# $*"; }

# 0 as soon as CMD succeeds, 1 once TIMEOUT_S (whole seconds) have passed.
wait_until() {
	local t0 deadline
	t0=$(now_ms)
	deadline=$((t0 + ${1%.*} * 1000))
	shift
	while :; do
		if "$@"; then
			WAITED_MS=$(($(now_ms) - t0))
			return 0
		fi
		if (($(now_ms) >= deadline)); then
			WAITED_MS=$(($(now_ms) - t0))
			return 1
		fi
		sleep 0.1
	done
}

tap_summary() {
	echo "$passed passed, $failed failed"
	((failed == 0))
}

#!/usr/bin/env bash
# Static analysis of the C sources: cppcheck and clang-tidy (NOT part of
# `make check`; about a minute).
#
#   bash test/static.sh
#
# Both run with the include paths and -D flags of the real build (taken from
# `make -n`), on src/*.c. Findings in PostgreSQL's own headers are not ours and
# are not shown. Every known false positive is suppressed HERE, each with the
# reason, never in src/; anything else is printed and fails the run.
# Exit 0 = clean, 1 = findings (or a tool failed). STATIC_SHOW_SUPPRESSED=1 lists
# the suppressed false positives too.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cd "$repo"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
t_start=$SECONDS

say() { echo "static: $*"; }

# --- the tools ---------------------------------------------------------------
missing=()
command -v cppcheck >/dev/null 2>&1 || missing+=(cppcheck)
command -v clang-tidy >/dev/null 2>&1 || missing+=(clang-tidy)
if ((${#missing[@]})); then
	if ((EUID == 0)); then
		say "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >/dev/null ||
			{ apt-get update </dev/null >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >/dev/null; }
	else
		say "missing: ${missing[*]} (apt-get install ${missing[*]})" >&2
		exit 1
	fi
fi
bash "$here/deps.sh" # PostgreSQL server headers, hiredis headers

# The -I and -D flags of the real compile command of one object (PGXS adds
# the server include directories, -D_GNU_SOURCE, ...).
mapfile -t cflags < <(make -n -B src/billing.o 2>/dev/null | grep -m1 -- ' -c ' | tr ' ' '\n' | grep -E '^-[ID]')
if ((${#cflags[@]} == 0)); then
	say "could not read the compile flags from make -n" >&2
	exit 1
fi
sources=(src/*.c)
findings=0

# --- cppcheck ----------------------------------------------------------------
# -D__GNUC__ (and the target macros): PostgreSQL's c.h declares
#   pg_attribute_noreturn() and pg_unreachable() only for GCC-compatible
#   compilers. Without them cppcheck does not know that elog(ERROR),
#   ereport(ERROR) and PG_RE_THROW() never return and reports variables set in
#   a PG_TRY() block as uninitialised after PG_END_TRY() (worker.c push_dirty:
#   "Uninitialized variables: snaps, nsnaps"), which is false. A -D also makes
#   cppcheck check this one configuration instead of guessing 12 #ifdef
#   combinations (7 minutes instead of 30 seconds).
# --suppress='*:<server include dir>/*': findings inside PostgreSQL's headers
#   are not ours (e.g. nullPointerRedundantCheck in pg_list.h, where llast_cell()
#   has Assert(list != NIL) before dereferencing list).
# --suppress=missingIncludeSystem: system headers are not analysed.
incdir=$("$PG_CONFIG" --includedir-server)
say "cppcheck $(cppcheck --version | sed 's/^Cppcheck //') on ${#sources[@]} files"
t0=$SECONDS
rc=0
cppcheck --enable=warning,performance,portability --inline-suppr --error-exitcode=1 \
	--quiet --std=c99 -j "$(nproc)" \
	"${cflags[@]}" -D__GNUC__=12 -D__x86_64__ -D__linux__ \
	--suppress=missingIncludeSystem "--suppress=*:$incdir/*" "--suppress=*:/usr/include/*" \
	"${sources[@]}" 2>&1 | tee "${TMPDIR:-/tmp}/billing-cppcheck.$$" || rc=$?
if ((rc != 0)) || [[ -s ${TMPDIR:-/tmp}/billing-cppcheck.$$ ]]; then
	say "cppcheck: FINDINGS (exit $rc)"
	findings=$((findings + 1))
else
	say "cppcheck: clean ($((SECONDS - t0)) s)"
fi
rm -f "${TMPDIR:-/tmp}/billing-cppcheck.$$"

# --- clang-tidy --------------------------------------------------------------
# Checks: the static analyzer, bugprone, cert, misc, performance, portability,
# concurrency and the compiler's own warnings (-Wall -Wextra as in the
# Makefile). Disabled as a whole, because they only flag PostgreSQL idioms:
#   bugprone-easily-swappable-parameters  style: functions taking several int64s
#   bugprone-reserved-identifier, cert-dcl37-c, cert-dcl51-cpp
#                                         _PG_init is the name PostgreSQL requires
#   clang-analyzer-security.insecureAPI.DeprecatedOrUnsafeBufferHandling
#                                         wants C11 Annex K memcpy_s/memset_s for
#                                         every memcpy/memset/snprintf; glibc has none
#   performance-no-int-to-ptr             Datum <-> pointer casts are the fmgr calling
#                                         convention (DatumGetPointer, PointerGetDatum)
#   misc-unused-parameters                PG_FUNCTION_ARGS, hook signatures
checks='-*,clang-diagnostic-*,clang-analyzer-*,bugprone-*,cert-*,misc-*,performance-*,portability-*,concurrency-*'
checks+=',-bugprone-easily-swappable-parameters,-bugprone-reserved-identifier,-cert-dcl37-c,-cert-dcl51-cpp'
checks+=',-clang-analyzer-security.insecureAPI.DeprecatedOrUnsafeBufferHandling,-performance-no-int-to-ptr'
checks+=',-misc-unused-parameters'
warnflags=(-Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
	-Wmissing-prototypes -Wpointer-arith -Wdeclaration-after-statement -Wendif-labels
	-Wmissing-format-attribute -Wformat-security)

# Single findings that are false positives: CHECK|FILE|ERE matched against the
# source line the finding points at (so they survive edits that move lines).
suppressions=(
	# ledger.c billing_deduct_many: tenant_nulls/amount_nulls/trace_nulls are NULL
	# only when arguments 0-2 are NULL, and billing_check_not_null() raised an ERROR
	# for those at the top of the function; the analyzer cannot see that
	# billing_check_not_null (in input.c) does not return for a NULL argument.
	'clang-analyzer-core.NullDereference|src/ledger.c|tenant_nulls\[i\] \|\| amount_nulls\[i\] \|\| trace_nulls\[i\]'
	# ALLOCSET_*_SIZES are PostgreSQL's macros (8 * 1024 etc. in int): constant, no overflow.
	'bugprone-implicit-widening-of-multiplication-result|src/.*\.c|ALLOCSET_[A-Z]+_SIZES'
	# holds.c check_expires_in: 2 * MAX_HOLD_DAYS is 62 in int, then int64 (USECS_PER_DAY).
	'bugprone-implicit-widening-of-multiplication-result|src/holds.c|2 \* MAX_HOLD_DAYS \* USECS_PER_DAY'
	# worker.c ms_to_tv: (ms % 1000) * 1000 < 1,000,000 fits int.
	'bugprone-implicit-widening-of-multiplication-result|src/worker.c|\(ms % 1000\) \* 1000'
	# sync.c billing_sync_status: lags are microseconds (< 2^53), shown as float8
	# milliseconds on purpose; nlags / 2 is the median's index, an integer on purpose.
	'bugprone-narrowing-conversions|src/sync.c|lags\[.*\] / 1000\.0'
	'bugprone-integer-division|src/sync.c|lags\[nlags / 2\] / 1000\.0'
	# worker.c read_script: n <= sizeof(chunk) = 4096 (the fread count).
	'bugprone-narrowing-conversions|src/worker.c|appendBinaryStringInfo\(&buf, chunk, n\)'
	# worker.c read_snapshots: SPI_processed is at most the batch's tenants and
	# their API keys (billing.sync_batch_size <= 100000), far below INT_MAX.
	'bugprone-narrowing-conversions|src/worker.c|n = SPI_processed;'
)

say "clang-tidy $(clang-tidy --version | sed -n 's/.*LLVM version //p') on ${#sources[@]} files"
t0=$SECONDS
tidy_out=$(clang-tidy --quiet -checks="$checks" "${sources[@]}" -- "${cflags[@]}" "${warnflags[@]}" 2>/dev/null) || true
shown=0 suppressed=0 block='' show=0
flush() {
	if [[ -n $block ]] && ((show)); then printf '%s\n' "$block"; fi
	block='' show=0
}
while IFS= read -r line; do
	if [[ $line =~ ^(/[^:]+):([0-9]+):[0-9]+:\ (warning|error):.*\[([^]]+)\]$ ]]; then
		flush
		file=${BASH_REMATCH[1]#"$repo"/} lno=${BASH_REMATCH[2]} check=${BASH_REMATCH[4]}
		src=$(sed -n "${lno}p" "$repo/$file" 2>/dev/null || true)
		hit=0
		for s in "${suppressions[@]}"; do
			IFS='|' read -r s_check s_file s_re <<<"$s"
			if [[ $check == "$s_check" && $file =~ ^$s_file$ ]] && grep -qE -- "$s_re" <<<"$src"; then
				hit=1
				break
			fi
		done
		if ((hit)); then
			suppressed=$((suppressed + 1))
			if [[ ${STATIC_SHOW_SUPPRESSED:-0} == 1 ]]; then echo "suppressed: $file:$lno [$check]"; fi
		else
			shown=$((shown + 1))
			show=1
		fi
		block=$line
	elif [[ -n $block ]]; then
		block+=$'\n'$line
	fi
done <<<"$tidy_out"
flush
if ((shown > 0)); then
	say "clang-tidy: $shown FINDINGS ($suppressed known false positives suppressed, $((SECONDS - t0)) s)"
	findings=$((findings + 1))
else
	say "clang-tidy: clean ($suppressed known false positives suppressed, $((SECONDS - t0)) s)"
fi

say "runtime $((SECONDS - t_start)) s"
if ((findings)); then
	say "FAIL"
	exit 1
fi
say "PASS"

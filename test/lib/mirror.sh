# test/lib/mirror.sh -- sourced by bench/run.sh: "does Redis equal the
# database?" as one comparable text per side (the TAP tests make the same
# comparison with BillingTest::mirror_equals, test/perl/BillingTest.pm).
# Needs the caller's q (psql on the test database) and rc (redis-cli)
# functions.

# The whole mirror, as one line per hash "key field=value ... version=N"
# (sorted, synced_at_ms left out): from the database ...
SNAP_SQL="SELECT line FROM (
          SELECT CASE WHEN s.key_id IS NULL THEN format('billing:{%s}', s.tenant_id)
                      ELSE format('billing:{%s}:key:%s', s.tenant_id, s.key_id) END
             || ' ' || (SELECT string_agg(p, ' ' ORDER BY p COLLATE \"C\")
                          FROM (SELECT s.fields[i] || '=' || s.fields[i + 1] AS p
                                  FROM generate_series(1, array_length(s.fields, 1), 2) AS i
                                 WHERE s.fields[i] <> 'synced_at_ms'
                                UNION ALL
                                SELECT 'version=' || s.version) AS x) AS line
            FROM billing.sync_snapshot(NULL, '', 1000000) AS s) AS l
           ORDER BY line COLLATE \"C\""
# ... and from Redis (HGETALL of the same keys, in the same order).
DUMP_LUA='local out = {}
for _, k in ipairs(KEYS) do
  local h = redis.call("HGETALL", k)
  local p = {}
  for i = 1, #h, 2 do
    if h[i] ~= "synced_at_ms" then p[#p + 1] = h[i] .. "=" .. h[i + 1] end
  end
  table.sort(p)
  out[#out + 1] = k .. " " .. table.concat(p, " ")
end
return out'

# converged: true iff Redis equals the database (every account, every key;
# test/perl/BillingMirror.pm settles the counters of a period that ended).
# Needs $repo, the source tree.
CONV_DB='' CONV_REDIS=''
converged() {
	local keys=() settled
	CONV_REDIS=''
	CONV_DB=$(q -c "$SNAP_SQL" 2>/dev/null) || return 1
	if [[ -n $CONV_DB ]]; then
		mapfile -t keys < <(cut -d' ' -f1 <<<"$CONV_DB")
	fi
	CONV_REDIS=$(rc --raw EVAL "$DUMP_LUA" "${#keys[@]}" "${keys[@]}" 2>/dev/null) || return 1
	# a day or month that ended since the push is not drift (as for the worker)
	settled=$(perl -I"$repo/test/perl" -MBillingMirror -e 'local $/; my @t = map { open my $f, "<", $_ or die "$_: $!"; scalar <$f> } @ARGV;
		print BillingMirror::settle_ended_periods(@t)' <(printf '%s' "$CONV_DB") <(printf '%s' "$CONV_REDIS")) || return 1
	CONV_REDIS=$settled
	[[ $CONV_DB == "$CONV_REDIS" ]]
}

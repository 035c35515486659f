-- billing: charge.lua -- quota check and reservation of one charge, run by an
-- API gateway before it calls billing_deduct(..., trace_id).
--
-- KEYS[1]      tenant snapshot hash billing:{T}
-- KEYS[2..5]   billing:{T}:pending (zset), :pending_amt, :pending_ver, :pending_key
-- KEYS[6]      optional: API key hash billing:{T}:key:K
-- ARGV[1]      trace id (non-empty)
-- ARGV[2]      amount in micro-units (positive integer)
-- ARGV[3]      now_ms (epoch ms, integer >= 0): the gateway's clock
-- ARGV[4]      ttl_ms (positive integer): how long an unsettled reservation counts
-- ARGV[5]      API key id: required iff KEYS[6] is given ('' = none)
--
-- Time: reservations live by Redis' clock (TIME): a reservation expires at
-- Redis time + ttl_ms, and is purged and stops counting once Redis' clock
-- passes it, whatever the gateways' clocks say.  now_ms only ever makes a
-- check stricter: day and month counters start over once both clocks have
-- passed the reset time, and grant credit is gone once either clock has
-- passed its expiry (grants_expiries).
--
-- Returns (integers as integer replies):
--   {'NO_STATE'}                                   no tenant snapshot
--   {'OK', available_after, 'replay'}              trace already reserved (counts once;
--                                                  whatever changed since, as in the database)
--   {'SUSPENDED', status}                          status is not 'active'
--   {'QUOTA_EXCEEDED', 'max_charge', limit, amount}
--   {'QUOTA_EXCEEDED', 'daily_requests' | 'monthly_requests', quota, used}
--   {'QUOTA_EXCEEDED', 'daily_spend' | 'monthly_spend', cap, used}
--   {'NO_STATE', 'key'}                            no key snapshot
--   {'KEY_INACTIVE', status}                       key status is not 'active'
--   {'KEY_BUDGET_EXCEEDED', budget, used}
--   {'INSUFFICIENT', amount, available - expired - pending}
--   {'OK', available_after}                        reserved
-- `used` is the consumption before this request (requests: count; spend and
-- budget: micro-units, open holds and pending reservations included); the
-- request is refused when used + it > the limit.  Sums for these checks
-- saturate at 2^53 (beyond any limit Lua can hold), so a huge counter is a
-- refusal, not an error.  `expired`: grant credit the snapshot still counts
-- in available whose expiry has passed since (grants_expiries).
-- Errors: BADARGS <what>; BADSTATE <field> for a malformed stored value.

local MAX = 9007199254740991 -- 2^53 - 1: Lua numbers are exact up to here
local BATCH = 500            -- arguments per command (unpack has a C stack limit)
local PURGE_MAX = 1000       -- expired reservations removed per call (the rest are ignored)

-- Errors travel as tagged strings (Redis 7 turns error tables into strings
-- inside pcall) and leave as error replies whose first word is the code.
local TAG = 'billing-lua:'
local function fail(code, msg) error(TAG .. code .. ' ' .. msg, 0) end

-- Strict integer: optional '-', decimal digits only, |n| <= 2^53 - 1.
local function int(s)
	if type(s) ~= 'string' or #s == 0 or #s > 17 or not string.find(s, '^%-?%d+$') then
		return nil
	end
	local n = tonumber(s)
	if n > MAX or n < -MAX then return nil end
	return n
end

local function str(n) return string.format('%.0f', n) end

local function arg_int(i, name, min)
	local n = int(ARGV[i])
	if not n or n < min then
		fail('BADARGS', name .. (min > 0 and ' must be a positive integer' or ' must be a non-negative integer'))
	end
	return n
end

-- Sum that refuses to leave the exact range.
local function add(a, b)
	local s = a + b
	if s > MAX or s < -MAX then fail('BADSTATE', 'sum exceeds 2^53') end
	return s
end

-- Sum of non-negative usage for a limit check: saturates at 2^53, which is
-- over any limit (limits are at most 2^53 - 1; the worker clamps to that).
local function usage(a, b)
	local s = a + b
	if s > MAX then return MAX + 1 end
	return s
end

-- HMGET into a table; numeric fields parsed on access by num().
local function load(key, fields)
	local vals = redis.call('HMGET', key, unpack(fields))
	local t = {}
	for i, f in ipairs(fields) do
		if vals[i] then t[f] = vals[i] end
	end
	return t
end

-- Redis' clock, epoch ms
local function redis_now()
	local t = redis.call('TIME')
	return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Grant credit of the snapshot that has expired by `at`: the entries
-- "ms:amount,..." of grants_expiries (or grants_expire_at_ms with
-- grants_expire_amount alone) whose time is <= at.
local function expired_credit(t, at)
	local sum = 0
	local list = t.grants_expiries
	if list == nil then
		if t.grants_expire_at_ms == nil then return 0 end
		list = t.grants_expire_at_ms .. ':' .. (t.grants_expire_amount or '')
	end
	if #list > 4096 then fail('BADSTATE', 'tenant grants_expiries') end
	for entry in string.gmatch(list, '[^,]+') do
		local ms, amount = string.match(entry, '^(%d+):(%d+)$')
		local when, a = int(ms), int(amount)
		if not when or not a then fail('BADSTATE', 'tenant grants_expiries') end
		if when <= at then sum = add(sum, a) end
	end
	return sum
end

-- Optional integer field: nil if absent, BADSTATE if malformed.
local function num(t, f, what)
	local v = t[f]
	if v == nil then return nil end
	local n = int(v)
	if not n then fail('BADSTATE', what .. ' ' .. f) end
	return n
end

local function main()
	-- TIME before writes: Redis 3.2/4 need effects replication (5+ default to it)
	if redis.replicate_commands and not redis.REDIS_VERSION_NUM then pcall(redis.replicate_commands) end
	if #KEYS ~= 5 and #KEYS ~= 6 then
		fail('BADARGS', 'expected 5 keys (tenant, pending, pending_amt, pending_ver, pending_key) + optional key hash, got ' .. #KEYS)
	end
	if #ARGV < 4 or #ARGV > 5 then fail('BADARGS', 'expected trace, amount, now_ms, ttl_ms [, key_id]') end
	local trace = ARGV[1]
	if trace == '' then fail('BADARGS', 'trace id must not be empty') end
	local amount = arg_int(2, 'amount', 1)
	local now = arg_int(3, 'now_ms', 0)
	local ttl = arg_int(4, 'ttl_ms', 1)
	local key_id = ARGV[5]
	if key_id == '' then key_id = nil end
	local keyed = #KEYS == 6
	if keyed and not key_id then fail('BADARGS', 'key id (ARGV[5]) is required with a key hash (KEYS[6])') end
	if key_id and not keyed then fail('BADARGS', 'key id (ARGV[5]) given without a key hash (KEYS[6])') end

	local th, pz, pamt, pver, pkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
	local rnow = redis_now()
	local now_s = str(rnow)

	-- 1. purge expired reservations (score <= Redis' now) from all four structures
	local expired = redis.call('ZRANGEBYSCORE', pz, '-inf', now_s, 'LIMIT', 0, PURGE_MAX)
	for i = 1, #expired, BATCH do
		local j = math.min(i + BATCH - 1, #expired)
		redis.call('ZREM', pz, unpack(expired, i, j))
		redis.call('HDEL', pamt, unpack(expired, i, j))
		redis.call('HDEL', pver, unpack(expired, i, j))
		redis.call('HDEL', pkey, unpack(expired, i, j))
	end

	-- 2. tenant state
	if redis.call('EXISTS', th) == 0 then return { 'NO_STATE' } end
	local t = load(th, {
		'status', 'available', 'holds', 'max_charge',
		'daily_requests_quota', 'monthly_requests_quota', 'daily_spend_cap', 'monthly_spend_cap',
		'day_requests', 'day_spend', 'month_requests', 'month_spend',
		'day_resets_at_ms', 'month_resets_at_ms',
		'grants_expiries', 'grants_expire_at_ms', 'grants_expire_amount',
	})
	local available = num(t, 'available', 'tenant')
	if not available then fail('BADSTATE', 'tenant available missing') end
	-- expired grant credit is not spendable, pushed again or not
	available = add(available, -expired_credit(t, math.max(now, rnow)))

	-- 3. live reservations (score > Redis' now; settled ones have score +inf)
	local score = redis.call('ZSCORE', pz, trace)
	local replay = score and tonumber(score) > rnow
	local live = redis.call('ZRANGEBYSCORE', pz, '(' .. now_s, '+inf')
	local psum, pcount, ksum = 0, #live, 0
	for i = 1, #live, BATCH do
		local j = math.min(i + BATCH - 1, #live)
		local amts = redis.call('HMGET', pamt, unpack(live, i, j))
		local kids = keyed and redis.call('HMGET', pkey, unpack(live, i, j)) or {}
		for n = 1, j - i + 1 do
			local a = int(amts[n])
			if not a then fail('BADSTATE', 'pending_amt of ' .. live[i + n - 1]) end
			psum = add(psum, a)
			if keyed and kids[n] == key_id then ksum = add(ksum, a) end
		end
	end
	if replay then return { 'OK', add(available, -psum), 'replay' } end
	if t.status ~= 'active' then return { 'SUSPENDED', t.status or '' } end

	-- 4. tenant limits
	local max_charge = num(t, 'max_charge', 'tenant')
	if max_charge and amount > max_charge then
		return { 'QUOTA_EXCEEDED', 'max_charge', max_charge, amount }
	end
	-- a period is over once both clocks say so
	local clock = math.min(now, rnow)
	local day_end = num(t, 'day_resets_at_ms', 'tenant')
	local month_end = num(t, 'month_resets_at_ms', 'tenant')
	local day_over = day_end ~= nil and clock >= day_end
	local month_over = month_end ~= nil and clock >= month_end
	local function counter(f, over)
		local v = num(t, f, 'tenant')
		if over or not v then return 0 end
		return v
	end
	local day_requests, day_spend = counter('day_requests', day_over), counter('day_spend', day_over)
	local month_requests, month_spend = counter('month_requests', month_over), counter('month_spend', month_over)
	local holds = num(t, 'holds', 'tenant') or 0

	local q = num(t, 'daily_requests_quota', 'tenant')
	if q then
		local used = usage(day_requests, pcount)
		if used + 1 > q then return { 'QUOTA_EXCEEDED', 'daily_requests', q, used } end
	end
	q = num(t, 'monthly_requests_quota', 'tenant')
	if q then
		local used = usage(month_requests, pcount)
		if used + 1 > q then return { 'QUOTA_EXCEEDED', 'monthly_requests', q, used } end
	end
	q = num(t, 'daily_spend_cap', 'tenant')
	if q then
		local used = usage(usage(day_spend, holds), psum)
		if usage(used, amount) > q then return { 'QUOTA_EXCEEDED', 'daily_spend', q, used } end
	end
	q = num(t, 'monthly_spend_cap', 'tenant')
	if q then
		local used = usage(usage(month_spend, holds), psum)
		if usage(used, amount) > q then return { 'QUOTA_EXCEEDED', 'monthly_spend', q, used } end
	end

	-- 5. API key
	if keyed then
		local kh = KEYS[6]
		if redis.call('EXISTS', kh) == 0 then return { 'NO_STATE', 'key' } end
		local k = load(kh, { 'status', 'budget', 'period', 'spent', 'holds', 'resets_at_ms' })
		if k.status ~= 'active' then return { 'KEY_INACTIVE', k.status or '' } end
		local budget = num(k, 'budget', 'key')
		if budget then
			local resets = num(k, 'resets_at_ms', 'key')
			local spent = num(k, 'spent', 'key') or 0
			if k.period ~= 'lifetime' and resets and clock >= resets then spent = 0 end
			-- the key's open holds count, as in the database
			local used = usage(usage(spent, num(k, 'holds', 'key') or 0), ksum)
			if usage(used, amount) > budget then return { 'KEY_BUDGET_EXCEEDED', budget, used } end
		end
	end

	-- 6. funds
	local free = add(available, -psum)
	if amount > free then return { 'INSUFFICIENT', amount, free } end

	-- 7. reserve, until Redis' now + ttl
	redis.call('ZADD', pz, str(rnow + ttl), trace)
	redis.call('HSET', pamt, trace, str(amount))
	redis.call('HDEL', pver, trace)
	if keyed then
		redis.call('HSET', pkey, trace, key_id)
	else
		redis.call('HDEL', pkey, trace)
	end
	return { 'OK', free - amount }
end

local ok, res = pcall(main)
if ok then return res end
if type(res) == 'string' then
	if string.sub(res, 1, #TAG) == TAG then return redis.error_reply(string.sub(res, #TAG + 1)) end
	if string.find(res, '^%u+ ') then return redis.error_reply(res) end -- a Redis error (WRONGTYPE ...)
end
if type(res) == 'table' and res.err then return res end
error(res)

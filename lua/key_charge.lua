-- billing: key_charge.lua -- API key budget check and reservation alone (no
-- tenant status, quota or funds check), for gateways that meter per key.
-- The reservation goes into the tenant's pending structures, so charge.lua
-- counts it against the tenant as well.
--
-- KEYS[1]      API key hash billing:{T}:key:K
-- KEYS[2..5]   billing:{T}:pending (zset), :pending_amt, :pending_ver, :pending_key
-- ARGV[1]      trace id (non-empty)
-- ARGV[2]      amount in micro-units (positive integer)
-- ARGV[3]      now_ms (epoch ms, integer >= 0): the gateway's clock
-- ARGV[4]      ttl_ms (positive integer): how long an unsettled reservation counts
-- ARGV[5]      API key id K (non-empty)
--
-- Time, as in charge.lua: reservations live by Redis' clock (TIME); the
-- key's budget period starts over once both clocks have passed resets_at_ms.
--
-- Returns (integers as integer replies):
--   {'NO_STATE', 'key'}                      no key snapshot
--   {'OK', remaining, 'replay'}              trace already reserved (counts once;
--                                            whatever changed since)
--   {'KEY_INACTIVE', status}                 key status is not 'active'
--   {'KEY_BUDGET_EXCEEDED', budget, used}    used = spent + key's open holds + its
--                                            pending, before this request
--   {'OK', remaining}                        reserved
-- remaining = budget - used (this reservation included), or -1 when the key
-- has no budget.  Sums for the budget check saturate at 2^53 (over any budget).
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

local function add(a, b)
	local s = a + b
	if s > MAX or s < -MAX then fail('BADSTATE', 'sum exceeds 2^53') end
	return s
end

-- Sum of non-negative usage for the budget check: saturates at 2^53, which
-- is over any budget (at most 2^53 - 1; the worker clamps to that).
local function usage(a, b)
	local s = a + b
	if s > MAX then return MAX + 1 end
	return s
end

local function main()
	-- TIME before writes: Redis 3.2/4 need effects replication (5+ default to it)
	if redis.replicate_commands and not redis.REDIS_VERSION_NUM then pcall(redis.replicate_commands) end
	if #KEYS ~= 5 then
		fail('BADARGS', 'expected 5 keys (key hash, pending, pending_amt, pending_ver, pending_key), got ' .. #KEYS)
	end
	if #ARGV ~= 5 then fail('BADARGS', 'expected trace, amount, now_ms, ttl_ms, key_id') end
	local trace = ARGV[1]
	if trace == '' then fail('BADARGS', 'trace id must not be empty') end
	local amount = arg_int(2, 'amount', 1)
	local now = arg_int(3, 'now_ms', 0)
	local ttl = arg_int(4, 'ttl_ms', 1)
	local key_id = ARGV[5]
	if key_id == '' then fail('BADARGS', 'key id must not be empty') end

	local kh, pz, pamt, pver, pkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
	local t = redis.call('TIME')
	local rnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
	local now_s = str(rnow)

	-- purge expired reservations (score <= Redis' now) from all four structures
	local expired = redis.call('ZRANGEBYSCORE', pz, '-inf', now_s, 'LIMIT', 0, PURGE_MAX)
	for i = 1, #expired, BATCH do
		local j = math.min(i + BATCH - 1, #expired)
		redis.call('ZREM', pz, unpack(expired, i, j))
		redis.call('HDEL', pamt, unpack(expired, i, j))
		redis.call('HDEL', pver, unpack(expired, i, j))
		redis.call('HDEL', pkey, unpack(expired, i, j))
	end

	if redis.call('EXISTS', kh) == 0 then return { 'NO_STATE', 'key' } end
	local v = redis.call('HMGET', kh, 'status', 'budget', 'period', 'spent', 'resets_at_ms', 'holds')
	local status, period = v[1], v[3]
	local function num(i, f)
		if not v[i] then return nil end
		local n = int(v[i])
		if not n then fail('BADSTATE', 'key ' .. f) end
		return n
	end
	local budget, spent, resets = num(2, 'budget'), num(4, 'spent') or 0, num(5, 'resets_at_ms')
	local holds = num(6, 'holds') or 0
	if period ~= 'lifetime' and resets and math.min(now, rnow) >= resets then spent = 0 end

	-- this key's live reservations (score > Redis' now; settled ones have score +inf)
	local score = redis.call('ZSCORE', pz, trace)
	local replay = score and tonumber(score) > rnow
	local live = redis.call('ZRANGEBYSCORE', pz, '(' .. now_s, '+inf')
	local ksum = 0
	for i = 1, #live, BATCH do
		local j = math.min(i + BATCH - 1, #live)
		local kids = redis.call('HMGET', pkey, unpack(live, i, j))
		local amts = redis.call('HMGET', pamt, unpack(live, i, j))
		for n = 1, j - i + 1 do
			if kids[n] == key_id then
				local a = int(amts[n])
				if not a then fail('BADSTATE', 'pending_amt of ' .. live[i + n - 1]) end
				ksum = add(ksum, a)
			end
		end
	end
	local used = usage(usage(spent, holds), ksum)
	if replay then
		return { 'OK', budget and budget - used or -1, 'replay' }
	end
	if status ~= 'active' then return { 'KEY_INACTIVE', status or '' } end
	if budget and usage(used, amount) > budget then
		return { 'KEY_BUDGET_EXCEEDED', budget, used }
	end

	redis.call('ZADD', pz, str(rnow + ttl), trace)
	redis.call('HSET', pamt, trace, str(amount))
	redis.call('HDEL', pver, trace)
	redis.call('HSET', pkey, trace, key_id)
	return { 'OK', budget and budget - used - amount or -1 }
end

local ok, res = pcall(main)
if ok then return res end
if type(res) == 'string' then
	if string.sub(res, 1, #TAG) == TAG then return redis.error_reply(string.sub(res, #TAG + 1)) end
	if string.find(res, '^%u+ ') then return redis.error_reply(res) end -- a Redis error (WRONGTYPE ...)
end
if type(res) == 'table' and res.err then return res end
error(res)

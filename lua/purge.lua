-- billing: purge.lua -- removes a tenant's gateway reservations that are
-- over: those that expired unsettled (by Redis' clock, TIME), and with the
-- tenant hash those settled at a version the hash already holds.  The
-- worker runs it for every account every billing.purge_interval (gateways'
-- charge.lua and key_charge.lua purge expired reservations of the tenants
-- they charge; an account nobody charges any more would keep them).
--
-- KEYS[1..4]   billing:{T}:pending (zset), :pending_amt, :pending_ver, :pending_key
-- KEYS[5]      optional: the tenant hash billing:{T}
-- ARGV         none
--
-- Returns the number of reservations removed (from all four structures; at
-- most PURGE_MAX expired ones per call, the rest at the next one).  Every
-- read comes before the first write: a key of the wrong type fails the
-- script before it changes anything.
-- Errors: BADARGS <what>.

local MAX = 9007199254740991 -- 2^53 - 1: Lua numbers are exact up to here
local BATCH = 500            -- arguments per command (unpack has a C stack limit)
local PURGE_MAX = 10000      -- expired reservations removed per call

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

local function call_batched(cmd, key, list)
	for i = 1, #list, BATCH do
		redis.call(cmd, key, unpack(list, i, math.min(i + BATCH - 1, #list)))
	end
end

local function main()
	-- TIME before writes: Redis 3.2/4 need effects replication (5+ default to it)
	if redis.replicate_commands and not redis.REDIS_VERSION_NUM then pcall(redis.replicate_commands) end
	if #KEYS ~= 4 and #KEYS ~= 5 then
		fail('BADARGS', 'expected 4 keys (pending, pending_amt, pending_ver, pending_key) + optional tenant hash, got ' .. #KEYS)
	end
	if #ARGV ~= 0 then fail('BADARGS', 'expected no arguments') end
	local pz, pamt, pver, pkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

	local t = redis.call('TIME')
	local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
	local done = redis.call('ZRANGEBYSCORE', pz, '-inf', string.format('%.0f', now), 'LIMIT', 0, PURGE_MAX)
	if KEYS[5] then
		local stored = int(redis.call('HGET', KEYS[5], 'version'))
		if stored then
			local settled = redis.call('HGETALL', pver)
			for i = 1, #settled, 2 do
				local v = int(settled[i + 1])
				if v and v <= stored then done[#done + 1] = settled[i] end
			end
		end
	end
	if #done == 0 then return 0 end
	-- the other pending keys, read before any write
	redis.call('HLEN', pamt)
	redis.call('HLEN', pver)
	redis.call('HLEN', pkey)
	local before = redis.call('ZCARD', pz)
	call_batched('ZREM', pz, done)
	call_batched('HDEL', pamt, done)
	call_batched('HDEL', pver, done)
	call_batched('HDEL', pkey, done)
	return before - redis.call('ZCARD', pz)
end

local ok, res = pcall(main)
if ok then return res end
if type(res) == 'string' then
	if string.sub(res, 1, #TAG) == TAG then return redis.error_reply(string.sub(res, #TAG + 1)) end
	if string.find(res, '^%u+ ') then return redis.error_reply(res) end -- a Redis error (WRONGTYPE ...)
end
if type(res) == 'table' and res.err then return res end
error(res)

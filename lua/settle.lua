-- billing: settle.lua -- records the database outcome of a reserved charge,
-- run by the gateway after billing_deduct(..., trace_id).
--
-- KEYS[1..4]   billing:{T}:pending (zset), :pending_amt, :pending_ver, :pending_key
-- KEYS[5]      optional (recommended): tenant snapshot hash billing:{T}
-- ARGV[1]      trace id (non-empty)
-- ARGV[2]      version: > 0 = committed at that account version (the `version`
--              column billing_deduct returned); 0 = the database refused it
--
-- version > 0: pending_ver[trace] = version and the reservation stops expiring
--   (zset score +inf): it keeps counting until apply_snapshot applies a tenant
--   snapshot with version >= it, which removes it. With KEYS[5], if the stored
--   snapshot already has version >= it, the reservation is removed at once
--   (that snapshot already contains the charge).
-- version = 0: the reservation is removed at once.
-- Returns 1 if the trace was pending, else 0 (nothing changed: never reserved,
-- already removed by a snapshot, or expired and purged).
-- Errors: BADARGS <what>.

local MAX = 9007199254740991 -- 2^53 - 1: Lua numbers are exact up to here

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

local function main()
	if #KEYS ~= 4 and #KEYS ~= 5 then
		fail('BADARGS', 'expected 4 keys (pending, pending_amt, pending_ver, pending_key) + optional tenant hash, got ' .. #KEYS)
	end
	if #ARGV ~= 2 then fail('BADARGS', 'expected trace, version') end
	local trace = ARGV[1]
	if trace == '' then fail('BADARGS', 'trace id must not be empty') end
	local version = int(ARGV[2])
	if not version or version < 0 then fail('BADARGS', 'version must be a non-negative integer') end

	local pz, pamt, pver, pkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
	if not redis.call('ZSCORE', pz, trace) then return 0 end

	local drop = version == 0
	if not drop and KEYS[5] then
		local stored = int(redis.call('HGET', KEYS[5], 'version'))
		drop = stored ~= nil and stored >= version
	end
	if drop then
		redis.call('ZREM', pz, trace)
		redis.call('HDEL', pamt, trace)
		redis.call('HDEL', pver, trace)
		redis.call('HDEL', pkey, trace)
		return 1
	end

	-- A second settle of the same trace keeps the higher version.
	local prev = int(redis.call('HGET', pver, trace))
	if prev and prev > version then version = prev end
	redis.call('HSET', pver, trace, str(version))
	redis.call('ZADD', pz, 'XX', '+inf', trace)
	return 1
end

local ok, res = pcall(main)
if ok then return res end
if type(res) == 'string' then
	if string.sub(res, 1, #TAG) == TAG then return redis.error_reply(string.sub(res, #TAG + 1)) end
	if string.find(res, '^%u+ ') then return redis.error_reply(res) end -- a Redis error (WRONGTYPE ...)
end
if type(res) == 'table' and res.err then return res end
error(res)

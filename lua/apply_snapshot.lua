-- billing: apply_snapshot.lua -- version-guarded replace of one snapshot hash
-- (tenant hash billing:{T} or API key hash billing:{T}:key:K), run by the
-- background worker.
--
-- KEYS[1]      the snapshot hash
-- KEYS[2..5]   optional, all four or none: the tenant's pending zset,
--              pending_amt, pending_ver, pending_key. Pass them only with the
--              tenant hash: pending_ver holds account versions.
-- ARGV[1]      version (integer >= 0)
-- ARGV[2]      mode: 0 = apply only if newer than the stored version,
--              1 = always (a repair), 2 = apply unless the stored version is
--              newer (a refresh: the same version again, with what expired
--              since left out)
-- ARGV[3..]    field, value pairs; the script writes `version` itself (a
--              `version` pair is allowed only if equal to ARGV[1])
--
-- Returns 0 if stale (not applied: mode 0 and stored version >= ARGV[1], or
-- mode 2 and stored version > ARGV[1]; the hash is not changed), else 1:
-- the hash is replaced.  Replacing is HSET of every
-- field, and only when the hash then holds a field the snapshot does not
-- name (a limit was removed) DEL + HSET: cheaper than rebuilding the hash on
-- every push, with the same result.  A forced push (a repair) also replaces
-- a key of another type than hash.  Either way, with the pending keys, every
-- reservation whose settled version (pending_ver) is <= the version the hash
-- now holds is removed from all four pending structures (a stale push still
-- prunes what settled up to the stored one), and so is every unsettled
-- reservation that expired by Redis' clock (TIME; at most PURGE_MAX per
-- call).  Every read comes before the first write, so a key of the wrong
-- type (other than a forced push's hash) fails the script before it changes
-- anything (Redis does not roll back).
-- Errors: BADARGS <what>.

local MAX = 9007199254740991 -- 2^53 - 1: Lua numbers are exact up to here
local BATCH = 500            -- arguments per command (unpack has a C stack limit)
local PURGE_MAX = 1000       -- expired reservations removed per call

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

-- cmd key list[1..] in commands of at most BATCH arguments (BATCH is even,
-- so field/value pairs stay together)
local function call_batched(cmd, key, list)
	for i = 1, #list, BATCH do
		redis.call(cmd, key, unpack(list, i, math.min(i + BATCH - 1, #list)))
	end
end

local function main()
	-- TIME before writes: Redis 3.2/4 need effects replication (5+ default
	-- to it; 7, which has REDIS_VERSION_NUM, knows nothing else)
	if redis.replicate_commands and not redis.REDIS_VERSION_NUM then pcall(redis.replicate_commands) end
	local nkeys = #KEYS
	if nkeys ~= 1 and nkeys ~= 5 then
		fail('BADARGS', 'expected 1 key (hash) or 5 keys (hash, pending, pending_amt, pending_ver, pending_key), got ' .. nkeys)
	end
	local nargs = #ARGV
	if nargs < 2 then fail('BADARGS', 'expected version, mode, field, value, ...') end
	local version = int(ARGV[1])
	if not version or version < 0 then fail('BADARGS', 'version must be a non-negative integer') end
	local mode = ARGV[2]
	if mode ~= '0' and mode ~= '1' and mode ~= '2' then fail('BADARGS', 'mode must be 0, 1 or 2') end
	if nargs % 2 ~= 0 then fail('BADARGS', 'odd number of field/value arguments') end
	-- the distinct field names, `version` included: the hash must end up
	-- with exactly these
	local vstr = string.format('%.0f', version)
	local seen = {version = true}
	local nfields = 1
	for i = 3, nargs, 2 do
		local f = ARGV[i]
		if f == 'version' then
			if int(ARGV[i + 1]) ~= version then fail('BADARGS', 'field version differs from ARGV[1]') end
			ARGV[i + 1] = vstr
		elseif not seen[f] then
			seen[f] = true
			nfields = nfields + 1
		end
	end

	local hash = KEYS[1]
	local stale = false
	local replace = false -- DEL first: a forced repair of a key that is not a hash
	local stored
	if mode ~= '1' then
		-- (a key of another type fails here, before any write)
		stored = int(redis.call('HGET', hash, 'version'))
		if mode == '0' then
			stale = stored ~= nil and stored >= version
		else
			stale = stored ~= nil and stored > version
		end
	else
		local t = redis.call('TYPE', hash).ok
		replace = t ~= 'hash' and t ~= 'none'
	end
	local done = {}
	-- Nothing to prune without a pending zset or pending_ver (the usual
	-- case: most tenants have no reservation open): one EXISTS instead of
	-- HGETALL, TIME and ZRANGEBYSCORE.  Keys of the wrong type exist, so
	-- they still fail below, before any write.
	if nkeys == 5 and redis.call('EXISTS', KEYS[2], KEYS[4]) > 0 then
		local limit = stale and stored or version
		local settled = redis.call('HGETALL', KEYS[4])
		for i = 1, #settled, 2 do
			local v = int(settled[i + 1])
			if v and v <= limit then done[#done + 1] = settled[i] end
		end
		-- unsettled reservations that expired by Redis' clock (settled ones
		-- have score +inf)
		local t = redis.call('TIME')
		local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
		local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now),
			'LIMIT', 0, PURGE_MAX)
		for i = 1, #expired do done[#done + 1] = expired[i] end
		if #done > 0 then -- the other pending keys, read before any write
			redis.call('ZCARD', KEYS[2])
			redis.call('HLEN', KEYS[3])
			redis.call('HLEN', KEYS[5])
		end
	end

	if not stale then
		-- ARGV becomes the HSET list: version, <version>, field, value, ...
		ARGV[2] = vstr
		ARGV[1] = 'version'
		if replace then redis.call('DEL', hash) end
		call_batched('HSET', hash, ARGV)
		if redis.call('HLEN', hash) ~= nfields then
			redis.call('DEL', hash)
			call_batched('HSET', hash, ARGV)
		end
	end
	if #done > 0 then
		call_batched('ZREM', KEYS[2], done)
		call_batched('HDEL', KEYS[3], done)
		call_batched('HDEL', KEYS[4], done)
		call_batched('HDEL', KEYS[5], done)
	end
	return stale and 0 or 1
end

local ok, res = pcall(main)
if ok then return res end
if type(res) == 'string' then
	if string.sub(res, 1, #TAG) == TAG then return redis.error_reply(string.sub(res, #TAG + 1)) end
	if string.find(res, '^%u+ ') then return redis.error_reply(res) end -- a Redis error (WRONGTYPE ...)
end
if type(res) == 'table' and res.err then return res end
error(res)

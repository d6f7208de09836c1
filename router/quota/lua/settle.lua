-- Apply what upstream answered to a reserved key. Mirrors router/quota/logic.py (settle_on).
--
-- KEYS[1] day map, KEYS[2] disabled map, KEYS[3] clients day map, KEYS[4] the provider's
-- epoch (one hash tag: one slot)
-- ARGV: 1 key, 2 model, 3 fingerprint, 4 day_end_ms, 5 daily_limit (-1 = no cap),
--   6 model_limit (-1 = no cap), 7 now_ms, 8 release (0|1), 9 remaining ('' = none),
--   10 model_remaining ('' = none), 11 exhaust ('' | key | model | ambiguous), 12 near_zero,
--   13 cooldown scope ('' | key | model), 14 base_ms, 15 max_ms, 16 fixed (0|1),
--   17 disable (0|1), 18 disable reason, 19 client ('' = none), 20 free (0|1),
--   21 fair_counted (0|1)
-- Returns {newly_disabled (0|1), exhausted ('' | key | model)[, cooldown_until_ms]}.
-- Anything here but a cooldown that does not end sooner bumps the epoch: reserve.lua then
-- rebuilds its index of available keys (and its pool totals) from the day map.

local MAX_BACKOFF_EXPONENT = 60 -- logic.MAX_BACKOFF_EXPONENT
local day_map, disabled_map, clients_map, epoch_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, model, fingerprint = ARGV[1], ARGV[2], ARGV[3]
local day_end_ms = tonumber(ARGV[4])
local now_ms = tonumber(ARGV[7])

local function cap(arg)
  local v = tonumber(arg)
  if v < 0 then return nil end
  return v
end
local daily_limit, model_limit = cap(ARGV[5]), cap(ARGV[6])

-- Field names: router/quota/keys.py.
local used_f = 'u|' .. key
local model_used_f = 'm|' .. key .. '|' .. model
local exhausted_f = 'x|' .. key
local model_exhausted_f = 'x|' .. key .. '|' .. model

local function fmt(n) return string.format('%d', n) end
local function count(field) return tonumber(redis.call('HGET', day_map, field) or '0') end
local function give_back(map, field)
  local n = tonumber(redis.call('HGET', map, field) or '0')
  redis.call('HSET', map, field, fmt(math.max(n - 1, 0)))
end

-- 1. release: give the call back to the key and to the client, never below zero
local client = ARGV[19]
if ARGV[8] == '1' then
  give_back(day_map, used_f)
  give_back(day_map, model_used_f)
  if client ~= '' then
    if ARGV[21] == '1' then give_back(day_map, 'fu|' .. client) end
    give_back(clients_map, 't|' .. client)
    if ARGV[20] == '1' then give_back(clients_map, 'f|' .. client) end
    redis.call('PEXPIRE', clients_map, fmt(day_end_ms + 86400000 - now_ms))
  end
end

-- 2. header sync: trust upstream's remaining over our count
local exhausted = ''
local function sync(arg, limit, used_field, exhausted_field)
  if arg == '' then return false end
  local remaining = tonumber(arg)
  if limit ~= nil then
    redis.call('HSET', day_map, used_field, fmt(math.max(count(used_field), limit - remaining)))
  end
  if remaining > 0 then return false end
  redis.call('HSET', day_map, exhausted_field, 'upstream-remaining-0')
  return true
end
local key_out = sync(ARGV[9], daily_limit, used_f, exhausted_f)
local model_out = sync(ARGV[10], model_limit, model_used_f, model_exhausted_f)
if key_out then exhausted = 'key' elseif model_out then exhausted = 'model' end

-- 3. exhaust; "ambiguous" decides between the key and only this model
local scope = ARGV[11]
if scope == 'ambiguous' then
  local ambiguous_f = 'a|' .. key
  local first_model = redis.call('HGET', day_map, ambiguous_f)
  local nearly_out = daily_limit ~= nil
    and daily_limit - count(used_f) <= tonumber(ARGV[12])
  -- A second model refused on the same day means the key itself is out.
  if nearly_out or (first_model and first_model ~= model) then
    scope = 'key'
  else
    scope = 'model'
    if not first_model then redis.call('HSET', day_map, ambiguous_f, model) end
  end
end
if scope == 'key' then
  redis.call('HSET', day_map, exhausted_f, '429')
  exhausted = 'key'
elseif scope == 'model' then
  redis.call('HSET', day_map, model_exhausted_f, '429')
  if exhausted == '' then exhausted = 'model' end
end

-- 4. cooldown: "until_ms:strike"; repeats within max_ms double it, never past the reset
local until_ms = nil
local shorter = false
if ARGV[13] ~= '' then
  local field = 'c|' .. key
  if ARGV[13] == 'model' then field = 'c|' .. key .. '|' .. model end
  local base_ms, max_ms = tonumber(ARGV[14]), tonumber(ARGV[15])
  local prev = redis.call('HGET', day_map, field)
  local prev_until, prev_strike = nil, nil
  if prev then
    local u, s = string.match(prev, '^([^:]*):?(.*)$')
    prev_until, prev_strike = tonumber(u), tonumber(s ~= '' and s or '1')
  end
  local strike
  if ARGV[16] == '1' then
    strike = prev_strike or 1
    until_ms = now_ms + base_ms
  else
    strike = 1
    if prev_until ~= nil and now_ms - prev_until < max_ms then strike = prev_strike + 1 end
    local exponent = math.min(strike - 1, MAX_BACKOFF_EXPONENT)
    until_ms = now_ms + math.min(base_ms * 2 ^ exponent, max_ms)
  end
  until_ms = math.min(until_ms, day_end_ms)
  redis.call('HSET', day_map, field, fmt(until_ms) .. ':' .. fmt(strike))
  shorter = prev_until ~= nil and until_ms < prev_until
end

-- The day map may be new here (a call settled after a flush): never leave it without expiry.
-- A duration from the caller's clock, as in reserve.lua (never an instant on Redis's clock).
redis.call('PEXPIRE', day_map, fmt(day_end_ms + 86400000 - now_ms))

-- 5. disable: "fingerprint|reason"; a record for another secret does not count
local newly_disabled = 0
if ARGV[17] == '1' then
  local record = redis.call('HGET', disabled_map, key)
  if not record or string.match(record, '^[^|]*') ~= fingerprint then newly_disabled = 1 end
  redis.call('HSET', disabled_map, key, fingerprint .. '|' .. ARGV[18])
end

if shorter or ARGV[8] == '1' or ARGV[9] ~= '' or ARGV[10] ~= '' or ARGV[11] ~= ''
  or ARGV[17] == '1' then
  redis.call('INCR', epoch_key)
end

return {newly_disabled, exhausted, until_ms}

-- Check the client, pick a key that can serve the model and count one call on both.
-- Mirrors router/quota/selection.py (select_key) and logic.py (reserve_on); keep them in step.
--
-- KEYS[1] day map, KEYS[2] disabled map, KEYS[3] clients day map (one hash tag: one slot)
-- ARGV[1] model, ARGV[2] strategy, ARGV[3] now_ms, ARGV[4] day_end_ms, ARGV[5] n,
-- then per key in config order: name, fingerprint, daily_limit, model_limit (-1 = no cap),
-- then the client: name ('' = none), daily_limit (-1 = no cap), fair share (0|1), below,
-- active_window_ms (-1 = every client counts), m, then m pairs (client, weight).
-- Returns {1, index (0-based), used_after, model_used_after, fair_counted (0|1)}
--      or {0, reason (keys | client_limit | client_share), retry_at_ms (-1 = none),
--          client_limit (-1 = none)}.
-- Numbers are Lua doubles: exact for the integers used here (all below 2^53); the weights
-- and `below` come as Python's repr of the float, which parses back to the same double.

local INF = 9007199254740992 -- 2^53, selection.INF
local DEFAULT_WEIGHT = 1.0 -- logic.DEFAULT_WEIGHT
local day_map, disabled_map, clients_map = KEYS[1], KEYS[2], KEYS[3]
local model = ARGV[1]
local strategy = ARGV[2]
local now_ms = tonumber(ARGV[3])
local day_end_ms = tonumber(ARGV[4])
local n = tonumber(ARGV[5])

local function cap(arg)
  local v = tonumber(arg)
  if v < 0 then return nil end
  return v
end

local function fmt(x) return string.format('%d', x) end

-- Keep yesterday readable for a day, then let the counters expire by themselves. The time to
-- live is a duration from the caller's clock (now_ms), never an instant on Redis's own clock:
-- the two clocks may differ (an injected clock in tests, a skewed host), and PEXPIREAT at an
-- instant Redis thinks is past would delete the counts at once.
local function expire(map) redis.call('PEXPIRE', map, fmt(day_end_ms + 86400000 - now_ms)) end

local function count(map, field) return tonumber(redis.call('HGET', map, field) or '0') end

local c = 5 + n * 4 -- the client's arguments follow the keys'
local client = ARGV[c + 1]
local client_limit = cap(ARGV[c + 2])
local fair = client ~= '' and ARGV[c + 3] == '1'

-- (a) the client's own daily limit: refused before anything is touched
if client ~= '' and client_limit ~= nil and count(clients_map, 't|' .. client) >= client_limit then
  return {0, 'client_limit', -1, client_limit}
end

-- `until_ms` of an "until_ms:strike" value, nil when absent (HMGET gives false).
local function until_of(value)
  if not value then return nil end
  return tonumber(string.match(value, '^[^:]*'))
end

-- Every key's fields in one HMGET of the day map (the round-robin cursor last), and every
-- key's disabled record in one HMGET: two calls, whatever the number of keys.
local wanted, names = {}, {}
for i = 1, n do
  local name = ARGV[5 + (i - 1) * 4 + 1]
  local at = (i - 1) * 6
  names[i] = name
  -- Field names: router/quota/keys.py.
  wanted[at + 1] = 'u|' .. name
  wanted[at + 2] = 'm|' .. name .. '|' .. model
  wanted[at + 3] = 'x|' .. name
  wanted[at + 4] = 'x|' .. name .. '|' .. model
  wanted[at + 5] = 'c|' .. name
  wanted[at + 6] = 'c|' .. name .. '|' .. model
end
wanted[6 * n + 1] = 'rr'
local got = redis.call('HMGET', day_map, unpack(wanted))
local records = {}
if n > 0 then records = redis.call('HMGET', disabled_map, unpack(names)) end

local function view(i)
  local base = 5 + (i - 1) * 4
  local fingerprint = ARGV[base + 2]
  local at = (i - 1) * 6
  local record = records[i]
  return {
    name = names[i],
    used = tonumber(got[at + 1] or '0'),
    limit = cap(ARGV[base + 3]),
    model_used = tonumber(got[at + 2] or '0'),
    model_limit = cap(ARGV[base + 4]),
    exhausted = got[at + 3] ~= false,
    model_exhausted = got[at + 4] ~= false,
    cooling_until = until_of(got[at + 5]),
    model_cooling_until = until_of(got[at + 6]),
    -- Disabled only for the secret it was disabled with: "fingerprint|reason".
    disabled = record ~= false and string.match(record, '^[^|]*') == fingerprint,
  }
end

local views = {}
for i = 1, n do views[i] = view(i) end

-- logic.pool_of: limit and remaining of the keys not disabled; nil when one has no cap
local function pool()
  local limit, left = 0, 0
  for i = 1, n do
    local k = views[i]
    if not k.disabled then
      if k.limit == nil then return nil, nil end
      limit = limit + k.limit
      if not k.exhausted then left = left + math.max(0, k.limit - k.used) end
    end
  end
  return limit, left
end

-- logic.fair_share: the client's weight over those counted, summed in the weights' order
local function fair_share(share_out)
  local window = cap(ARGV[c + 5])
  local m_at = c + 6
  local own, total = nil, 0
  for j = 1, tonumber(ARGV[m_at]) do
    local name, w = ARGV[m_at + 2 * j - 1], tonumber(ARGV[m_at + 2 * j])
    if name == client then
      if own == nil then own = w end
      total = total + w
    elseif window == nil then
      total = total + w
    else
      local seen = redis.call('HGET', clients_map, 's|' .. name)
      if seen and tonumber(seen) >= now_ms - window then total = total + w end
    end
  end
  if own == nil then
    own = DEFAULT_WEIGHT
    total = total + own
  end
  if total <= 0 then return 0 end
  return math.floor(share_out * own / total)
end

-- (b) the fair share of a free pool that runs low (refused after (c): a spent pool says so first)
local fair_counted = 0
local over_share = nil
if fair then
  local limit, left = pool()
  if limit ~= nil then
    local raw = redis.call('HGET', day_map, 'fs')
    local share_out = nil
    if raw then share_out = tonumber(raw) end
    if share_out == nil and left < tonumber(ARGV[c + 4]) * limit then
      share_out = left
      redis.call('HSET', day_map, 'fs', fmt(share_out))
      expire(day_map)
    end
    if share_out ~= nil then
      local share = fair_share(share_out)
      if count(day_map, 'fu|' .. client) >= share then
        over_share = share
      end
      fair_counted = 1
    end
  end
end

local function is_exhausted(k)
  return k.exhausted or k.model_exhausted
    or (k.limit ~= nil and k.used >= k.limit)
    or (k.model_limit ~= nil and k.model_used >= k.model_limit)
end

local function available_at(k)
  local at = nil
  for _, u in ipairs({k.cooling_until or false, k.model_cooling_until or false}) do
    if u and u > now_ms and (at == nil or u > at) then at = u end
  end
  return at
end

local function remaining(k)
  local key_left, model_left = INF, INF
  if k.limit ~= nil then key_left = k.limit - k.used end
  if k.model_limit ~= nil then model_left = k.model_limit - k.model_used end
  return math.min(key_left, model_left)
end

-- (c) select the key
local cursor = tonumber(got[6 * n + 1] or '0') -- read with the keys' fields
local best, best_remaining, retry_at = nil, -1, nil
for j = 0, n - 1 do
  local i = j
  if strategy ~= 'fill_first' then i = (cursor + j) % n end
  local k = views[i + 1]
  if not k.disabled and not is_exhausted(k) then
    local at = available_at(k)
    if at ~= nil then
      if retry_at == nil or at < retry_at then retry_at = at end
    elseif strategy ~= 'most_remaining' then
      best = i
      break
    else
      -- Scanning from the cursor and replacing only on strictly more breaks ties in turn.
      local r = remaining(k)
      if r > best_remaining then best, best_remaining = i, r end
    end
  end
end

if best == nil then
  return {0, 'keys', retry_at or -1, -1}
end
if over_share ~= nil then
  return {0, 'client_share', -1, over_share}
end

-- (d) count the call on the key and on the client
local name = ARGV[5 + best * 4 + 1]
local used = redis.call('HINCRBY', day_map, 'u|' .. name, 1)
local model_used = redis.call('HINCRBY', day_map, 'm|' .. name .. '|' .. model, 1)
if strategy ~= 'fill_first' then
  redis.call('HSET', day_map, 'rr', fmt(best + 1))
end
if client ~= '' then
  redis.call('HINCRBY', clients_map, 't|' .. client, 1)
  redis.call('HSET', clients_map, 's|' .. client, fmt(now_ms))
  if fair then redis.call('HINCRBY', clients_map, 'f|' .. client, 1) end
  if fair_counted == 1 then redis.call('HINCRBY', day_map, 'fu|' .. client, 1) end
  expire(clients_map)
end
expire(day_map)
return {1, best, used, model_used, fair_counted}

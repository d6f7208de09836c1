-- Pick a key that can serve the model and count one call on it.
-- Mirrors router/quota/selection.py (select_key) and logic.py (reserve_on); keep them in step.
--
-- KEYS[1] day map, KEYS[2] disabled map
-- ARGV[1] model, ARGV[2] strategy, ARGV[3] now_ms, ARGV[4] day_end_ms, ARGV[5] n,
-- then per key in config order: name, fingerprint, daily_limit, model_limit (-1 = no cap)
-- Returns {1, index (0-based), used_after, model_used_after} or {0[, retry_at_ms]}.
-- Numbers are Lua doubles: exact for the integers used here (all below 2^53).

local INF = 9007199254740992 -- 2^53, selection.INF
local day_map, disabled_map = KEYS[1], KEYS[2]
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

-- `until_ms` of an "until_ms:strike" value, nil when absent (HMGET gives false).
local function until_of(value)
  if not value then return nil end
  return tonumber(string.match(value, '^[^:]*'))
end

local function view(i)
  local base = 5 + (i - 1) * 4
  local name, fingerprint = ARGV[base + 1], ARGV[base + 2]
  -- Field names: router/quota/keys.py.
  local v = redis.call('HMGET', day_map,
    'u|' .. name, 'm|' .. name .. '|' .. model,
    'x|' .. name, 'x|' .. name .. '|' .. model,
    'c|' .. name, 'c|' .. name .. '|' .. model)
  local record = redis.call('HGET', disabled_map, name)
  return {
    name = name,
    used = tonumber(v[1] or '0'),
    limit = cap(ARGV[base + 3]),
    model_used = tonumber(v[2] or '0'),
    model_limit = cap(ARGV[base + 4]),
    exhausted = v[3] ~= false,
    model_exhausted = v[4] ~= false,
    cooling_until = until_of(v[5]),
    model_cooling_until = until_of(v[6]),
    -- Disabled only for the secret it was disabled with: "fingerprint|reason".
    disabled = record ~= false and string.match(record, '^[^|]*') == fingerprint,
  }
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

local cursor = tonumber(redis.call('HGET', day_map, 'rr') or '0')
local best, best_remaining, retry_at = nil, -1, nil
for j = 0, n - 1 do
  local i = j
  if strategy ~= 'fill_first' then i = (cursor + j) % n end
  local k = view(i + 1)
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
  return {0, retry_at}
end

local name = ARGV[5 + best * 4 + 1]
local used = redis.call('HINCRBY', day_map, 'u|' .. name, 1)
local model_used = redis.call('HINCRBY', day_map, 'm|' .. name .. '|' .. model, 1)
if strategy ~= 'fill_first' then
  redis.call('HSET', day_map, 'rr', string.format('%d', best + 1))
end
-- Keep yesterday readable for a day, then let the counters expire by themselves.
redis.call('PEXPIREAT', day_map, string.format('%d', day_end_ms + 86400000))
return {1, best, used, model_used}

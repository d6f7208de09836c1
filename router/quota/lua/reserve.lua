-- Check the client, pick a key that can serve the model and count one call on both.
-- Makes the decisions of router/quota/logic.py (reserve_on) and selection.py (select_key),
-- which scan every key; this script keeps an index instead, so that a reserve costs about the
-- same with 2 or 2,000 keys. Keep them in step (tests/test_lua_parity.py checks both ways).
--
-- KEYS[1] day map, KEYS[2] disabled map, KEYS[3] clients day map, KEYS[4] key set,
-- KEYS[5] available index, KEYS[6] cooling index, KEYS[7] epoch, KEYS[8] pool totals,
-- KEYS[9] the per-minute windows (router/quota/keys.py; one hash tag: one Cluster slot).
-- ARGV[1] model, ARGV[2] strategy, ARGV[3] now_ms, ARGV[4] day_end_ms, ARGV[5] pool stamp
-- (a digest of the key set's names, fingerprints and daily limits), ARGV[6] provider,
-- ARGV[7] the provider's daily budget (nanos; -1 = none), then the client's daily_tokens,
-- daily_budget, rpm, tpm (-1 = none each) and count_rate (0|1) (ARGV[8..12]), then the
-- client: name ('' = none), daily_limit (-1 = no cap), fair share (0|1), below,
-- active_window_ms (-1 = every client counts), m, then m pairs (client, weight).
-- Returns {1, index (0-based), used_after, model_used_after, fair_counted (0|1)}
--      or {0, reason (keys | client_limit | client_share | client_tokens | client_rpm |
--          client_tpm | client_budget | provider_budget), retry_at_ms (-1 = none),
--          client_limit (-1 = none)}
--      or {-1}: the key set is not in Redis (the caller stores it and asks again).
-- Numbers are Lua doubles: exact for the integers used here (all below 2^53); the weights
-- and `below` come as Python's repr of the float, which parses back to the same double.
--
-- The index. The key set (KEYS[4]) holds each key's name, fingerprint and limits by position,
-- written once per configuration. For each (day, key set, model) a sorted set holds the
-- positions of the keys that may serve (KEYS[5]; score: the position, or minus the calls left
-- for most_remaining), and another the keys found cooling, by the end of their cooldown
-- (KEYS[6]). Both are built from the day map in one pass the first time they are needed, and
-- again whenever the provider's epoch (KEYS[7]) has moved: every change that can give a key
-- back (a call given back, a header sync, an exhaustion, disable/enable, reset, a written-back
-- batch, a cooldown made shorter) bumps it. In between, the index can only be optimistic: a
-- key in it may have been spent, exhausted, disabled or put to cool since. So every candidate
-- is checked against its real fields before it is counted, and one that cannot serve leaves
-- the index (or moves to the cooling one). A key is therefore never counted past a limit, and
-- every key that can serve is in the index: the pool is used to its last call. Each key
-- leaves the index at most once per build, so a reserve reads O(1) keys on average; with
-- most_remaining a stale score is corrected and looked at again (a lazy heap: scores only
-- fall between builds, so the first key whose score is current is the real maximum).

local INF = 9007199254740992 -- 2^53, selection.INF
local DEFAULT_WEIGHT = 1.0 -- logic.DEFAULT_WEIGHT
local KEYSET_TTL_MS = 8 * 86400000 -- refreshed at every build
local day_map, disabled_map, clients_map = KEYS[1], KEYS[2], KEYS[3]
local keyset, live, cool, epoch_key, pool_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local rates = KEYS[9]
local model = ARGV[1]
local strategy = ARGV[2]
local now_ms = tonumber(ARGV[3])
local day_end_ms = tonumber(ARGV[4])
local pool_stamp = ARGV[5]
local provider = ARGV[6]
local c = 12 -- the client's arguments follow

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
local ttl = fmt(day_end_ms + 86400000 - now_ms)
local function expire(map) redis.call('PEXPIRE', map, ttl) end

local function count(map, field) return tonumber(redis.call('HGET', map, field) or '0') end

local client = ARGV[c + 1]
local client_limit = cap(ARGV[c + 2])
local fair = client ~= '' and ARGV[c + 3] == '1'
local count_rate = client ~= '' and ARGV[12] == '1'
local client_rpm = cap(ARGV[10])

-- rates.py: a window is "second:count,..." over the seconds floor(now) - 60 .. floor(now)
local function window(raw)
  local since = math.floor(now_ms / 1000) - 60
  local kept, total = {}, 0
  for s, n in string.gmatch(raw or '', '(%-?%d+):(%d+)') do
    s, n = tonumber(s), tonumber(n)
    if s >= since then
      kept[#kept + 1] = {s, n}
      total = total + n
    end
  end
  return kept, total
end

local function with_one_more(kept)
  local second = math.floor(now_ms / 1000)
  if #kept > 0 and kept[#kept][1] == second then
    kept[#kept][2] = kept[#kept][2] + 1
  else
    kept[#kept + 1] = {second, 1}
  end
  local parts = {}
  for i, b in ipairs(kept) do parts[i] = fmt(b[1]) .. ':' .. fmt(b[2]) end
  return table.concat(parts, ',')
end

local function retry_at(kept, total, limit)
  if total < limit then return nil end
  local sorted = {}
  for i, b in ipairs(kept) do sorted[i] = b end
  table.sort(sorted, function(x, y) return x[1] < y[1] end)
  local left = total
  for _, b in ipairs(sorted) do
    left = left - b[2]
    if left < limit then return (b[1] + 61) * 1000 end
  end
  return nil
end

-- (a) logic.refusal_before: the client's daily calls, daily tokens, requests and tokens per
-- minute (once per request), budget, then the provider's budget. Nothing is touched.
if client ~= '' then
  if client_limit ~= nil and count(clients_map, 't|' .. client) >= client_limit then
    return {0, 'client_limit', -1, client_limit}
  end
  local tokens = cap(ARGV[8])
  if tokens ~= nil and count(clients_map, 'tk|' .. client) >= tokens then
    return {0, 'client_tokens', -1, tokens}
  end
  if count_rate then
    for _, rate in ipairs({{'client_rpm', client_rpm, 'r|'}, {'client_tpm', cap(ARGV[11]), 't|'}}) do
      local limit = rate[2]
      if limit ~= nil then
        local kept, total = window(redis.call('HGET', rates, rate[3] .. client))
        if total >= limit then return {0, rate[1], retry_at(kept, total, limit) or -1, limit} end
      end
    end
  end
  local budget = cap(ARGV[9])
  if budget ~= nil and count(clients_map, '$|' .. client) >= budget then
    return {0, 'client_budget', -1, budget}
  end
end
local provider_budget = cap(ARGV[7])
if provider_budget ~= nil and count(day_map, '$') >= provider_budget then
  return {0, 'provider_budget', -1, provider_budget}
end

local n = tonumber(redis.call('HGET', keyset, 'n') or '-1')
if n < 0 then return {-1} end

-- A key set entry: "name|fingerprint|daily_limit|model_limit|rpm" (-1 = no cap).
local specs = {}
local function spec(i)
  local s = specs[i]
  if s == nil then
    local raw = redis.call('HGET', keyset, fmt(i))
    local name, fingerprint, limit, model_limit, rpm =
      string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    s = {
      name = name, fingerprint = fingerprint, limit = cap(limit), model_limit = cap(model_limit),
      rpm = cap(rpm),
    }
    specs[i] = s
  end
  return s
end

-- `until_ms` of an "until_ms:strike" value, nil when absent (HMGET gives false).
local function until_of(value)
  if not value then return nil end
  return tonumber(string.match(value, '^[^:]*'))
end

-- Field names: router/quota/keys.py.
local function fields_of(name)
  return 'u|' .. name, 'm|' .. name .. '|' .. model, 'x|' .. name, 'x|' .. name .. '|' .. model,
    'c|' .. name, 'c|' .. name .. '|' .. model
end

-- rates.blocked_until: a key at its calls per minute cools until its window has room.
local function rpm_until(s)
  if s.rpm == nil then return nil end
  local kept, total = window(redis.call('HGET', rates, 'k|' .. provider .. '|' .. s.name))
  return retry_at(kept, total, s.rpm)
end

-- logic.key_view from the six day-map values of a key (got[at + 1 .. at + 6]) and its record.
local function view_of(s, got, at, record)
  return {
    used = tonumber(got[at + 1] or '0'),
    limit = s.limit,
    model_used = tonumber(got[at + 2] or '0'),
    model_limit = s.model_limit,
    exhausted = got[at + 3] ~= false,
    model_exhausted = got[at + 4] ~= false,
    cooling_until = until_of(got[at + 5]),
    model_cooling_until = until_of(got[at + 6]),
    -- Disabled only for the secret it was disabled with: "fingerprint|reason".
    disabled = record ~= false and string.match(record, '^[^|]*') == s.fingerprint,
    rpm_until = rpm_until(s),
  }
end

local function view(i)
  local s = spec(i)
  local got = redis.call('HMGET', day_map, fields_of(s.name))
  return view_of(s, got, 0, redis.call('HGET', disabled_map, s.name))
end

-- Every key's view, in batches of 500 keys (unpack() has a limit on the number of values).
local function each_view(visit)
  for first = 0, n - 1, 500 do
    local last = math.min(first + 499, n - 1)
    local wanted, names = {}, {}
    for i = first, last do
      local s = spec(i)
      names[#names + 1] = s.name
      local u, m, x, xm, cl, cm = fields_of(s.name)
      local at = #wanted
      wanted[at + 1], wanted[at + 2], wanted[at + 3] = u, m, x
      wanted[at + 4], wanted[at + 5], wanted[at + 6] = xm, cl, cm
    end
    local got = redis.call('HMGET', day_map, unpack(wanted))
    local records = redis.call('HMGET', disabled_map, unpack(names))
    for i = first, last do
      visit(i, view_of(spec(i), got, (i - first) * 6, records[i - first + 1]))
    end
  end
end

local function is_exhausted(k)
  return k.exhausted or k.model_exhausted
    or (k.limit ~= nil and k.used >= k.limit)
    or (k.model_limit ~= nil and k.model_used >= k.model_limit)
end

local function dead(k) return k.disabled or is_exhausted(k) end

local function available_at(k)
  local at = nil
  for _, u in ipairs({k.cooling_until or false, k.model_cooling_until or false,
                      k.rpm_until or false}) do
    if u and u > now_ms and (at == nil or u > at) then at = u end
  end
  return at
end

local function remaining(k)
  local key_left, model_left = INF - k.used, INF
  if k.limit ~= nil then key_left = k.limit - k.used end
  if k.model_limit ~= nil then model_left = k.model_limit - k.model_used end
  return math.min(key_left, model_left)
end

local function score(i, k)
  if strategy == 'most_remaining' then return -remaining(k) end
  return i
end

-- Members are zero-padded positions: among equal scores Redis orders them as config order.
local function member(i) return string.format('%06d', i) end

-- Put key i where its view says it belongs: the index, the cooling index, or neither.
local function place(i, k)
  local m = member(i)
  if dead(k) then
    redis.call('ZREM', live, m)
    redis.call('ZREM', cool, m)
    return
  end
  local at = available_at(k)
  if at ~= nil then
    redis.call('ZREM', live, m)
    redis.call('ZADD', cool, at, m)
    expire(cool) -- it may be new
  else
    redis.call('ZREM', cool, m)
    redis.call('ZADD', live, score(i, k), m)
  end
end

-- (b) the index: built when missing or older than the epoch
local epoch = redis.call('GET', epoch_key) or '0'
local mark = '~' .. epoch -- scores +inf: after every key, never a candidate
if not redis.call('ZSCORE', live, mark) then
  redis.call('DEL', live, cool)
  each_view(function(i, k)
    if not dead(k) then
      local at = available_at(k)
      if at ~= nil then
        redis.call('ZADD', cool, at, member(i))
      else
        redis.call('ZADD', live, score(i, k), member(i))
      end
    end
  end)
  redis.call('ZADD', live, '+inf', mark)
  expire(live)
  expire(cool)
  redis.call('PEXPIRE', keyset, KEYSET_TTL_MS)
end
-- Cooldowns that ended: back to the index (or on to where the key now belongs).
for _, m in ipairs(redis.call('ZRANGEBYSCORE', cool, '-inf', now_ms)) do
  local i = tonumber(m)
  place(i, view(i))
end

-- logic.pool_of: limit and remaining of the keys not disabled; nil when one has no cap.
-- Kept in KEYS[8] for this epoch and key set; each call counted here takes one from it.
local stamp = epoch .. ':' .. pool_stamp
local function pool()
  local cached = redis.call('HMGET', pool_key, 'at', 'l', 'r')
  if cached[1] == stamp then
    if cached[2] == 'none' then return nil, nil end
    return tonumber(cached[2]), tonumber(cached[3])
  end
  local limit, left = 0, 0
  each_view(function(_, k)
    if not k.disabled then
      if k.limit == nil then limit = nil end
      if limit ~= nil then
        limit = limit + k.limit
        if not k.exhausted then left = left + math.max(0, k.limit - k.used) end
      end
    end
  end)
  if limit == nil then
    redis.call('HSET', pool_key, 'at', stamp, 'l', 'none', 'r', 'none')
  else
    redis.call('HSET', pool_key, 'at', stamp, 'l', fmt(limit), 'r', fmt(left))
  end
  expire(pool_key)
  if limit == nil then return nil, nil end
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

-- (c) the fair share of a free pool that runs low (refused after (d): a spent pool says so first)
local fair_counted = 0
local over_share = nil
if fair then
  local raw = redis.call('HGET', day_map, 'fs')
  local share_out = nil
  if raw then
    share_out = tonumber(raw)
  else
    local limit, left = pool()
    if limit ~= nil and left < tonumber(ARGV[c + 4]) * limit then
      share_out = left
      redis.call('HSET', day_map, 'fs', fmt(share_out))
      expire(day_map)
    end
  end
  if share_out ~= nil then
    local share = fair_share(share_out)
    if count(day_map, 'fu|' .. client) >= share then
      over_share = share
    end
    fair_counted = 1
  end
end

-- (d) select the key: the first candidate of the index that really can serve
local function first(min, max)
  local got = redis.call('ZRANGEBYSCORE', live, min, max, 'WITHSCORES', 'LIMIT', 0, 1)
  if #got == 0 or string.sub(got[1], 1, 1) == '~' then return nil, nil end
  return tonumber(got[1]), tonumber(got[2])
end

local function candidate(start)
  if strategy == 'round_robin' then
    local i, s = first(start, '+inf')
    if i == nil and start > 0 then i, s = first('-inf', '(' .. start) end
    return i, s
  end
  return first('-inf', '+inf')
end

local function pick()
  local start = 0
  if strategy == 'round_robin' and n > 0 then
    start = tonumber(redis.call('HGET', day_map, 'rr') or '0') % n
  end
  while true do
    local i, stored = candidate(start)
    if i == nil then return nil end
    local k = view(i)
    if dead(k) or available_at(k) ~= nil then
      place(i, k)
    elseif score(i, k) ~= stored then
      redis.call('ZADD', live, score(i, k), member(i)) -- stale: sort it again, look again
    else
      return i, k
    end
  end
end

-- With nothing to pick: the earliest end of a cooldown of a key that can still serve, checked
-- as the candidates are. `again`: a key there is not cooling after all (the clock of this
-- caller is behind another's): it is back in the index, pick again.
local function earliest()
  while true do
    local got = redis.call('ZRANGE', cool, 0, 0, 'WITHSCORES')
    if #got == 0 then return nil, false end
    local i, stored = tonumber(got[1]), tonumber(got[2])
    local k = view(i)
    local at = available_at(k)
    if dead(k) or at ~= stored then
      place(i, k)
      if not dead(k) and at == nil then return nil, true end
    else
      return at, false
    end
  end
end

local best, chosen, retry_at = nil, nil, nil
for _ = 1, n + 1 do
  best, chosen = pick()
  if best ~= nil then break end
  local again
  retry_at, again = earliest()
  if not again then break end
end

if best == nil then
  return {0, 'keys', retry_at or -1, -1}
end
if over_share ~= nil then
  return {0, 'client_share', -1, over_share}
end

-- (e) count the call on the key and on the client
local name = spec(best).name
local used = redis.call('HINCRBY', day_map, 'u|' .. name, 1)
local model_used = redis.call('HINCRBY', day_map, 'm|' .. name .. '|' .. model, 1)
if strategy == 'most_remaining' then
  redis.call('ZINCRBY', live, 1, member(best)) -- one call fewer left: minus remaining, plus one
elseif strategy == 'round_robin' then
  redis.call('HSET', day_map, 'rr', fmt(best + 1))
end
-- The pool totals lose the call (the key was under its limit, not exhausted, not disabled);
-- totals of another key set are dropped rather than left one call behind.
local at = redis.call('HGET', pool_key, 'at')
if at == stamp then
  if redis.call('HGET', pool_key, 'r') ~= 'none' then redis.call('HINCRBY', pool_key, 'r', -1) end
elseif at then
  redis.call('DEL', pool_key)
end
-- logic.count_rates: the client's requests per minute (once per request), the key's calls
local rate_fields = {}
if count_rate and client_rpm ~= nil then rate_fields[#rate_fields + 1] = 'r|' .. client end
if spec(best).rpm ~= nil then rate_fields[#rate_fields + 1] = 'k|' .. provider .. '|' .. name end
for _, field in ipairs(rate_fields) do
  local kept = window(redis.call('HGET', rates, field))
  redis.call('HSET', rates, field, with_one_more(kept))
end
if #rate_fields > 0 then redis.call('PEXPIRE', rates, 120000) end -- a minute and a bit
if client ~= '' then
  redis.call('HINCRBY', clients_map, 't|' .. client, 1)
  redis.call('HSET', clients_map, 's|' .. client, fmt(now_ms))
  if fair then redis.call('HINCRBY', clients_map, 'f|' .. client, 1) end
  if fair_counted == 1 then redis.call('HINCRBY', day_map, 'fu|' .. client, 1) end
  expire(clients_map)
end
expire(day_map)
return {1, best, used, model_used, fair_counted}

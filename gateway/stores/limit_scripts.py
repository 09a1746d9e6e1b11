"""The Lua scripts that check and count a tenant's limits in Redis (see gateway.stores.limits), and their argument
layout."""

SET, WINDOW, COUNTER = 0, 1, 2

# KEYS: one per check, the concurrency sets first.
# ARGV: now_ms, request id, count_ms (when the windows count it: now for a request, a lease's end for a lease),
#   then per key: kind (0 set, 1 window, 2 counter), limit (-1: none), amount, a, b
#   set: a = slot lifetime in ms, amount = slots (more than one: a lease's, named id:1..id:amount);
#   window: a = bucket length in ms, b = buckets in the window; counter: a = ttl ms;
#   then, when settles ride on the admission, theirs (see the script).
# Returns {refused check (0: admitted), used..., reset_ms...}: used is the count after this request (admitted) or
# before it (refused); reset_ms is, for a window, the time until it is empty again (admitted) or until enough
# has left it for this request (refused; -1 if it never will), and -1 for the others.
# A settle's correction of one reserved check: a counter's field is '', a window's the bucket it reserved in.
_CORRECT = """
local function correct(key, field, delta)
  if delta ~= 0 and redis.call('EXISTS', key) == 1 then
    if field == '' then
      redis.call('INCRBY', key, delta)
    else
      -- a bucket still counted in the window's total: corrected in both (one that has left it, in neither)
      local counted = tonumber(redis.call('HGET', key, '-2'))
      if counted ~= nil and tonumber(field) >= counted then
        redis.call('HINCRBY', key, field, delta)
        redis.call('HINCRBY', key, '-1', delta)
      elseif counted == nil then
        redis.call('HINCRBY', key, field, delta)
      end
    end
  end
end
"""

ADMIT = _CORRECT + """
local now, count = tonumber(ARGV[1]), tonumber(ARGV[3])
local n = #KEYS
local used, reset, newest_of = {}, {}, {}
local refused = 0
-- Settles of the same tenant and key riding on this admission, done first (see Limiter.settle). After the checks'
-- arguments: how many settles, how many checks each corrects and their indices, then per settle its request id
-- and a field and delta per corrected check. As in SETTLE, one corrects only if it left the sets.
local at = 3 + n * 5
local settles = tonumber(ARGV[at + 1] or '0')
if settles > 0 then
  local corrected = tonumber(ARGV[at + 2])
  local p = at + 2 + corrected
  for _ = 1, settles do
    local id, removed = ARGV[p + 1], -1
    for i = 1, n do
      if tonumber(ARGV[3 + (i - 1) * 5 + 1]) == 0 then
        local gone = redis.call('ZREM', KEYS[i], id)
        if removed < 0 then removed = gone end
      end
    end
    if removed == 1 then
      for j = 1, corrected do
        correct(KEYS[tonumber(ARGV[at + 2 + j])], ARGV[p + 2 * j], tonumber(ARGV[p + 2 * j + 1]))
      end
    end
    p = p + 1 + 2 * corrected
  end
end
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local kind, limit, amount = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local a, b = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local key = KEYS[i]
  local current = 0
  reset[i] = -1
  if kind == 0 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    current = redis.call('ZCARD', key)
  elseif kind == 1 then
    local oldest = math.floor(now / a) - b
    local totals = redis.call('HMGET', key, '-1', '-2', '-3')
    local sum, counted, newest = tonumber(totals[1]), tonumber(totals[2]), tonumber(totals[3])
    if sum == nil or counted < oldest then
      -- a bucket has left the window (or the totals are not there yet): read the buckets once
      local flat = redis.call('HGETALL', key)
      local stale, low = {}, nil
      sum, newest = 0, -1
      for j = 1, #flat, 2 do
        local index = tonumber(flat[j])
        if index >= 0 and index < oldest then
          stale[#stale + 1] = flat[j]
        elseif index >= 0 then
          sum = sum + tonumber(flat[j + 1])
          if index > newest then newest = index end
          if low == nil or index < low then low = index end
        end
      end
      if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
      if newest >= 0 then
        redis.call('HSET', key, '-1', sum, '-2', low, '-3', newest)
      elseif totals[1] then
        redis.call('HDEL', key, '-1', '-2', '-3')
      end
    end
    current = sum
    newest_of[i] = newest
    if newest >= 0 then reset[i] = (newest + b + 1) * a - now end
  else
    current = tonumber(redis.call('GET', key) or '0')
  end
  if refused == 0 and limit >= 0 and amount > 0 and current + amount > limit then
    refused = i
    if kind == 1 then
      -- when enough will have left: the live buckets oldest first (sorted only here, on a refusal)
      reset[i] = -1
      if amount <= limit then
        local oldest, flat, live = math.floor(now / a) - b, redis.call('HGETALL', key), {}
        for j = 1, #flat, 2 do
          local index = tonumber(flat[j])
          if index >= oldest then live[#live + 1] = {index, tonumber(flat[j + 1])} end
        end
        table.sort(live, function(x, y) return x[1] < y[1] end)
        local excess, freed = current + amount - limit, 0
        for _, bucket in ipairs(live) do
          freed = freed + bucket[2]
          if freed >= excess then
            reset[i] = (bucket[1] + b + 1) * a - now
            break
          end
        end
      end
    end
  end
  used[i] = current
end
if refused == 0 then
  for i = 1, n do
    local base = 3 + (i - 1) * 5
    local kind, amount = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3])
    local a, b = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
    local key = KEYS[i]
    if kind == 0 and amount > 0 then
      -- every slot of a set lives as long: the newest reaches furthest
      if amount == 1 then
        redis.call('ZADD', key, now + a, ARGV[2])
      else
        local slots = {}
        for j = 1, amount do
          slots[2 * j - 1] = now + a
          slots[2 * j] = ARGV[2] .. ':' .. j
        end
        redis.call('ZADD', key, unpack(slots))
      end
      redis.call('PEXPIRE', key, a)
    elseif kind == 1 then
      if amount ~= 0 then
        local bucket = math.floor(count / a)
        redis.call('HINCRBY', key, bucket, amount)
        if newest_of[i] < 0 then
          redis.call('HSET', key, '-1', amount, '-2', bucket, '-3', bucket)
        else
          redis.call('HINCRBY', key, '-1', amount)
        end
        -- the hash lives until its newest bucket has left the window: set when a bucket is started
        if bucket > newest_of[i] then
          if newest_of[i] >= 0 then redis.call('HSET', key, '-3', bucket) end
          redis.call('PEXPIRE', key, (bucket + b + 1) * a - now)
        end
        reset[i] = (bucket + b + 1) * a - now
      end
    elseif amount ~= 0 then
      if redis.call('INCRBY', key, amount) == amount then redis.call('PEXPIRE', key, a) end
    end
    used[i] = used[i] + amount
  end
end
local result = {refused}
for i = 1, n do result[1 + i] = used[i] end
for i = 1, n do result[1 + n + i] = reset[i] end
return result
"""

# KEYS: the concurrency sets first (ARGV[2] says how many), then the windows and counters to correct.
# ARGV: request id, number of sets, then per key to correct: the bucket it was counted in ('' for a counter), delta.
# Corrects only if the request was still in the first set: a settle that arrives twice counts once.
SETTLE = _CORRECT + """
local sets = tonumber(ARGV[2])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
for i = 2, sets do redis.call('ZREM', KEYS[i], ARGV[1]) end
if removed == 0 then return 0 end
for i = sets + 1, #KEYS do
  local base = 2 + (i - sets - 1) * 2
  correct(KEYS[i], ARGV[base + 1], tonumber(ARGV[base + 2]))
end
return 1
"""

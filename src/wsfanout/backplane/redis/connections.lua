-- KEYS: pu of each user, then pn of each (in the same order). Returns each user's number
-- of connections over the nodes that still vouch for them (0: offline).
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local n = #KEYS / 2
local counts = {}
for i = 1, n do
  local nodes = redis.call('ZRANGEBYSCORE', KEYS[i], t, '+inf')
  local total = 0
  if #nodes > 0 then
    local held = redis.call('HMGET', KEYS[n + i], unpack(nodes))
    for _, count in ipairs(held) do total = total + math.max(tonumber(count) or 1, 1) end
  end
  counts[i] = total
end
return counts

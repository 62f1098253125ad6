-- KEYS: pall. ARGV: key prefix, most users to look at.
-- Users no node vouches for any longer (their nodes died) go offline. Returns how many
-- users were looked at, Redis's time (a string), then the users who went offline.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[2]))
local result = {#stale, tostring(t)}
for _, user in ipairs(stale) do
  local key = string.lower(user)
  local pu = ARGV[1] .. 'pu:' .. key
  redis.call('ZREMRANGEBYSCORE', pu, '-inf', t)
  local last = redis.call('ZRANGE', pu, -1, -1, 'WITHSCORES')
  if #last == 0 then
    offline(ARGV[1] .. 'pi:' .. key, KEYS[1], ARGV[1] .. 'pn:' .. key, user)
    table.insert(result, user)
  else
    redis.call('ZADD', KEYS[1], last[2], user)
  end
end
return result

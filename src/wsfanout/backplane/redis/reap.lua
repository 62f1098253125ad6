-- KEYS: pall. ARGV: key prefix, most users to look at.
-- Users no node vouches for any longer (their nodes died) go offline.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[2]))
for _, user in ipairs(stale) do
  local pu = ARGV[1] .. 'pu:' .. string.lower(user)
  redis.call('ZREMRANGEBYSCORE', pu, '-inf', t)
  local last = redis.call('ZRANGE', pu, -1, -1, 'WITHSCORES')
  if #last == 0 then
    offline(ARGV[1] .. 'pi:' .. string.lower(user), KEYS[1], user)
  else
    redis.call('ZADD', KEYS[1], last[2], user)
  end
end
return #stale

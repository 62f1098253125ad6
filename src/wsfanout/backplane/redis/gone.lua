-- KEYS: pu, pall, pi, pn. ARGV: node, user. This node no longer vouches for the user; if
-- no node does, they go offline, and the answer is Redis's time (a string); else 0.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) == 0 then
  offline(KEYS[3], KEYS[2], KEYS[4], ARGV[2])
  return tostring(t)
end
return 0

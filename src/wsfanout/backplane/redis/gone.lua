-- KEYS: pu, pall, pi. ARGV: node, user. This node no longer vouches for the user.
local now = redis.call('TIME')
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now[1]) + tonumber(now[2]) / 1e6)
if redis.call('ZCARD', KEYS[1]) == 0 then
  offline(KEYS[3], KEYS[2], ARGV[2])
  return 1
end
return 0

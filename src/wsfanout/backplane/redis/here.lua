-- KEYS: pu, pall, pi, then pg of each group. ARGV: node, ttl, user, info, online events
-- (channel, frame, ...). This node vouches for the user; if no node did, they are online.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local until_ = t + tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
local first = redis.call('ZCARD', KEYS[1]) == 0
redis.call('ZADD', KEYS[1], until_, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
redis.call('ZADD', KEYS[2], 'GT', until_, ARGV[3])
for i = 4, #KEYS do redis.call('ZADD', KEYS[i], 'GT', until_, ARGV[3]) end
if first then
  redis.call('SET', KEYS[3], ARGV[4])
  for i = 5, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
  return 1
end
redis.call('SET', KEYS[3], ARGV[4])
return 0

-- KEYS: pu, pall, pi, pn, then pg of each group. ARGV: node, ttl, user, info, connections
-- here, online events (channel, frame, ...). This node vouches for the user and says how
-- many connections they have here; if no node vouched, they come online: their events are
-- published, and the answer is Redis's time (a string) for the lifecycle hooks; else 0.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local until_ = t + tonumber(ARGV[2])
local keep = math.ceil(tonumber(ARGV[2])) + 1
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
local first = redis.call('ZCARD', KEYS[1]) == 0
redis.call('ZADD', KEYS[1], until_, ARGV[1])
redis.call('EXPIRE', KEYS[1], keep)
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[4], keep)
redis.call('ZADD', KEYS[2], 'GT', until_, ARGV[3])
for i = 5, #KEYS do redis.call('ZADD', KEYS[i], 'GT', until_, ARGV[3]) end
redis.call('SET', KEYS[3], ARGV[4])
if first then
  for i = 6, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
  return tostring(t)
end
return 0

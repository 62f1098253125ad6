local function offline(pi, pall, pn, user)
  local info = redis.call('GET', pi)
  if info then
    info = cjson.decode(info)
    for _, key in ipairs(info.g) do redis.call('ZREM', key, user) end
    for _, event in ipairs(info.e) do redis.call('PUBLISH', event[1], event[2]) end
    redis.call('DEL', pi)
  end
  redis.call('DEL', pn)
  redis.call('ZREM', pall, user)
end

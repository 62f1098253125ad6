-- KEYS: meta and history of each stream. ARGV: node, meta ttl, ttl, size, most bytes to
-- return in all, then for each stream the epoch seen ('' if none) and the offset seen.
-- Returns for each stream {epoch, offset} and, if it was seen, a flag (1: recovered) and
-- the messages after that offset. An epoch seen of '*' asks instead for the stream's last
-- messages, as many as the offset seen (DESIGN 5.4): the newest that fit the budget, younger
-- than the ttl.
-- An epoch belongs to one run of Redis: a Redis restarted from an older snapshot (or a
-- promoted replica) may have lost messages, so its streams get new epochs here.
local now = redis.call('TIME')
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local budget = tonumber(ARGV[5])
local found = {}
for s = 1, #KEYS / 2 do
  local meta, history = KEYS[2 * s - 1], KEYS[2 * s]
  local seen_epoch, seen = ARGV[4 + 2 * s], tonumber(ARGV[5 + 2 * s])
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch or redis.call('HGET', meta, 'r') ~= run then
    epoch = ARGV[1] .. now[1] .. now[2]
    redis.call('DEL', history)
    redis.call('HSET', meta, 'e', epoch, 'r', run)
  end
  redis.call('EXPIRE', meta, ARGV[2])
  local top = tonumber(redis.call('HGET', meta, 'o') or '0')
  local answer = {epoch, top}
  if seen_epoch == '*' then
    local entries = redis.call('XREVRANGE', history, '+', '-', 'COUNT', seen)
    local keep = 0
    for i = 1, #entries do
      local size = #entries[i][2][4]
      if size > budget or tonumber(entries[i][2][2]) < tonumber(now[1]) - tonumber(ARGV[3]) then
        break
      end
      budget = budget - size
      keep = i
    end
    answer[3] = 1
    for i = keep, 1, -1 do answer[keep - i + 4] = entries[i][2][4] end
  elseif seen_epoch ~= '' then
    answer[3] = 0
    if seen_epoch == epoch and seen == top then
      answer[3] = 1
    elseif seen_epoch == epoch and seen < top then
      local entries = redis.call('XRANGE', history, tostring(seen + 1), '+', 'COUNT', ARGV[4])
      if #entries > 0 and tonumber(string.match(entries[1][1], '^(%d+)')) == seen + 1
         and tonumber(entries[1][2][2]) >= tonumber(now[1]) - tonumber(ARGV[3]) then
        local size = 0
        for i = 1, #entries do size = size + #entries[i][2][4] end
        if size <= budget then
          budget = budget - size
          answer[3] = 1
          for i = 1, #entries do answer[i + 3] = entries[i][2][4] end
        end
      end
    end
  end
  found[s] = answer
end
return found

-- KEYS: 1 unacked index (zset), 2 unacked (hash), 3 this worker's held set (fast reclaim), 4.. the queue lists in
--       priority order
-- ARGV: 1 how many to pop, 2 now (the index score), 3 the dead-letter suffix (e.g. '.dead'), 4 '1' to record each
--       tag in the held set KEYS[3] (fast reclaim, agent_workers/worker/reclaim.py), '' not to
-- Pops up to ARGV[1] messages, from the first non-empty list on (so one pop spans priority levels, highest first),
-- and records each as unacknowledged, exactly as kombu's QoS.append does ([payload, exchange, routing_key] under the
-- delivery tag), in one atomic step.
-- An envelope that cannot be recorded (not JSON, no properties, a delivery tag that is not a non-empty string: cjson
-- decodes null to a truthy userdata, and true, {} or 5 would make ZADD fail after the pop) is moved to the
-- dead-letter list '<queue><suffix>' instead: never lost, never delivered.
-- Returns false (nothing to pop) or {the list each recorded payload came from, the recorded payloads, how many were
-- dead-lettered, how many messages are left in all the lists} (the worker flushes its batch at once when nothing is
-- left).
local want = tonumber(ARGV[1])
local lists = {}
for i = 4, #KEYS do lists[#lists + 1] = KEYS[i] end
local sources, recorded, dropped = {}, {}, 0
while want > 0 do
  local cmd = {'LMPOP', #lists}
  for _, list in ipairs(lists) do cmd[#cmd + 1] = list end
  cmd[#cmd + 1] = 'RIGHT'
  cmd[#cmd + 1] = 'COUNT'
  cmd[#cmd + 1] = want
  local popped = redis.call(unpack(cmd))
  if not popped then break end
  local key = popped[1]
  -- kombu's priority sub-lists are '<queue>\x06\x16<n>'; their dead letters go with the queue's.
  local dead = (string.match(key, '^(.-)\6\22') or key) .. ARGV[3]
  for _, raw in ipairs(popped[2]) do
    local ok, msg = pcall(cjson.decode, raw)
    local tag = nil
    if ok and type(msg) == 'table' and type(msg.properties) == 'table' then tag = msg.properties.delivery_tag end
    if type(tag) == 'string' and #tag > 0 and #tag <= 1024 then
      local info = msg.properties.delivery_info
      local ex, rk = 'null', 'null'
      if type(info) == 'table' then
        if info.exchange ~= nil then ex = cjson.encode(info.exchange) end
        if info.routing_key ~= nil then rk = cjson.encode(info.routing_key) end
      end
      redis.call('ZADD', KEYS[1], ARGV[2], tag)
      redis.call('HSET', KEYS[2], tag, '[' .. raw .. ', ' .. ex .. ', ' .. rk .. ']')
      if ARGV[4] == '1' then redis.call('SADD', KEYS[3], tag) end  -- fast reclaim: who holds it
      sources[#sources + 1] = key
      recorded[#recorded + 1] = raw
    else
      redis.call('RPUSH', dead, raw)
      dropped = dropped + 1
    end
  end
  want = want - #popped[2]
end
if #recorded == 0 and dropped == 0 then return false end
local left = 0
for _, list in ipairs(lists) do left = left + redis.call('LLEN', list) end
return {sources, recorded, dropped, left}

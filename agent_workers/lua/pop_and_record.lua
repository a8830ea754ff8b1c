-- KEYS: 1 unacked index (zset), 2 unacked (hash), 3 this worker's held set (fast reclaim), 4.. the queue lists in
--       priority order
-- ARGV: 1 how many to pop, 2 now (the index score), 3 the dead-letter suffix (e.g. '.dead'), 4 '1' to record each
--       tag in the held set KEYS[3] (fast reclaim, agent_workers/worker/reclaim.py), '' not to
-- Pops up to ARGV[1] messages from the first non-empty list and records each as unacknowledged, exactly as kombu's
-- QoS.append does ([payload, exchange, routing_key] under the delivery tag), in one atomic step.
-- An envelope that cannot be recorded (not JSON, no properties, a delivery tag that is not a non-empty string: cjson
-- decodes null to a truthy userdata, and true, {} or 5 would make ZADD fail after the pop) is moved to the
-- dead-letter list '<queue><suffix>' instead: never lost, never delivered.
-- Returns false (nothing to pop) or {list popped from, the recorded payloads, how many were dead-lettered}.
local cmd = {'LMPOP', #KEYS - 3}
for i = 4, #KEYS do cmd[#cmd + 1] = KEYS[i] end
cmd[#cmd + 1] = 'RIGHT'
cmd[#cmd + 1] = 'COUNT'
cmd[#cmd + 1] = ARGV[1]
local popped = redis.call(unpack(cmd))
if not popped then return false end
local key = popped[1]
-- kombu's priority sub-lists are '<queue>\x06\x16<n>'; their dead letters go with the queue's.
local dead = (string.match(key, '^(.-)\6\22') or key) .. ARGV[3]
local recorded, dropped = {}, 0
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
    recorded[#recorded + 1] = raw
  else
    redis.call('RPUSH', dead, raw)
    dropped = dropped + 1
  end
end
return {key, recorded, dropped}

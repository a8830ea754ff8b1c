-- KEYS: 1 unacked index (zset), 2 unacked (hash), 3.. the queue lists in priority order
-- ARGV: 1 how many to pop, 2 now (the index score)
-- Pops up to ARGV[1] messages from the first non-empty list and records each as unacknowledged, exactly as kombu's
-- QoS.append does ([payload, exchange, routing_key] under the delivery tag), in one atomic step.
local cmd = {'LMPOP', #KEYS - 2}
for i = 3, #KEYS do cmd[#cmd + 1] = KEYS[i] end
cmd[#cmd + 1] = 'RIGHT'
cmd[#cmd + 1] = 'COUNT'
cmd[#cmd + 1] = ARGV[1]
local popped = redis.call(unpack(cmd))
if not popped then return false end
for _, raw in ipairs(popped[2]) do
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg.properties) == 'table' and msg.properties.delivery_tag then
    local info = msg.properties.delivery_info
    local ex, rk = 'null', 'null'
    if type(info) == 'table' then
      if info.exchange ~= nil then ex = cjson.encode(info.exchange) end
      if info.routing_key ~= nil then rk = cjson.encode(info.routing_key) end
    end
    redis.call('ZADD', KEYS[1], ARGV[2], msg.properties.delivery_tag)
    redis.call('HSET', KEYS[2], msg.properties.delivery_tag, '[' .. raw .. ', ' .. ex .. ', ' .. rk .. ']')
  end
end
return popped

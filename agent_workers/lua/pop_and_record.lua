-- KEYS: 1 unacked index (zset), 2 unacked (hash), 3 this worker's held set (fast reclaim), 4 the restored tags
--       (zset: tag -> when our transport restored it), 5.. the queue lists in priority order
-- ARGV: 1 how many to pop, 2 now (the index score), 3 the dead-letter suffix (e.g. '.dead'), 4 '1' to record each
--       tag in the held set KEYS[3] (fast reclaim, agent_workers/worker/reclaim.py), '' not to
-- Pops up to ARGV[1] messages, from the first non-empty list on (so one pop spans priority levels, highest first),
-- and records each as unacknowledged, as kombu's QoS.append does ([payload, exchange, routing_key] under the
-- delivery tag; here the default exchange and the queue it came from), in one atomic step.
-- An envelope that cannot be recorded (not JSON, no properties, a delivery tag that is not a non-empty string: cjson
-- decodes null to a truthy userdata, and true, {} or 5 would make ZADD fail after the pop) is moved to the
-- dead-letter list '<queue><suffix>' instead: never lost, never delivered. So is an envelope kombu could not restore
-- should its worker die (Channel._do_restore_message): headers present but not an object (it sets
-- headers.redelivered), a delivery_info that is not an object with a string exchange and routing key (the route
-- back: null ones made every restore, and every worker start, fail), a priority that is an infinity (int() raises).
-- A recorded tag that our transport restored (KEYS[4]) is redelivered: the only redelivered flag the worker trusts on
-- Redis (a producer can write any flag into an envelope, not into this set).
-- Returns false (nothing to pop) or {the list each recorded payload came from, the recorded payloads, how many were
-- dead-lettered, how many messages are left in all the lists, '1' or '0' per recorded payload: restored by us, the
-- recorded delivery tags, the task ids and names of the dead-lettered envelopes that carry both (the worker stores
-- a FAILURE for them)}
-- (the worker flushes its batch at once when nothing is left).
local function restorable(msg)
  local headers = msg.headers
  if headers ~= nil and (type(headers) ~= 'table' or #headers > 0) then return false end  -- null, a list, a scalar
  local info = msg.properties.delivery_info
  if type(info) ~= 'table' or type(info.exchange) ~= 'string' or type(info.routing_key) ~= 'string' then
    return false
  end
  if info.exchange == '' and info.routing_key == '' then return false end  -- routes nowhere
  local priority = msg.properties.priority
  if type(priority) == 'number' and (priority ~= priority or priority == math.huge or priority == -math.huge) then
    return false
  end
  return true
end

local function identity(msg)
  if type(msg) ~= 'table' or type(msg.headers) ~= 'table' then return nil end
  local id, task = msg.headers.id, msg.headers.task
  if type(id) == 'string' and #id > 0 and #id <= 255 and type(task) == 'string' and #task <= 255 then
    return id, task
  end
  return nil
end

local want = tonumber(ARGV[1])
local lists = {}
for i = 5, #KEYS do lists[#lists + 1] = KEYS[i] end
local sources, recorded, restored, tags, dropped = {}, {}, {}, {}, 0
local refused_ids, refused_tasks = {}, {}
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
  local queue = string.match(key, '^(.-)\6\22') or key
  local dead = queue .. ARGV[3]
  for _, raw in ipairs(popped[2]) do
    local ok, msg = pcall(cjson.decode, raw)
    local tag = nil
    if ok and type(msg) == 'table' and type(msg.properties) == 'table' then tag = msg.properties.delivery_tag end
    if type(tag) == 'string' and #tag > 0 and #tag <= 1024 and restorable(msg) then
      -- Restored to the queue it was popped from (the default exchange routes by queue name), whatever bindings
      -- exist at restore time (kombu drops a message whose exchange has none, e.g. at a worker's first start).
      redis.call('ZADD', KEYS[1], ARGV[2], tag)
      redis.call('HSET', KEYS[2], tag, '[' .. raw .. ', "", ' .. cjson.encode(queue) .. ']')
      if ARGV[4] == '1' then redis.call('SADD', KEYS[3], tag) end  -- fast reclaim: who holds it
      sources[#sources + 1] = key
      recorded[#recorded + 1] = raw
      restored[#restored + 1] = redis.call('ZREM', KEYS[4], tag) == 1 and '1' or '0'
      tags[#tags + 1] = tag
    else
      redis.call('RPUSH', dead, raw)
      dropped = dropped + 1
      if ok then
        local id, task = identity(msg)
        if id then
          refused_ids[#refused_ids + 1] = id
          refused_tasks[#refused_tasks + 1] = task
        end
      end
    end
  end
  want = want - #popped[2]
end
if #recorded == 0 and dropped == 0 then return false end
local left = 0
for _, list in ipairs(lists) do left = left + redis.call('LLEN', list) end
-- Markers of restored messages that were never popped again (their queue deleted) go after a week.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[2]) - 7 * 86400)
return {sources, recorded, dropped, left, restored, tags, refused_ids, refused_tasks}

-- Batch set: POST /v1/cache/batch/set with {"entries": [{"key", "value"}, ...]}: <n> distinct keys
-- <prefix><random 0..count-1>, each with the value of <size> bytes post.lua writes. A new random
-- batch for every request, so keys the run has not written yet arrive as new keys while the others
-- exist already. Each 200 answer has a result per key: done() prints how many keys were created
-- (201), updated (200) or refused (any other status), as "bench keys_created: N" etc., read by
-- bench/tools.py.
--   wrk -t2 -c50 -d10s --latency -s bench/batch_set.lua http://HOST:PORT -- b 20000 100 200
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix, count, n = args[1], tonumber(args[2]), tonumber(args[3])
  local size = tonumber(args[4])
  -- {"payload":"xxx..."} is exactly `size` bytes of JSON: 14 bytes of frame around the x's.
  value = '{"payload":"' .. string.rep("x", size - 14) .. '"}'
  headers = {["Content-Type"] = "application/json"}
  math.randomseed(os.time() + (id or 0) * 7919)
  keys_created, keys_updated, keys_failed = 0, 0, 0
end

function request()
  local chosen, entries = {}, {}
  while #entries < n do
    local k = math.random(0, count - 1)
    if not chosen[k] then
      chosen[k] = true
      entries[#entries + 1] = '{"key":"' .. prefix .. k .. '","value":' .. value .. '}'
    end
  end
  return wrk.format("POST", "/v1/cache/batch/set", headers, '{"entries":[' .. table.concat(entries, ",") .. ']}')
end

function response(status, headers, body)
  if status ~= 200 then
    return
  end
  for s in body:gmatch('"status":%s*(%d+)') do
    if s == "201" then
      keys_created = keys_created + 1
    elseif s == "200" then
      keys_updated = keys_updated + 1
    else
      keys_failed = keys_failed + 1
    end
  end
end

function done(summary, latency, requests)
  local totals = {keys_created = 0, keys_updated = 0, keys_failed = 0}
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (thread:get(name) or 0)
    end
  end
  for _, name in ipairs({"keys_created", "keys_updated", "keys_failed"}) do
    io.write(string.format("bench %s: %d\n", name, totals[name]))
  end
end

-- Durable writes: POST /v1/cache/<prefix><random 0..count-1> with {"value": <value of size bytes>}.
--   wrk -t2 -c50 -d10s --latency -s bench/post.lua http://HOST:PORT -- w 10000 200
local threads = 0

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  prefix = "/v1/cache/" .. args[1]
  count = tonumber(args[2])
  local size = tonumber(args[3])
  -- {"payload":"xxx..."} is exactly `size` bytes of JSON: 14 bytes of frame around the x's.
  local value = '{"payload":"' .. string.rep("x", size - 14) .. '"}'
  body = '{"value": ' .. value .. '}'
  headers = {["Content-Type"] = "application/json"}
  math.randomseed(os.time() + (id or 0) * 7919)
end

function request()
  return wrk.format("POST", prefix .. math.random(0, count - 1), headers, body)
end

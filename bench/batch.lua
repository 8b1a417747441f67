-- Batch get: POST /v1/cache/batch/get with <n> distinct keys <prefix>0 .. <prefix><count-1>.
-- 32 bodies are built up front (random keys) and used in turn, so wrk spends no time per request.
--   wrk -t2 -c50 -d10s --latency -s bench/batch.lua http://HOST:PORT -- k 1000 100
local threads = 0

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  local prefix, count, n = args[1], tonumber(args[2]), tonumber(args[3])
  math.randomseed(os.time() + (id or 0) * 7919)
  headers = {["Content-Type"] = "application/json"}
  bodies = {}
  for b = 1, 32 do
    local chosen, keys = {}, {}
    while #keys < n do
      local k = math.random(0, count - 1)
      if not chosen[k] then
        chosen[k] = true
        keys[#keys + 1] = '"' .. prefix .. k .. '"'
      end
    end
    bodies[b] = '{"keys": [' .. table.concat(keys, ",") .. ']}'
  end
  turn = 0
end

function request()
  turn = turn % #bodies + 1
  return wrk.format("POST", "/v1/cache/batch/get", headers, bodies[turn])
end

-- GET absent key: GET <path prefix><i> for i walking 0 .. count-1 as get.lua does, over keys that
-- exist nowhere (not in Redis, not in PostgreSQL), so every answer should be a 404. Answers with
-- another status are counted and printed by done() ("bench not_404: N"), read by bench/tools.py.
--   wrk -t2 -c50 -d10s --latency -s bench/absent.lua http://HOST:PORT -- /v1/cache/nx 1000 2
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1]
  count = tonumber(args[2])
  stride = tonumber(args[3]) or 2
  i = id or 0
  not_404 = 0
end

function request()
  local path = prefix .. (i % count)
  i = i + stride
  return wrk.format("GET", path)
end

function response(status, headers, body)
  if status ~= 404 then
    not_404 = not_404 + 1
  end
end

function done(summary, latency, requests)
  local n = 0
  for _, thread in ipairs(threads) do
    n = n + (thread:get("not_404") or 0)
  end
  io.write(string.format("bench not_404: %d\n", n))
end

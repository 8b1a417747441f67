-- GET <path prefix><i> for i walking 0 .. count-1: each wrk thread takes every nthreads-th key,
-- so no two requests ask for the same key until the set wraps (GET miss relies on that).
--   wrk -t2 -c50 -d10s --latency -s bench/get.lua http://HOST:PORT -- /v1/cache/k 1000 2
-- With BENCH_AUTHORIZATION set (e.g. "Bearer bn_…"), every request sends it as Authorization
-- (from the environment, so the key is not in the command line the report shows).
local threads = 0

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  prefix = args[1]
  count = tonumber(args[2])
  stride = tonumber(args[3]) or 2
  i = id or 0
  local auth = os.getenv("BENCH_AUTHORIZATION")
  if auth and auth ~= "" then
    wrk.headers["Authorization"] = auth
  end
end

function request()
  local path = prefix .. (i % count)
  i = i + stride
  return wrk.format("GET", path)
end

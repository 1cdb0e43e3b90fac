-- wrk script for scripts/bench_ingest.py: send pre-generated (pre-signed) requests read from a file.
--
--   wrk -t T -c C -d D -s requests.lua URL -- <request file> <stop|wrap>
--
-- Request file, one record per request:
--   <METHOD> <PATH> <header count> <body length>\n
--   <Name>: <value>\n            (header count times)
--   <body bytes>\n
-- Thread k of T takes records k, k+T, k+2T, ... so no two threads send the same request.
-- "stop": a thread that has sent all of its records stops (wrk then reports the time actually
-- run), so no request is ever sent twice. "wrap": cycle (for the hello-world baseline only).
-- done() prints one line "BENCHJSON {...}" that the harness parses.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("tid", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local function load_requests(path, tid, nthreads)
   local reqs = {}
   local f = assert(io.open(path, "rb"))
   local i = 0
   while true do
      local line = f:read("*l")
      if not line then break end
      local method, p, nh, blen = line:match("^(%S+) (%S+) (%d+) (%d+)$")
      assert(method, "bad record header: " .. line)
      local headers = {}
      for _ = 1, tonumber(nh) do
         local h = f:read("*l")
         local name, value = h:match("^([^:]+): (.*)$")
         headers[name] = value
      end
      local body = f:read(tonumber(blen))
      f:read("*l")
      if i % nthreads == tid then
         table.insert(reqs, wrk.format(method, p, headers, body))
      end
      i = i + 1
   end
   f:close()
   return reqs
end

function init(args)
   local path = args[1]
   wrap = (args[2] == "wrap")
   nthreads = tonumber(args[3] or "1")
   reqs = load_requests(path, tid, nthreads)
   idx = 0
   wraps = 0
   exhausted = 0
   responses = 0
   statuses = {}
   -- Sent (at most once per connection) after a "stop" thread ran out; answered cheaply, not counted.
   filler = wrk.format("GET", "/healthz", {}, nil)
end

function request()
   if idx >= #reqs then
      if wrap then
         idx = 0
         wraps = wraps + 1
      else
         if exhausted == 0 then
            exhausted = 1
            wrk.thread:stop()
         end
         return filler
      end
   end
   idx = idx + 1
   return reqs[idx]
end

function response(status, headers, body)
   responses = responses + 1
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
   local codes = {}
   local sent, wrapped, exhausted_threads, loaded = 0, 0, 0, 0
   for _, t in ipairs(threads) do
      local st = t:get("statuses")
      for k, v in pairs(st) do codes[k] = (codes[k] or 0) + v end
      sent = sent + t:get("idx") + t:get("wraps") * 0
      wrapped = wrapped + t:get("wraps")
      exhausted_threads = exhausted_threads + t:get("exhausted")
   end
   local parts = {}
   for k, v in pairs(codes) do table.insert(parts, string.format('"%s": %d', k, v)) end
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"mean": %.1f, "stdev": %.1f, "max": %d, "p50": %d, "p75": %d, "p90": %d, "p99": %d, "p999": %d}, ' ..
      '"statuses": {%s}, "sent_records": %d, "wraps": %d, "exhausted_threads": %d, "threads": %d}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9),
      table.concat(parts, ", "), sent, wrapped, exhausted_threads, #threads))
end

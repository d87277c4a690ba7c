-- wrk script: count responses per worker pid, from the body "Hello from <pid>".
--
-- Each wrk thread runs in its own Lua state with its own `counts`; done()
-- runs in the main state and adds them up through the thread objects that
-- setup() kept.  It prints one line for bench/loadgen.py:
--
--   fdbench-json {"requests": N, "duration_us": N, "per_pid": {"PID": N, ...}, ...}
--
-- A new connection per request is `wrk -H "Connection: close"`: the server
-- then closes after each response and wrk reconnects for the next request.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counts = {}
   unmatched = 0
end

function response(status, headers, body)
   local pid = body and string.match(body, "Hello from (%d+)")
   if pid then
      counts[pid] = (counts[pid] or 0) + 1
   else
      unmatched = unmatched + 1
   end
end

function done(summary, latency, requests)
   local total, missed, by_thread = {}, 0, {}
   for _, thread in ipairs(threads) do
      local own = {}
      for pid, n in pairs(thread:get("counts") or {}) do
         total[pid] = (total[pid] or 0) + n
         table.insert(own, string.format('"%s": %d', pid, n))
      end
      table.insert(by_thread, "{" .. table.concat(own, ", ") .. "}")
      missed = missed + (thread:get("unmatched") or 0)
   end
   local pids = {}
   for pid, n in pairs(total) do
      table.insert(pids, string.format('"%s": %d', pid, n))
   end
   local e = summary.errors
   io.write(string.format(
      'fdbench-json {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"unmatched": %d, "latency_us": {"p50": %.0f, "p99": %.0f, "max": %.0f}, ' ..
      '"per_pid": {%s}, "per_thread": [%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout, missed,
      latency:percentile(50), latency:percentile(99), latency.max,
      table.concat(pids, ", "), table.concat(by_thread, ", ")))
end

-- Shared by the benchmark's wrk scripts (loaded with dofile): ends the run with one machine-readable line
-- that bench/run.sh reads. Latencies are in microseconds, as wrk measures them.
-- A script may define bench_extra() to append its own fields (" name=value ...") to that line.
function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  local extra = ""
  if bench_extra ~= nil then extra = bench_extra() end
  io.write(string.format(
    "BENCH requests=%d duration_s=%.3f rps=%.1f p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f mean_us=%.0f status_errors=%d socket_errors=%d%s\n",
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.status, e.connect + e.read + e.write + e.timeout, extra))
end

-- The benchmark's account ids look like Trackunit's (36-character UUIDs): part `run`, number `idx`.
function bench_account(run, idx)
  return string.format("%08x-0000-4000-8000-%012d", run, idx)
end

function bench_env(name, default)
  local value = os.getenv(name)
  if value == nil or value == "" then
    if default == nil then error("bench: " .. name .. " is not set") end
    return default
  end
  return value
end

-- BENCH_DELAY_MS paces each connection: it waits that long before sending its next request, so the load
-- stays below saturation and the latency measured is the service's, not the queue's. wrk's timers count
-- whole milliseconds, so a fraction is a mean: 0.5 waits 0 or 1 ms at random, half of the time each.
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pause ~= nil and pause > 0 then
  local whole, fraction = math.floor(pause), pause - math.floor(pause)
  if fraction == 0 then
    function delay() return whole end
  else
    function delay()
      if math.random() < fraction then return whole + 1 end
      return whole
    end
  end
end

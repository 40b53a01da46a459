-- Signed INSTALLED callbacks, each for a new account (ids bench_account(BENCH_RUN, ...)), all carrying
-- the same identity JWT (BENCH_IDENTITY). With BENCH_COUNT set, thread i of BENCH_THREADS walks its own
-- slice of BENCH_COUNT accounts and starts over at its end (repeats answer 204 "unchanged"); without it
-- every request names a new account.
dofile(os.getenv("BENCH_WRK_DIR") .. "/report.lua")

local next_thread = 0
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local n = 0
local run, share, first

function init(args)
  run = tonumber(bench_env("BENCH_RUN"))
  local count = tonumber(bench_env("BENCH_COUNT", "0"))
  if count > 0 then
    share = math.ceil(count / tonumber(bench_env("BENCH_THREADS")))
  else
    share = 1000000000
  end
  first = tid * share
  wrk.headers["Trackunit-Identity"] = bench_env("BENCH_IDENTITY")
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local idx = first + (n % share)
  n = n + 1
  -- Credentials of realistic length: 36 and 40 characters, distinct per account.
  local body = string.format(
    '{"type":"INSTALLED","irisAppId":"@acme/fleet-insights","accountId":"%s","clientId":"cid-%032d","clientSecret":"csecret-%032d"}',
    bench_account(run, idx), idx, idx)
  return wrk.format("POST", "/callbacks/trackunit", nil, body)
end

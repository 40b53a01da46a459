-- POST /v1/tokens round-robin over BENCH_COUNT accounts (ids bench_account(BENCH_RUN, 0..count-1)), one
-- scope, so each account gets one token. Thread i of BENCH_THREADS walks its own slice of the accounts and
-- starts over at the end of it; bench/run.sh stops wrk once every token is cached.
dofile(os.getenv("BENCH_WRK_DIR") .. "/report.lua")

local next_thread = 0
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local n = 0
local run, share, first, body_format

function init(args)
  run = tonumber(bench_env("BENCH_RUN"))
  share = math.ceil(tonumber(bench_env("BENCH_COUNT")) / tonumber(bench_env("BENCH_THREADS")))
  first = tid * share
  body_format = '{"account_id":"%s","scopes":["' .. bench_env("BENCH_SCOPE") .. '"]}'
  wrk.headers["Authorization"] = "Bearer " .. bench_env("BENCH_KEY")
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local idx = first + (n % share)
  n = n + 1
  return wrk.format("POST", "/v1/tokens", nil, string.format(body_format, bench_account(run, idx)))
end

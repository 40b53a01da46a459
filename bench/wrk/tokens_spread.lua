-- POST /v1/tokens over several replicas and many (account, scope set) keys, chosen at random per request.
-- Thread i of wrk talks to the replica BENCH_PORTS[i mod n], so -t must be a multiple of the replica count
-- for an even spread. BENCH_ACCOUNTS accounts (ids bench_account(BENCH_RUN, 0..n-1)) times the five scope
-- sets below make the keys. BENCH_MIN_TTL, when set, is sent as min_ttl_seconds. With BENCH_TOKEN_PREFIX
-- set, the access tokens received that start with it are collected, and the report adds tokens_seen: how
-- many distinct ones all threads received.
dofile(os.getenv("BENCH_WRK_DIR") .. "/report.lua")

local ports = {}
for port in string.gmatch(bench_env("BENCH_PORTS"), "%d+") do table.insert(ports, port) end
local next_thread = 0
local threads = {}

function setup(thread)
  local port = ports[(next_thread % #ports) + 1]
  thread.addr = wrk.lookup("127.0.0.1", port)[1]
  thread:set("seed", next_thread + 1)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

local prefix = os.getenv("BENCH_TOKEN_PREFIX")
if prefix ~= nil and prefix ~= "" then
  seen = {}
  function response(status, headers, body)
    local from = string.find(body, prefix, 1, true)
    if from ~= nil then
      local to = string.find(body, '"', from, true)
      if to ~= nil then seen[string.sub(body, from, to - 1)] = true end
    end
  end
  -- BENCH_TOKENS_OUT, when set, also gets the tokens themselves, one per line.
  function bench_extra()
    local all, n = {}, 0
    local out = nil
    local path = os.getenv("BENCH_TOKENS_OUT")
    if path ~= nil and path ~= "" then out = assert(io.open(path, "a")) end
    for _, thread in ipairs(threads) do
      for token, _ in pairs(thread:get("seen")) do
        if not all[token] then
          all[token] = true
          n = n + 1
          if out ~= nil then out:write(token, "\n") end
        end
      end
    end
    if out ~= nil then out:close() end
    return string.format(" tokens_seen=%d", n)
  end
end

local scope_sets = {
  '["asset.view"]',
  '["asset.view","asset.edit"]',
  '["telemetry.read"]',
  '["fleet.read","telemetry.read"]',
  '["alerts.view","asset.view","fleet.read"]',
}
local bodies = {}

function init(args)
  math.randomseed(os.time() * 1000 + (seed or 0))
  local run = tonumber(bench_env("BENCH_RUN"))
  local min_ttl = os.getenv("BENCH_MIN_TTL")
  local extra = ""
  if min_ttl ~= nil and min_ttl ~= "" then extra = ',"min_ttl_seconds":' .. min_ttl end
  for a = 0, tonumber(bench_env("BENCH_ACCOUNTS")) - 1 do
    for _, scopes in ipairs(scope_sets) do
      table.insert(bodies, string.format('{"account_id":"%s","scopes":%s%s}', bench_account(run, a), scopes, extra))
    end
  end
  wrk.headers["Authorization"] = "Bearer " .. bench_env("BENCH_KEY")
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  return wrk.format("POST", "/v1/tokens", nil, bodies[math.random(#bodies)])
end

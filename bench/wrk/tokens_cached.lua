-- POST /v1/tokens for one (account, scope set) again and again: the cached path.
-- BENCH_KEY: service key; BENCH_ACCOUNT: account id; BENCH_SCOPE: one scope; BENCH_PROVIDER (optional): a
-- provider named in the body, which otherwise names none (Trackunit, as its callers send it).
dofile(os.getenv("BENCH_WRK_DIR") .. "/report.lua")

local provider = os.getenv("BENCH_PROVIDER")
local provider_member = ""
if provider ~= nil and provider ~= "" then provider_member = string.format('"provider":"%s",', provider) end

wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. bench_env("BENCH_KEY")
wrk.headers["Content-Type"] = "application/json"
wrk.body = string.format('{%s"account_id":"%s","scopes":["%s"]}', provider_member, bench_env("BENCH_ACCOUNT"), bench_env("BENCH_SCOPE"))

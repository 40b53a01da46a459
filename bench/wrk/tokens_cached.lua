-- POST /v1/tokens for one (account, scope set) again and again: the cached path.
-- BENCH_KEY: service key; BENCH_ACCOUNT: account id; BENCH_SCOPE: one scope.
dofile(os.getenv("BENCH_WRK_DIR") .. "/report.lua")

wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. bench_env("BENCH_KEY")
wrk.headers["Content-Type"] = "application/json"
wrk.body = string.format('{"account_id":"%s","scopes":["%s"]}', bench_env("BENCH_ACCOUNT"), bench_env("BENCH_SCOPE"))

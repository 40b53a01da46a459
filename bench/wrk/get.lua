-- A plain GET of the URL given to wrk (the healthz baseline), with the benchmark's report.
dofile(os.getenv("BENCH_WRK_DIR") .. "/report.lua")

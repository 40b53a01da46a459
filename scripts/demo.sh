#!/usr/bin/env bash
# Usage: scripts/demo.sh TOKENVAULT_BINARY    (run by `make demo`, inside scripts/with-env.sh dev)
#
# The whole path of a token, on this machine, in under a minute: starts the Trackunit sandbox
# (`tokenvault sandbox`) and tokenvault pointed at it, sends a signed install, creates a service key, and
# fetches a token with curl, printing each step and the curl line to repeat it. Ctrl-C stops both
# processes and cleans up. DEMO_EXIT=1 stops right after the token (the test of this script does).
# Needs DATABASE_URL and TOKENVAULT_ENCRYPTION_KEYS(_FILE), which scripts/with-env.sh sets up.
set -euo pipefail

bin=${1:?usage: scripts/demo.sh TOKENVAULT_BINARY}
root=$(cd "$(dirname "$0")/.." && pwd)
work="$root/.tmp/demo"
mkdir -p "$work"
step() { printf '\n== %s\n' "$*"; }
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'printf "\nstopping\n"; exit 0' INT TERM

if ! command -v curl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
  else
    echo "demo: curl is needed" >&2; exit 1
  fi
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { local port=$1; while port_in_use "$port"; do port=$((port + 1)); done; echo "$port"; }
wait_for() {
  for _ in $(seq 1 100); do if "$@" >/dev/null 2>&1; then return 0; fi; sleep 0.1; done
  echo "demo: gave up waiting for: $*" >&2; return 1
}

sandbox_port=$(free_port 18090)
public_port=$(free_port 18080)
internal_port=$(free_port $((public_port + 1)))
account="demo-account-$RANDOM"

step "1. migrate the database"
"$bin" migrate

step "2. start the Trackunit sandbox on 127.0.0.1:$sandbox_port (log: .tmp/demo/sandbox.log)"
"$bin" sandbox --listen "127.0.0.1:$sandbox_port" --token-lifetime-secs 600 >"$work/sandbox.log" 2>&1 &
pids+=($!)
wait_for curl -sf "http://127.0.0.1:$sandbox_port/healthz"

step "3. start tokenvault pointed at the sandbox: public :$public_port, internal :$internal_port (log: .tmp/demo/tokenvault.log)"
export TOKENVAULT_TRACKUNIT_JWKS_URL="http://127.0.0.1:$sandbox_port/jwks"
export TOKENVAULT_TRACKUNIT_TOKEN_URL="http://127.0.0.1:$sandbox_port/apptoken"
export TOKENVAULT_PUBLIC_ADDR="127.0.0.1:$public_port"
export TOKENVAULT_INTERNAL_ADDR="127.0.0.1:$internal_port"
TOKENVAULT_LOG_FORMAT=pretty "$bin" serve >"$work/tokenvault.log" 2>&1 &
pids+=($!)
wait_for "$bin" healthcheck
wait_for "$bin" healthcheck --internal

step "4. the sandbox sends tokenvault a signed INSTALLED callback for $account"
"$bin" sandbox install --sandbox "http://127.0.0.1:$sandbox_port" --url "http://127.0.0.1:$public_port" \
  --app @sandbox/demo-app --account "$account"

step "5. create a service key for $account"
key=$("$bin" clients create --name "demo-$account" --account "$account" --scope demo.read | tail -n 1)
echo "key: ${key:0:8}… (printed once by clients create; kept in this shell only)"

step "6. fetch a token with curl"
request=(curl -sS "http://127.0.0.1:$internal_port/v1/tokens" -H "Authorization: Bearer $key"
  -H 'Content-Type: application/json' -d "{\"account_id\": \"$account\", \"scopes\": [\"demo.read\"]}")
answer=$("${request[@]}")
echo "$answer"
case "$answer" in *'"access_token"'*) ;; *) echo "demo: no token in the answer" >&2; exit 1 ;; esac

echo
echo "Repeat it (the second answer comes from memory):"
echo "  curl -sS http://127.0.0.1:$internal_port/v1/tokens -H 'Authorization: Bearer $key' \\"
echo "    -H 'Content-Type: application/json' -d '{\"account_id\": \"$account\", \"scopes\": [\"demo.read\"]}'"
echo "Make the sandbox fail:  curl -sS -X POST http://127.0.0.1:$sandbox_port/sandbox/mode -H 'Content-Type: application/json' -d '{\"mode\": \"server_error\"}'"
[ "${DEMO_EXIT:-0}" = 1 ] && exit 0
echo
echo "Both keep running; press Ctrl-C to stop them."
while :; do sleep 3600; done

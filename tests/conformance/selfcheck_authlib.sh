#!/usr/bin/env bash
# Usage: tests/conformance/selfcheck_authlib.sh
#
# Checks tests/conformance/authlib_server.py by itself, with curl: starts it with a few configs (standard/
# Keycloak, Trulioo-style, JWT + over-granting + no rotation, refuse-scope), exercises every documented
# behaviour, compares with what the Rust conformance tests rely on, and stops the servers on exit.
# Uses $TOKENVAULT_CONFORMANCE_PYTHON, or runs scripts/conformance-setup.sh (Python part only) to get it.
# Prints one line per check and a closing "N passed, N failed"; exits non-zero on any mismatch.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
server="$root/tests/conformance/authlib_server.py"
python=${TOKENVAULT_CONFORMANCE_PYTHON:-}
if [ -z "$python" ]; then
  python=$(TOKENVAULT_CONFORMANCE_SKIP_NODE=1 "$root/scripts/conformance-setup.sh" | sed -n 's/^TOKENVAULT_CONFORMANCE_PYTHON=//p')
fi
mkdir -p "$root/.tmp/conformance"
work=$(mktemp -d "$root/.tmp/conformance/selfcheck.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok   %s\n' "$1"; }
bad() { failed=$((failed + 1)); printf 'FAIL %s\n' "$1"; }
# check NAME ACTUAL EXPECTED
check() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1: got '$2', want '$3'"; fi; }

# start NAME CONFIG_JSON: starts a server, sets $port. Fails the run if it is not listening within 10 s.
start() {
  local name=$1 t0 t1 i
  printf '%s\n' "$2" >"$work/$name.json"
  t0=$(date +%s%N)
  "$python" "$server" --config "$work/$name.json" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for i in $(seq 1000); do
    grep -q '^LISTENING ' "$work/$name.out" && break
    sleep 0.01
  done
  t1=$(date +%s%N)
  port=$(sed -n 's/^LISTENING \([0-9][0-9]*\)$/\1/p' "$work/$name.out")
  if [ -z "$port" ] || [ "$(wc -l <"$work/$name.out")" != 1 ]; then
    cat "$work/$name.err" >&2
    bad "$name: server did not print exactly one LISTENING line"
    exit 1
  fi
  ok "$name: listening on $port after $(((t1 - t0) / 1000000)) ms"
}

# post PATH ARGS...: POST to the server on $port; sets $status and $body (also in $work/body).
post() {
  local path=$1
  shift
  status=$(curl -sS -o "$work/body" -w '%{http_code}' -X POST "http://127.0.0.1:$port$path" "$@")
  body=$(cat "$work/body")
}
j() { jq -r "$1" <<<"$body"; }          # j FILTER: field of the last reply
cc_post() { post /token -d grant_type=client_credentials -d client_id="$1" --data-urlencode "client_secret=$2" "${@:3}"; }
refresh() { post /token -d grant_type=refresh_token --data-urlencode "refresh_token=$1" "${@:2}"; }
stats() { curl -sS "http://127.0.0.1:$port/stats"; }

secret='s3cret+x y:z/%'  # needs form-urlencoding in both client auth methods
secret_basic='s3cret%2Bx+y%3Az%2F%25'

# --- A: standard / Keycloak ------------------------------------------------------------------------------
start standard "$(jq -n --arg s "$secret" '{
  clients: [
    {client_id: "svc", client_secret: $s, auth_methods: ["client_secret_post", "client_secret_basic"],
     grant_types: ["client_credentials", "refresh_token"], scope: "a b c"},
    {client_id: "postonly", client_secret: "p0st", auth_methods: ["client_secret_post"],
     grant_types: ["client_credentials", "refresh_token"], scope: "a"},
    {client_id: "pub", client_secret: null, grant_types: ["refresh_token"], scope: "a"}
  ],
  access_token_lifetime_secs: 5, refresh_token_lifetime_secs: 3,
  client_credentials_refresh_tokens: true, rotate_refresh_tokens: true,
  delegated_refresh_tokens: [
    {refresh_token: "rt-delegated-alice", client_id: "svc", scope: "a b", user: "alice"},
    {refresh_token: "rt-delegated-pub", client_id: "pub", scope: "a", user: "bob"}
  ]}')"

check "health" "$(curl -sS "http://127.0.0.1:$port/health")" "ok"

cc_post svc "$secret"
check "cc post: status" "$status" 200
check "cc post: token_type" "$(j .token_type)" Bearer
check "cc post: expires_in" "$(j .expires_in)" 5
check "cc post: scope defaults to the client's" "$(j .scope)" "a b c"
check "cc post: opaque access token" "$(j .access_token | grep -c '^at-[0-9]*-[0-9a-f]*$')" 1
check "cc post: refresh_expires_in" "$(j .refresh_expires_in)" 3
check "cc post: refresh token" "$(j .refresh_token | grep -c '^rt-[0-9a-f]*$')" 1
rt1=$(j .refresh_token)

post /token -u "svc:$secret_basic" -d grant_type=client_credentials -d scope=a
check "cc basic (form-urlencoded credentials): status" "$status" 200
check "cc basic: requested scope granted" "$(j .scope)" a

post /realms/test/protocol/openid-connect/token -u "svc:$secret_basic" -d grant_type=client_credentials
check "keycloak path: status" "$status" 200

cc_post svc wrong
check "wrong secret (post): 401" "$status" 401
check "wrong secret (post): invalid_client" "$(j .error)" invalid_client
post /token -u svc:wrong -d grant_type=client_credentials
check "wrong secret (basic): 401 invalid_client" "$status $(j .error)" "401 invalid_client"
cc_post nobody x
check "unknown client (post): 401 invalid_client" "$status $(j .error)" "401 invalid_client"
post /token -u nobody:x -d grant_type=client_credentials
check "unknown client (basic): 401 invalid_client" "$status $(j .error)" "401 invalid_client"
post /token -u postonly:p0st -d grant_type=client_credentials
check "auth method not allowed for client: 401 invalid_client" "$status $(j .error)" "401 invalid_client"
cc_post postonly p0st
check "post-only client via post: 200" "$status" 200
cc_post svc "$secret" -d "scope=a z"
check "scope beyond the client's: invalid_scope" "$status $(j .error)" "400 invalid_scope"
post /token -d grant_type=client_credentials -d client_id=pub
check "public client cannot use client_credentials" "$status $(j .error)" "400 unauthorized_client"
post /token -u "svc:$secret_basic" -d grant_type=password -d username=u -d password=p
check "unsupported grant type" "$status $(j .error)" "400 unsupported_grant_type"
post "/token?client_id=svc" -d grant_type=client_credentials --data-urlencode "client_secret=$secret"
check "parameters in the query string refused" "$status $(j .error)" "400 invalid_request"

refresh "$rt1" -u "svc:$secret_basic"
check "refresh: status" "$status" 200
check "refresh: scope kept" "$(j .scope)" "a b c"
check "refresh: rotated (refresh_expires_in)" "$(j .refresh_expires_in)" 3
rt2=$(j .refresh_token)
check "refresh: new refresh token differs" "$([ -n "$rt2" ] && [ "$rt2" != null ] && [ "$rt2" != "$rt1" ] && echo yes)" yes
refresh "$rt1" -u "svc:$secret_basic"
check "reuse of rotated refresh token: invalid_grant" "$status $(j .error)" "400 invalid_grant"
check "reuse counted" "$(stats | jq .refresh_reuse)" 1
refresh "$rt2" -d client_id=svc --data-urlencode "client_secret=$secret" -d scope=a
check "refresh with narrower scope" "$status $(j .scope)" "200 a"
rt3=$(j .refresh_token)
refresh "$rt3" -u "svc:$secret_basic" -d "scope=a b"
check "rotated token keeps the original scope (RFC 6749 §6)" "$status $(j .scope)" "200 a b"
rt4=$(j .refresh_token)
refresh "$rt4" -u "svc:$secret_basic" -d "scope=a d"
check "refresh beyond the original scope: invalid_scope" "$status $(j .error)" "400 invalid_scope"
refresh "$rt4" -d client_id=postonly -d client_secret=p0st
check "refresh token of another client: invalid_grant" "$status $(j .error)" "400 invalid_grant"
refresh "$rt4" -u svc:wrong
check "refresh with wrong secret: 401 invalid_client" "$status $(j .error)" "401 invalid_client"
refresh rt-never-issued -u "svc:$secret_basic"
check "unknown refresh token: invalid_grant" "$status $(j .error)" "400 invalid_grant"

refresh rt-delegated-alice -u "svc:$secret_basic"
check "delegated refresh token: 200 with its scope" "$status $(j .scope)" "200 a b"
check "delegated refresh token: rotated" "$(j .refresh_token | grep -c '^rt-')" 1
refresh rt-delegated-alice -u "svc:$secret_basic"
check "delegated refresh token reuse: invalid_grant" "$status $(j .error)" "400 invalid_grant"
refresh rt-delegated-pub -d client_id=pub
check "public client (auth none) refreshes its delegated token" "$status" 200

cc_post svc "$secret"
rt_old=$(j .refresh_token)
sleep 3.3
refresh "$rt_old" -u "svc:$secret_basic"
check "expired refresh token: invalid_grant" "$status $(j .error)" "400 invalid_grant"
refresh "$rt4" -u "svc:$secret_basic"
check "expired rotated refresh token: invalid_grant" "$status $(j .error)" "400 invalid_grant"

cc_post svc "$secret"
rt_fresh=$(j .refresh_token)
post /admin/expire-refresh-tokens
check "admin expire: 200 {}" "$status $body" "200 {}"
refresh "$rt_fresh" -u "svc:$secret_basic"
check "refresh after admin expire: invalid_grant" "$status $(j .error)" "400 invalid_grant"

# 29 token requests: 6 client_credentials and 5 refresh_token grants succeeded (each issuing a refresh
# token), 6 client authentications refused, 2 reuses (rt1, rt-delegated-alice).
check "stats" "$(stats | jq -c .)" \
  '{"grants":{"client_credentials":6,"refresh_token":5},"invalid_client":6,"issued_refresh_tokens":11,"refresh_reuse":2,"requests":29}'
post /stats/reset
check "stats reset: 200 {}" "$status $body" "200 {}"
check "stats after reset" "$(stats | jq -c .)" \
  '{"grants":{"client_credentials":0,"refresh_token":0},"invalid_client":0,"issued_refresh_tokens":0,"refresh_reuse":0,"requests":0}'

# --- B: Trulioo-style reply --------------------------------------------------------------------------------
start trulioo '{"clients": [{"client_id": "tru", "client_secret": "t", "scope": "x"}],
  "reply_style": "trulioo", "client_credentials_refresh_tokens": true, "access_token_lifetime_secs": 60}'
cc_post tru t
check "trulioo: status" "$status" 200
check "trulioo: member names" "$(j 'keys | join(",")')" "ExpiresIn,Token,TokenType,scope"
check "trulioo: values" "$(j '[.TokenType, (.ExpiresIn|type), .ExpiresIn, .scope] | join(",")')" "Bearer,number,60,x"
check "trulioo: token" "$(j .Token | grep -c '^at-')" 1

# --- C: JWT access tokens, over-granting, no rotation ------------------------------------------------------
start jwt '{"clients": [{"client_id": "svc", "client_secret": "j", "grant_types": ["client_credentials", "refresh_token"],
  "scope": "a b"}], "jwt_access_tokens": true, "access_token_lifetime_secs": 42, "grant_scope_override": "a b admin",
  "client_credentials_refresh_tokens": true, "rotate_refresh_tokens": false}'
post /token -u svc:j -d grant_type=client_credentials -d scope=a
check "jwt: status" "$status" 200
check "jwt: over-granted scope" "$(j .scope)" "a b admin"
at=$(j .access_token)
b64url() { local s=${1//-/+}; s=${s//_//}; while [ $((${#s} % 4)) != 0 ]; do s="$s="; done; base64 -d <<<"$s"; }
header=$(b64url "$(cut -d. -f1 <<<"$at")")
claims=$(b64url "$(cut -d. -f2 <<<"$at")")
check "jwt: header" "$(jq -c '[.alg, .typ]' <<<"$header")" '["HS256","at+jwt"]'
check "jwt: exp - iat = lifetime" "$(jq '.exp - .iat' <<<"$claims")" 42
check "jwt: exp near now + lifetime" "$(jq --argjson now "$(date +%s)" '(.exp - $now - 42) | fabs <= 5' <<<"$claims")" true
check "jwt: sub, scope, jti" "$(jq -r '[.sub, .scope, (.jti|type)] | join(",")' <<<"$claims")" "svc,a b admin,string"
rt=$(j .refresh_token)
refresh "$rt" -u svc:j
check "no rotation: refresh ok without a new refresh token" "$status $(j .refresh_token)" "200 null"
refresh "$rt" -u svc:j
check "no rotation: refresh token reusable" "$status" 200
check "no rotation: no reuse counted" "$(stats | jq .refresh_reuse)" 0

# --- D: endpoint refusing the scope parameter --------------------------------------------------------------
start noscope '{"clients": [{"client_id": "tri", "client_secret": "u", "scope": "s"}], "refuse_scope_parameter": true}'
cc_post tri u
check "refuse scope: without scope 200" "$status $(j .scope) $(j .expires_in)" "200 s 300"
cc_post tri u -d scope=s
check "refuse scope: with scope invalid_request" "$status $(j .error)" "400 invalid_request"

# --- logs never carry secrets or refresh tokens ------------------------------------------------------------
leaks=$(cat "$work"/*.err | grep -c -e 's3cret' -e 'p0st' -e 'rt-' || true)
check "no secret or refresh token in the logs" "$leaks" 0

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

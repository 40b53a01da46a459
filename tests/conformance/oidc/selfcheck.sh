#!/usr/bin/env bash
# Self-check of the conformance authorization server (server.mjs), with curl.
#
#   bash tests/conformance/oidc/selfcheck.sh
#
# Starts server.mjs on a sample config, checks the interface the Rust tests
# rely on (LISTENING line, token responses, RS256 JWTs verifiable with /jwks,
# 401 invalid_client, /stats counters, startup time), and kills the server on
# exit (trap). Exits 0 only if every check passed. Needs node, npm and curl; JSON
# is read with node, so jq is not needed. Installs node_modules with `npm ci`
# (from package-lock.json) if they are missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

failures=0
checks=0
pass() { checks=$((checks + 1)); echo "ok   - $1"; }
bad() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL - $1" >&2; }
# expect NAME ACTUAL EXPECTED
expect() {
  if [[ "$2" == "$3" ]]; then pass "$1 ($2)"; else bad "$1: got '$2', expected '$3'"; fi
}

if [[ ! -f node_modules/oidc-provider/package.json ]]; then
  echo "# node_modules missing: npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

lifetime=5
resource="urn:tokenvault:test-api"
basic_secret="s3cret-basic-$RANDOM$RANDOM"
post_secret="s3cret-post-$RANDOM$RANDOM"
cat >"$work/config.json" <<EOF
{ "clients": [
    {"client_id": "svc", "client_secret": "$basic_secret", "auth_method": "client_secret_basic", "scope": "api.read api.write"},
    {"client_id": "svc-post", "client_secret": "$post_secret", "auth_method": "client_secret_post", "scope": "api.read"}
  ],
  "access_token_lifetime_secs": $lifetime,
  "resource": "$resource" }
EOF

# json FILE EXPR: prints the JavaScript expression EXPR evaluated with `j` = the
# parsed JSON in FILE (undefined prints as "undefined").
json() {
  node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); console.log(String(eval(process.argv[2])))' "$1" "$2"
}

# --- start the server and time it until LISTENING --------------------------------
start_ns=$(date +%s%N)
node server.mjs --config "$work/config.json" >"$work/stdout" 2>"$work/stderr" &
server_pid=$!
port=""
for _ in $(seq 1 200); do # up to 10 s
  if grep -q '^LISTENING ' "$work/stdout" 2>/dev/null; then
    port="$(awk '/^LISTENING /{print $2; exit}' "$work/stdout")"
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
  sleep 0.05
done
startup_ms=$((($(date +%s%N) - start_ns) / 1000000))
if [[ -z "$port" ]]; then
  echo "FAIL - server did not print LISTENING within 10 s; stderr:" >&2
  cat "$work/stderr" >&2
  exit 1
fi
pass "LISTENING on port $port after ${startup_ms} ms"
if ((startup_ms < 2000)); then pass "startup under 2 s"; else bad "startup took ${startup_ms} ms (>= 2000)"; fi

base="http://127.0.0.1:$port"
token_url="$base/token"

# post NAME CURL-ARGS...: POSTs to the token endpoint, body in $work/NAME.json,
# prints the HTTP status.
post() {
  local name="$1"
  shift
  curl -sS -o "$work/$name.json" -w '%{http_code}' -X POST "$@" "$token_url"
}

expect "stats reset" "$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$base/stats/reset")" 200

# --- jwks and discovery ------------------------------------------------------------
expect "GET /jwks" "$(curl -sS -o "$work/jwks.json" -w '%{http_code}' "$base/jwks")" 200
expect "discovery issuer" \
  "$(curl -sS "$base/.well-known/oauth-authorization-server" -o "$work/disc.json" && json "$work/disc.json" 'j.issuer')" "$base"
expect "discovery token_endpoint" "$(json "$work/disc.json" 'j.token_endpoint')" "$base/token"

# verify_jwt NAME TOKEN-FILE EXPECTED-CLIENT EXPECTED-SCOPE: decodes and checks
# the JWT, and verifies its RS256 signature with the key of its kid in /jwks.
verify_jwt() {
  local name="$1" file="$2" client="$3" scope="$4"
  local out
  if out="$(node - "$file" "$work/jwks.json" "$lifetime" "$base" "$resource" "$client" "$scope" <<'EOF'
const crypto = require('node:crypto');
const fs = require('node:fs');
const [file, jwksFile, lifetime, iss, aud, client, scope] = process.argv.slice(2);
const token = JSON.parse(fs.readFileSync(file, 'utf8')).access_token;
const jwks = JSON.parse(fs.readFileSync(jwksFile, 'utf8'));
const [h, p, s] = token.split('.');
const header = JSON.parse(Buffer.from(h, 'base64url'));
const payload = JSON.parse(Buffer.from(p, 'base64url'));
const problems = [];
const want = (what, got, expected) => { if (got !== expected) problems.push(`${what}: got ${JSON.stringify(got)}, expected ${JSON.stringify(expected)}`); };
want('header.alg', header.alg, 'RS256');
want('header.typ', header.typ, 'at+jwt');
const jwk = jwks.keys.find((k) => k.kid === header.kid);
if (!header.kid || !jwk) problems.push(`kid ${header.kid} not in /jwks`);
want('exp - iat', payload.exp - payload.iat, Number(lifetime));
want('iss', payload.iss, iss);
want('aud', payload.aud, aud);
want('client_id', payload.client_id, client);
want('sub', payload.sub, client);
want('scope', payload.scope, scope === '-' ? undefined : scope);
if (jwk) {
  const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
  const ok = crypto.verify('RSA-SHA256', Buffer.from(`${h}.${p}`), key, Buffer.from(s, 'base64url'));
  if (!ok) problems.push('RS256 signature does not verify with the /jwks key');
  // And a tampered payload must not verify.
  const forged = Buffer.from(JSON.stringify({ ...payload, scope: 'api.admin' })).toString('base64url');
  if (crypto.verify('RSA-SHA256', Buffer.from(`${h}.${forged}`), key, Buffer.from(s, 'base64url'))) problems.push('a tampered payload verifies');
}
if (problems.length) { console.log(problems.join('; ')); process.exit(1); }
console.log(`kid=${header.kid} exp-iat=${payload.exp - payload.iat} scope=${payload.scope}`);
EOF
  )"; then
    pass "$name: JWT $out, signature verified with /jwks"
  else
    bad "$name: JWT: $out"
  fi
}

# --- 1. client_secret_basic, scope=api.read, no resource parameter ---------------
expect "basic: status" "$(post basic -u "svc:$basic_secret" -d grant_type=client_credentials -d scope=api.read)" 200
expect "basic: token_type" "$(json "$work/basic.json" 'j.token_type')" Bearer
expect "basic: expires_in" "$(json "$work/basic.json" 'j.expires_in')" "$lifetime"
expect "basic: scope" "$(json "$work/basic.json" 'j.scope')" api.read
expect "basic: has access_token" "$(json "$work/basic.json" 'typeof j.access_token')" string
verify_jwt "basic" "$work/basic.json" svc api.read

# --- 2. client_secret_post (second client), with the resource parameter ---------
expect "post: status" "$(post post -d client_id=svc-post -d "client_secret=$post_secret" \
  -d grant_type=client_credentials -d scope=api.read --data-urlencode "resource=$resource")" 200
expect "post: token_type" "$(json "$work/post.json" 'j.token_type')" Bearer
expect "post: expires_in" "$(json "$work/post.json" 'j.expires_in')" "$lifetime"
expect "post: scope" "$(json "$work/post.json" 'j.scope')" api.read
verify_jwt "post" "$work/post.json" svc-post api.read

# --- 3. two scopes; then no scope and no resource at all -------------------------
expect "two scopes: status" "$(post two -u "svc:$basic_secret" -d grant_type=client_credentials --data-urlencode 'scope=api.read api.write')" 200
expect "two scopes: scope" "$(json "$work/two.json" 'j.scope')" "api.read api.write"
verify_jwt "two scopes" "$work/two.json" svc "api.read api.write"

expect "no scope: status" "$(post noscope -d client_id=svc-post -d "client_secret=$post_secret" -d grant_type=client_credentials)" 200
expect "no scope: expires_in" "$(json "$work/noscope.json" 'j.expires_in')" "$lifetime"
# oidc-provider issues a token without scope (no default scope) when none is asked.
expect "no scope: no scope member" "$(json "$work/noscope.json" 'j.scope')" undefined
verify_jwt "no scope" "$work/noscope.json" svc-post -

# --- 4. errors ----------------------------------------------------------------------
expect "wrong secret: status" "$(post wrong -u "svc:not-the-secret" -d grant_type=client_credentials -d scope=api.read)" 401
expect "wrong secret: error" "$(json "$work/wrong.json" 'j.error')" invalid_client
expect "wrong secret (post): status" "$(post wrongpost -d client_id=svc-post -d client_secret=nope -d grant_type=client_credentials)" 401
expect "wrong secret (post): error" "$(json "$work/wrongpost.json" 'j.error')" invalid_client
expect "unknown client: status" "$(post unknown -u "nobody:x" -d grant_type=client_credentials)" 401
expect "unknown client: error" "$(json "$work/unknown.json" 'j.error')" invalid_client
expect "scope not allowed: status" "$(post notallowed -d client_id=svc-post -d "client_secret=$post_secret" -d grant_type=client_credentials -d scope=api.write)" 400
expect "scope not allowed: error" "$(json "$work/notallowed.json" 'j.error')" invalid_scope
expect "other resource: status" "$(post otherres -u "svc:$basic_secret" -d grant_type=client_credentials -d resource=urn:other)" 400
expect "other resource: error" "$(json "$work/otherres.json" 'j.error')" invalid_target

# Not a check, a note: oidc-provider does not hold a client to its registered
# method among client_secret_basic/client_secret_post (see server.mjs).
cross="$(post cross -d client_id=svc -d "client_secret=$basic_secret" -d grant_type=client_credentials)"
echo "note - basic-registered client authenticating with client_secret_post: HTTP $cross"

# --- 5. stats -----------------------------------------------------------------------
# 4 successful grants (+1 if the note's request succeeded), 3 invalid_client
# (two wrong secrets, one unknown client; +1 if the note's request failed so),
# 10 token endpoint requests in all (the invalid_scope/invalid_target ones too).
curl -sS "$base/stats" -o "$work/stats.json"
if [[ "$cross" == 200 ]]; then grants=5 invalid=3; else grants=4 invalid=4; fi
expect "stats: grants.client_credentials" "$(json "$work/stats.json" 'j.grants.client_credentials')" "$grants"
expect "stats: invalid_client" "$(json "$work/stats.json" 'j.invalid_client')" "$invalid"
expect "stats: requests" "$(json "$work/stats.json" 'j.requests')" 10
expect "stats: exact shape" "$(json "$work/stats.json" 'JSON.stringify(Object.keys(j))+JSON.stringify(Object.keys(j.grants))')" '["grants","invalid_client","requests"]["client_credentials"]'
curl -sS -X POST "$base/stats/reset" -o "$work/reset.json"
expect "stats reset answer" "$(json "$work/reset.json" 'JSON.stringify(j)')" '{"grants":{"client_credentials":0},"invalid_client":0,"requests":0}'
curl -sS "$base/stats" -o "$work/stats2.json"
expect "stats after reset" "$(json "$work/stats2.json" 'JSON.stringify(j)')" '{"grants":{"client_credentials":0},"invalid_client":0,"requests":0}'

# --- 6. output discipline -------------------------------------------------------------
expect "stdout is exactly the LISTENING line" "$(cat "$work/stdout")" "LISTENING $port"
if grep -qF -e "$basic_secret" -e "$post_secret" "$work/stderr"; then
  bad "a client secret appears in the server's stderr"
else
  pass "no client secret in the server's stderr"
fi

# --- 7. SIGTERM stops it cleanly --------------------------------------------------------
kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
server_pid=""
expect "exit code after SIGTERM" "$rc" 0

echo "# server stderr:"
sed 's/^/#   /' "$work/stderr"
echo "$((checks - failures)) passed, $failures failed"
((failures == 0))

#!/usr/bin/env bash
# Usage: scripts/with-env.sh dev|test COMMAND [ARGS...]
#
# Runs COMMAND with everything tokenvault needs on this machine, setting up what is missing:
# - DATABASE_URL: when unset, a private PostgreSQL cluster under .tmp/ (or /tmp/tokenvault-<hash>/ when the
#   postgres user cannot reach the checkout; installed with apt-get when the
#   binaries are missing and we are root), started on 127.0.0.1 and left running for the next command.
#   `dev` keeps data durably; `test` trades durability for speed (fsync off). Each cluster takes the first
#   free port from 54329 (dev) or 54330 (test) and remembers it in its directory (tokenvault.port).
# - TOKENVAULT_ENCRYPTION_KEYS: when unset, a development key kept in .tmp/dev-encryption-key.
# - test only: the conformance servers' packages (scripts/conformance-setup.sh: a Python venv and npm ci under
#   tests/conformance/), exported as TOKENVAULT_CONFORMANCE_PYTHON and TOKENVAULT_CONFORMANCE_NODE_DIR.
# Nothing here is for production: there, set DATABASE_URL and TOKENVAULT_ENCRYPTION_KEYS yourself.
set -euo pipefail

mode=${1:?usage: scripts/with-env.sh dev|test COMMAND...}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
tmp="$root/.tmp"
mkdir -p "$tmp"

say() { printf 'with-env: %s\n' "$*" >&2; }

# The directory holding initdb, pg_ctl and pg_isready together: Debian's versioned directory first (the
# names on PATH may be lone symlinks or Debian's wrappers), then wherever initdb is on PATH.
find_pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; fi
}

ensure_pg_bin() {
  local bin
  bin=$(find_pg_bin || true)
  if [ -z "$bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "PostgreSQL is not installed; installing it with apt-get"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
      bin=$(find_pg_bin || true)
    fi
  fi
  [ -n "$bin" ] || { say "PostgreSQL binaries not found: install PostgreSQL or set DATABASE_URL"; exit 1; }
  echo "$bin"
}

# Runs a PostgreSQL tool as the owner of the cluster: initdb refuses to run as root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Where a cluster's files live: under .tmp/, unless we are root and the postgres user cannot reach it
# (a checkout under /root, say); then under /tmp, keyed by the checkout's path.
cluster_dir() {
  local name=$1
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$tmp" 2>/dev/null; then
    echo "/tmp/tokenvault-$(printf '%s' "$root" | sha1sum | cut -c1-12)/$name"
  else
    echo "$tmp/$name"
  fi
}

# Starts (creating it first if needed) the cluster in $2, preferring port $1; prints the port it uses.
# A cluster keeps its port in its directory, so each checkout gets its own even when another already
# listens on the preferred port.
start_private_cluster() {
  local port=$1 data=$2 options=$3 bin
  bin=$(ensure_pg_bin)
  if [ ! -s "$data/PG_VERSION" ]; then
    say "creating a private PostgreSQL cluster in $data"
    mkdir -p "$data"
    if [ "$(id -u)" = 0 ]; then chown postgres "$data" "$(dirname "$data")"; chmod 700 "$data"; fi
    as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if [ -s "$data/tokenvault.port" ]; then port=$(cat "$data/tokenvault.port"); fi
  if ! as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    while port_in_use "$port"; do port=$((port + 1)); done
    echo "$port" | as_pg tee "$data/tokenvault.port" >/dev/null
    say "starting it on 127.0.0.1:$port"
    as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 \
      -o "-p $port -k $data -c listen_addresses=127.0.0.1 $options" start >/dev/null
  fi
  for _ in $(seq 1 50); do
    if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then echo "$port"; return 0; fi
    sleep 0.2
  done
  say "PostgreSQL did not come up; see $data/server.log"; exit 1
}

if [ -z "${DATABASE_URL:-}" ]; then
  case "$mode" in
    dev)  port=$(start_private_cluster "${TOKENVAULT_DEV_PG_PORT:-54329}" "$(cluster_dir pg-dev)" "") ;;
    test) port=$(start_private_cluster "${TOKENVAULT_TEST_PG_PORT:-54330}" "$(cluster_dir pg-test)" \
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=500") ;;
    *) say "unknown mode $mode (dev or test)"; exit 2 ;;
  esac
  bin=$(find_pg_bin)
  if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "select 1 from pg_database where datname = 'tokenvault'" | grep -q 1; then
    "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qc "create database tokenvault" >/dev/null
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/tokenvault"
fi

if [ -z "${TOKENVAULT_ENCRYPTION_KEYS:-}" ] && [ -z "${TOKENVAULT_ENCRYPTION_KEYS_FILE:-}" ]; then
  keyfile="$tmp/dev-encryption-key"
  if [ ! -s "$keyfile" ]; then
    (umask 077; printf 'dev:%s\n' "$(head -c 32 /dev/urandom | base64)" > "$keyfile")
    say "generated a development encryption key in $keyfile"
  fi
  export TOKENVAULT_ENCRYPTION_KEYS_FILE="$keyfile"
fi

# The test suite's conformance tests start real OAuth2 servers (tests/conformance/): set up their Python and
# Node packages when missing (idempotent; seconds the first time, nothing after).
if [ "$mode" = test ] && [ -z "${TOKENVAULT_CONFORMANCE_PYTHON:-}" ]; then
  conformance=$("$root/scripts/conformance-setup.sh")
  while IFS='=' read -r name value; do
    case "$name" in TOKENVAULT_CONFORMANCE_*) export "$name=$value" ;; esac
  done <<<"$conformance"
fi

exec "$@"

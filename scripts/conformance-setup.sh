#!/usr/bin/env bash
# Usage: scripts/conformance-setup.sh
#
# Prepares what the conformance tests (tests/conformance/) run on, idempotently:
# 1. a Python venv at .tmp/conformance/venv with tests/conformance/requirements.txt installed in it
#    (reinstalled only when requirements.txt changed: the sha256 of the installed one is kept in a stamp);
# 2. when tests/conformance/oidc/package-lock.json exists, `npm ci` in that directory (again only when the
#    lock file changed, or node_modules is missing). Set TOKENVAULT_CONFORMANCE_SKIP_NODE=1 to skip this part.
#
# On success it prints, on stdout and nothing else:
#   TOKENVAULT_CONFORMANCE_PYTHON=<absolute path of the venv's python>
#   TOKENVAULT_CONFORMANCE_NODE_DIR=<absolute path of tests/conformance/oidc>   (only if it has node_modules)
# Progress and errors go to stderr, every line prefixed `conformance-setup: `. Installer output is kept in
# .tmp/conformance/*.log and shown only when a step fails.
#
# The Python used to create the venv is `python3` on PATH, or $TOKENVAULT_CONFORMANCE_BOOTSTRAP_PYTHON.
# Works as root or not (the checkout must be writable), whatever TMPDIR and HOME are: temporary files and the
# pip/npm caches live under .tmp/conformance/.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
state="$root/.tmp/conformance"
venv="$state/venv"
venv_python="$venv/bin/python"
requirements="$root/tests/conformance/requirements.txt"
node_dir="$root/tests/conformance/oidc"
bootstrap_python=${TOKENVAULT_CONFORMANCE_BOOTSTRAP_PYTHON:-python3}

say() { printf 'conformance-setup: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Runs "$@" with its output in $log; on failure shows the log's tail on stderr and exits.
run_logged() {
  local log=$1
  shift
  if ! "$@" >"$log" 2>&1; then
    say "command failed: $*"
    tail -n 40 "$log" | sed 's/^/conformance-setup: | /' >&2
    die "see $log"
  fi
}

sha256() { sha256sum "$@" | cut -d' ' -f1 | paste -sd' '; }

mkdir -p "$state/tmp" || die "cannot create $state (is the checkout writable by $(id -un)?)"
# Private temporary and cache directories: TMPDIR or HOME may be unset, missing or not ours.
export TMPDIR="$state/tmp"
export PIP_CACHE_DIR="$state/pip-cache"
export npm_config_cache="$state/npm-cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

# One setup at a time (test binaries may run this concurrently).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$state/setup.lock"
  flock 9
fi

# --- 1. Python venv ---------------------------------------------------------------------------------
[ -f "$requirements" ] || die "missing $requirements"
want=$(sha256 "$requirements")
stamp="$state/venv.stamp"

# A venv whose interpreter no longer runs (its base Python was removed or moved) is rebuilt from scratch.
if [ -e "$venv" ] && ! "$venv_python" -c 'import sys' >/dev/null 2>&1; then
  say "venv at $venv is broken; recreating it"
  rm -rf "$venv" "$stamp"
fi

if [ ! -x "$venv_python" ]; then
  command -v "$bootstrap_python" >/dev/null 2>&1 || die "$bootstrap_python not found (set TOKENVAULT_CONFORMANCE_BOOTSTRAP_PYTHON)"
  say "creating venv at $venv"
  rm -f "$stamp"
  run_logged "$state/venv.log" "$bootstrap_python" -m venv "$venv"
fi

if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  say "installing tests/conformance/requirements.txt into the venv"
  run_logged "$state/pip.log" "$venv_python" -m pip install --quiet --requirement "$requirements"
  printf '%s' "$want" >"$stamp.new"
  mv -f "$stamp.new" "$stamp"
fi

# --- 2. npm dependencies of the oidc-provider server ---------------------------------------------------
if [ "${TOKENVAULT_CONFORMANCE_SKIP_NODE:-}" != 1 ] && [ -f "$node_dir/package-lock.json" ]; then
  command -v npm >/dev/null 2>&1 || die "npm not found (needed for $node_dir)"
  files=("$node_dir/package-lock.json")
  [ -f "$node_dir/package.json" ] && files+=("$node_dir/package.json")
  want=$(sha256 "${files[@]}")
  stamp="$state/npm.stamp"
  if [ ! -d "$node_dir/node_modules" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    say "running npm ci in tests/conformance/oidc"
    rm -f "$stamp"
    run_logged "$state/npm.log" bash -c 'cd "$1" && npm ci --no-audit --no-fund' _ "$node_dir"
    printf '%s' "$want" >"$stamp.new"
    mv -f "$stamp.new" "$stamp"
  fi
fi

echo "TOKENVAULT_CONFORMANCE_PYTHON=$venv_python"
if [ -d "$node_dir/node_modules" ]; then
  echo "TOKENVAULT_CONFORMANCE_NODE_DIR=$node_dir"
fi

#!/usr/bin/env bash
# End-to-end check of the storage layer with the stock etcdctl (v3 API): the RocksDB engine
# across kill -9, the NOSPACE alarm (alarm list / disarm), defrag and endpoint status.
#
# Builds nothing. Uses the binary at $METASTORE_BIN, else
# ${CARGO_TARGET_DIR:-<repo>/target}/debug/metastore. Installs etcdctl
# (Debian package etcd-client, etcdctl 3.4.x) when it is missing.
# Starts a single-member server on free loopback ports in a temp dir, drives
# it with etcdctl, prints PASS/FAIL per check and ends with exactly one line
# "N passed, M failed"; exits non-zero when M > 0. The server is always
# killed on exit.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -n "${METASTORE_BIN:-}" ]]; then
  BIN="$METASTORE_BIN"
else
  TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
  [[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$PWD/$TARGET_DIR"
  BIN="$TARGET_DIR/debug/metastore"
fi

PASSED=0
FAILED=0
SERVER_PID=""
WORK=""

pass() { PASSED=$((PASSED + 1)); echo "PASS: $1"; }
fail() {
  FAILED=$((FAILED + 1))
  echo "FAIL: $1"
  if [[ $# -gt 1 ]]; then printf '      %s\n' "${@:2}"; fi
}

summary_and_exit() {
  echo "$PASSED passed, $FAILED failed"
  if [[ $FAILED -gt 0 ]]; then exit 1; fi
  exit 0
}

stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

cleanup() {
  stop_server
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if [[ $FAILED -gt 0 && -f "$WORK/server.log" ]]; then
      echo "---- last 40 lines of the server log ----" >&2
      tail -n 40 "$WORK/server.log" >&2 || true
    fi
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ ! -x "$BIN" ]]; then
  fail "metastore binary at $BIN" "not found or not executable (build it with: cargo build -p metastore-server)"
  summary_and_exit
fi

export ETCDCTL_API=3
if ! command -v etcdctl >/dev/null 2>&1; then
  echo "etcdctl not found; installing Debian package etcd-client" >&2
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    { $SUDO apt-get install -y etcd-client || { $SUDO apt-get update && $SUDO apt-get install -y etcd-client; }; } >&2 || true
  fi
fi
if ! command -v etcdctl >/dev/null 2>&1; then
  fail "etcdctl available" "could not install etcdctl (apt-get install -y etcd-client)"
  summary_and_exit
fi

free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
  else
    echo $((20000 + RANDOM % 40000))
  fi
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/metastore-e2e-storage.XXXXXX")"
DATA="$WORK/data"
NAME="e2e"
CPORT="$(free_port)"
PPORT="$(free_port)"
while [[ "$PPORT" == "$CPORT" ]]; do PPORT="$(free_port)"; done
CURL="http://127.0.0.1:$CPORT"
PURL="http://127.0.0.1:$PPORT"
EP="127.0.0.1:$CPORT"

ctl() { etcdctl --endpoints="$EP" --dial-timeout=3s --command-timeout=20s "$@"; }

start_server() {
  "$BIN" --name "$NAME" --data-dir "$DATA" \
    --listen-client-urls "$CURL" --advertise-client-urls "$CURL" \
    --listen-peer-urls "$PURL" --initial-advertise-peer-urls "$PURL" \
    --initial-cluster "$NAME=$PURL" "${EXTRA_ARGS[@]}" >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  local deadline=$((SECONDS + 30))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "server exited early" >&2
      return 1
    fi
    if ctl --command-timeout=2s endpoint status >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "server not ready after 30 s" >&2
  return 1
}

EXTRA_ARGS=()

# expect_eq NAME EXPECTED ACTUAL
expect_eq() {
  if [[ "$2" == "$3" ]]; then pass "$1"; else fail "$1" "expected: $(printf '%q' "$2")" "actual:   $(printf '%q' "$3")"; fi
}

check() { # check NAME CMD... : CMD succeeds
  local name="$1"; shift
  if "$@" >"$WORK/out" 2>&1; then pass "$name"; else fail "$name" "$(tail -n 5 "$WORK/out")"; fi
}

# --- RocksDB engine: data survives kill -9 ---------------------------------------------------
EXTRA_ARGS=(--storage rocksdb)
if start_server; then
  for i in $(seq 1 50); do ctl put "r/$i" "v$i" >/dev/null || true; done
  stop_server
  if start_server; then
    expect_eq "rocksdb: all 50 keys after kill -9" "50" "$(ctl get r/ --prefix --keys-only | grep -c '^r/')"
    expect_eq "rocksdb: value intact" "v42" "$(ctl get r/42 --print-value-only)"
    check "rocksdb: endpoint status" ctl endpoint status
    check "rocksdb: defrag" ctl defrag
    stop_server
  else
    fail "rocksdb: restart after kill -9"
  fi
else
  fail "rocksdb: server starts"
fi
rm -rf "$DATA"

# --- NOSPACE alarm ----------------------------------------------------------------------------
EXTRA_ARGS=(--quota-backend-bytes 200000)
if start_server; then
  big="$(head -c 40000 /dev/zero | tr '\0' x)"
  refused=""
  for i in $(seq 1 20); do
    if ! out="$(ctl put "big/$i" "$big" 2>&1)"; then refused="$out"; break; fi
  done
  if [[ "$refused" == *"database space exceeded"* ]]; then pass "quota: put refused with etcd's text"; else fail "quota: put refused" "$refused"; fi
  list="$(ctl alarm list 2>&1)"
  if [[ "$list" == *"NOSPACE"* ]]; then pass "alarm list shows NOSPACE"; else fail "alarm list shows NOSPACE" "$list"; fi
  status="$(ctl endpoint status -w json 2>&1)"
  if [[ "$status" == *"NOSPACE"* ]]; then pass "endpoint status carries the alarm"; else fail "endpoint status carries the alarm" "$status"; fi
  expect_eq "reads still served" "1" "$(ctl get big/1 --keys-only | grep -c big/1)"
  rev="$(ctl del big/ --prefix -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')"
  check "compact" ctl compact "$rev"
  check "defrag (memory engine: a no-op)" ctl defrag
  check "alarm disarm" ctl alarm disarm
  expect_eq "alarm list empty after disarm" "" "$(ctl alarm list 2>&1)"
  check "writes accepted again" ctl put small 1
  stop_server
else
  fail "quota: server starts"
fi

summary_and_exit

# Shared harness of the etcdctl end-to-end scripts; sourced, never run on its own (the test
# command runs tests/e2e/*.sh, and this file is not one of them).
#
# Set E2E_NAME (names the temp dir) before sourcing. It resolves the binary ($METASTORE_BIN,
# else ${CARGO_TARGET_DIR:-<repo>/target}/debug/metastore), installs etcdctl (Debian package
# etcd-client) when missing, picks free loopback ports in a temp dir, and provides
# start_server / stop_server, ctl, background etcdctl (BG_PIDS, stop_bg), PASS/FAIL counting
# with summary_and_exit, and the expect_* / check helpers. The server and every background
# etcdctl are killed on exit.

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
BG_PIDS=()

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

# stop_bg PID [SIGNAL] : stop one background etcdctl we started.
stop_bg() {
  local pid="$1" sig="${2:-TERM}"
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${BG_PIDS[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
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

WORK="$(mktemp -d "${TMPDIR:-/tmp}/metastore-e2e-${E2E_NAME:-run}.XXXXXX")"
DATA="$WORK/data"
NAME="e2e"
CPORT="$(free_port)"
PPORT="$(free_port)"
while [[ "$PPORT" == "$CPORT" ]]; do PPORT="$(free_port)"; done
CURL="http://127.0.0.1:$CPORT"
PURL="http://127.0.0.1:$PPORT"
EP="127.0.0.1:$CPORT"

CTL=(etcdctl --endpoints="$EP" --dial-timeout=3s --command-timeout=20s)
ctl() { "${CTL[@]}" "$@"; }

# Extra server flags for the next start_server (e.g. --storage rocksdb).
EXTRA_ARGS=()

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

# json_get FILE EXPR : evaluate a python expression on the parsed JSON `j`.
json_get() {
  python3 -c 'import json,sys,base64; j=json.load(open(sys.argv[1])); b=lambda s: base64.b64decode(s).decode(); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null || echo "<json error>"
}

# quiet CMD... : run a setup step; a failure is reported but does not abort.
quiet() {
  "$@" >/dev/null 2>&1 || echo "note: setup step failed: $*" >&2
}

# expect_eq NAME EXPECTED ACTUAL
expect_eq() {
  if [[ "$2" == "$3" ]]; then pass "$1"; else fail "$1" "expected: $(printf '%q' "$2")" "actual:   $(printf '%q' "$3")"; fi
}

# expect_match NAME ERE ACTUAL : ACTUAL matches the extended regex.
expect_match() {
  if [[ "$3" =~ $2 ]]; then pass "$1"; else fail "$1" "expected to match: $2" "actual: $(printf '%q' "$3")"; fi
}

# expect_out NAME EXPECTED -- CMD... : CMD succeeds and prints exactly EXPECTED.
expect_out() {
  local name="$1" want="$2"
  shift 3
  local out
  if out="$("$@" 2>&1)"; then
    expect_eq "$name" "$want" "$out"
  else
    fail "$name" "command failed: $*" "$out"
  fi
}

# expect_fail_contains NAME TEXT -- CMD... : CMD fails and its output contains TEXT.
expect_fail_contains() {
  local name="$1" text="$2"
  shift 3
  local out
  if out="$("$@" 2>&1)"; then
    fail "$name" "command unexpectedly succeeded: $*" "$out"
  elif [[ "$out" == *"$text"* ]]; then
    pass "$name"
  else
    fail "$name" "output does not contain: $text" "$out"
  fi
}

# header_rev : current store revision, from a json get of an unused key.
header_rev() {
  local r
  ctl -w json get __never_written__ >"$WORK/rev.json" 2>&1 || true
  r="$(json_get "$WORK/rev.json" 'j["header"]["revision"]')"
  if [[ "$r" =~ ^[0-9]+$ ]]; then echo "$r"; else echo -1; fi
}

# check NAME CMD... : CMD succeeds.
check() {
  local name="$1"; shift
  if "$@" >"$WORK/out" 2>&1; then pass "$name"; else fail "$name" "$(tail -n 5 "$WORK/out")"; fi
}

#!/usr/bin/env bash
# A local MetaStore cluster on loopback, for trying things out:
#   bash scripts/cluster.sh start [N] [--storage rocksdb]   # N = 3 (default) or 5 members
#   bash scripts/cluster.sh status
#   bash scripts/cluster.sh stop                              # SIGTERM every member
#   bash scripts/cluster.sh clean                             # stop and delete the data dirs
# Member i listens for clients on 127.0.0.1:2i379 and for peers on 127.0.0.1:2i380
# (m1: 21379/21380, m2: 22379/22380, ...). Data and logs go to ${CLUSTER_DIR:-./cluster.local}.
# Builds the release binary first unless METASTORE_BIN names one.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${CLUSTER_DIR:-$PWD/cluster.local}"
cmd="${1:-}"
shift || true

endpoints() {
  local n="$1" list=() i
  for ((i = 1; i <= n; i++)); do list+=("127.0.0.1:2${i}379"); done
  (IFS=,; echo "${list[*]}")
}

case "$cmd" in
start)
  n="${1:-3}"
  shift || true
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 9 ]] || { echo "members: 1 to 9, got $n" >&2; exit 2; }
  bin="${METASTORE_BIN:-}"
  if [[ -z "$bin" ]]; then
    cargo build --release -p metastore-server -p metastore-bench >&2
    bin="${CARGO_TARGET_DIR:-target}/release/metastore"
  fi
  mkdir -p "$dir"
  initial=()
  for ((i = 1; i <= n; i++)); do initial+=("m$i=http://127.0.0.1:2${i}380"); done
  initial_cluster="$(IFS=,; echo "${initial[*]}")"
  for ((i = 1; i <= n; i++)); do
    if [[ -f "$dir/m$i.pid" ]] && kill -0 "$(cat "$dir/m$i.pid")" 2>/dev/null; then
      echo "m$i already running (pid $(cat "$dir/m$i.pid"))"
      continue
    fi
    "$bin" --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://127.0.0.1:2${i}379" --advertise-client-urls "http://127.0.0.1:2${i}379" \
      --listen-peer-urls "http://127.0.0.1:2${i}380" --initial-advertise-peer-urls "http://127.0.0.1:2${i}380" \
      --initial-cluster "$initial_cluster" --initial-cluster-token metastore-local "$@" \
      >>"$dir/m$i.log" 2>&1 &
    echo $! >"$dir/m$i.pid"
    echo "m$i: pid $!, clients http://127.0.0.1:2${i}379, log $dir/m$i.log"
  done
  echo "$n" >"$dir/size"
  echo "try: ETCDCTL_API=3 etcdctl --endpoints $(endpoints "$n") endpoint status -w table"
  ;;
status)
  n="$(cat "$dir/size" 2>/dev/null || echo 3)"
  ETCDCTL_API=3 etcdctl --endpoints "$(endpoints "$n")" endpoint status -w table
  ;;
stop | clean)
  for pidfile in "$dir"/m*.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  if [[ "$cmd" == clean ]]; then rm -rf "$dir"; fi
  ;;
*)
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac

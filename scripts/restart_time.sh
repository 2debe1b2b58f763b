#!/usr/bin/env bash
# Times one restart of a MetaStore data directory: starts BIN on DATA_DIR with ENGINE (memory or
# rocksdb), waits until Status and a put both answer, prints the seconds and the resident memory,
# then kills it with SIGKILL (so the next run replays the same way). etcdctl 3.4 gets host:port
# (README, "Current limits"). Run it with two binaries in
# turn on one loaded directory to compare restarts (bench-results/2026-12-07-scale-keys.md).
#   scripts/restart_time.sh target/release/metastore /path/to/data rocksdb
set -euo pipefail
bin=$1 data=$2 engine=${3:-memory}
url=http://127.0.0.1:23790
start=$(date +%s.%N)
"$bin" --data-dir "$data" --storage "$engine" --listen-client-urls $url \
  --advertise-client-urls $url --listen-peer-urls http://127.0.0.1:23800 --log-level warn \
  >>"$data.restart.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true' EXIT
ctl() { ETCDCTL_API=3 etcdctl --endpoints ${url#http://} --command-timeout=1s "$@" >/dev/null 2>&1; }
until ctl endpoint status && ctl put restart-probe x; do
  kill -0 $pid 2>/dev/null || { echo "the server exited; see $data.restart.log" >&2; exit 1; }
  sleep 0.1
done
end=$(date +%s.%N)
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
echo "$(basename "$bin"): ready after $(echo "$end - $start" | bc) s, RSS ${rss} kB"

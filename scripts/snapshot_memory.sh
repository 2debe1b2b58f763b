#!/usr/bin/env bash
# What a backup costs in memory: for each engine, a release server is filled with STATE_MB of
# 10 KiB values, then its resident memory is sampled (every 50 ms) while `etcdctl snapshot save`
# streams the whole state; then `metastore snapshot restore` of that file into a RocksDB data dir
# is sampled the same way. A snapshot that held the state in memory would add its size to the
# peak; the streaming writer and reader should add a few MB. Results go to
# bench-results/<date>-snapshot-memory.md.
#
#   bash scripts/snapshot_memory.sh [STATE_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
state_mb="${1:-1024}"
target="${CARGO_TARGET_DIR:-target}"
work="$(mktemp -d)"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -p metastore-server -p metastore-bench >&2
bin="$target/release"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Samples the RSS of pid $1 until it exits or the file $2 appears; prints the peak in MB.
peak_rss() {
  local pid=$1 stop=$2 peak=0 now
  while kill -0 "$pid" 2>/dev/null && [[ ! -e $stop ]]; do
    now=$(rss_mb "$pid")
    ((now > peak)) && peak=$now
    sleep 0.05
  done
  echo "$peak"
}

keys=$((state_mb * 100)) # 10 KiB values: ~100 per MB
rows=()
for engine in rocksdb memory; do
  c="$(port)"; p="$(port)"; dir="$work/$engine"
  "$bin/metastore" --storage "$engine" --data-dir "$dir/data" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "default=http://127.0.0.1:$p" \
    --quota-backend-bytes $((state_mb * 8 * 1024 * 1024)) --log-level warn 2>>"$work/server.log" &
  pid=$!; pids+=("$pid")
  sleep 1.5
  "$bin/metastore-bench" --endpoints "127.0.0.1:$c" --conns 8 --clients 64 --total "$keys" \
    --key-space-size "$keys" --sequential-keys --no-progress put --val-size 10240 >&2
  sleep 2
  before=$(rss_mb "$pid")
  rm -f "$work/stop"
  peak_rss "$pid" "$work/stop" >"$work/peak" &
  sampler=$!
  start=$(date +%s.%N)
  ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$c" --command-timeout 600s snapshot save "$dir/backup.db" >/dev/null 2>>"$work/etcdctl.log"
  took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
  touch "$work/stop"; wait "$sampler"
  peak=$(cat "$work/peak")
  size=$(( $(stat -c %s "$dir/backup.db") / 1024 / 1024 ))
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$engine: RSS ${before} MB before, peak ${peak} MB during save (${took} s, file ${size} MB)" >&2
  rows+=("| $engine | $size | $before | $peak | $((peak - before)) | $took |")

  if [[ $engine == rocksdb ]]; then
    rp="$(port)"
    rm -f "$work/stop"
    "$bin/metastore" snapshot restore "$dir/backup.db" --storage rocksdb --data-dir "$dir/restored" \
      --name r --initial-cluster "r=http://127.0.0.1:$rp" \
      --initial-advertise-peer-urls "http://127.0.0.1:$rp" >"$work/restore.out" &
    rpid=$!
    restore_peak=$(peak_rss "$rpid" "$work/never")
    wait "$rpid"
    echo "restore into rocksdb: peak RSS ${restore_peak} MB" >&2
  fi
  rm -rf "$dir"
done

out="bench-results/$(date +%F)-snapshot-memory.md"
{
  echo "# Memory of a backup: etcdctl snapshot save of ${state_mb} MB, and metastore snapshot restore"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo); commit $(git rev-parse --short HEAD)."
  echo "Command: \`bash scripts/snapshot_memory.sh $state_mb\` (release build; ${keys} keys of 10 KiB, sequential)."
  echo
  echo "| engine | file MB | server RSS before MB | peak during save MB | added MB | save s |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "\`metastore snapshot restore\` of the RocksDB server's file into a RocksDB data dir: peak RSS ${restore_peak} MB."
} >"$out"
echo "wrote $out" >&2
cat "$out"

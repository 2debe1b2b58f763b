#!/usr/bin/env bash
# What a witness costs next to a data member: a 2 data + 1 witness cluster (release binary,
# memory engine, default settings) takes N puts (default 100,000; 64 clients through the
# members), then each member's CPU time, peak and current resident memory and data dir size are
# written to bench-results/<date>-witness-cost.md, with the witness's trimmed-log index.
#
#   bash scripts/witness_cost.sh [puts]
set -euo pipefail
cd "$(dirname "$0")/.."
puts="${1:-100000}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p metastore-server -p metastore-bench >&2
bin="$target/release/metastore"
bench="$target/release/metastore-bench"
dir="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -a cport pport
for i in 0 1 2; do cport[$i]="$(port)"; pport[$i]="$(port)"; done
ic="m0=http://127.0.0.1:${pport[0]},m1=http://127.0.0.1:${pport[1]},w=http://127.0.0.1:${pport[2]}"
for i in 0 1 2; do
  name="m$i"; extra=()
  if [[ $i == 2 ]]; then name=w; extra=(--witness); fi
  "$bin" --name "$name" --data-dir "$dir/$name" "${extra[@]}" \
    --listen-client-urls "http://127.0.0.1:${cport[$i]}" --advertise-client-urls "http://127.0.0.1:${cport[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${pport[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${pport[$i]}" \
    --initial-cluster "$ic" --initial-cluster-token witness-cost --log-level warn 2>>"$dir/$name.log" &
  pids+=($!)
done
sleep 3
"$bench" --endpoints "127.0.0.1:${cport[0]},127.0.0.1:${cport[1]}" --conns 16 --clients 64 \
  --total "$puts" --no-progress put >"$dir/bench.txt"
sleep 3
report() {
  local pid="$1" name="$2"
  local ticks hz rss hwm
  ticks="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
  hz="$(getconf CLK_TCK)"
  rss="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")"
  hwm="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")"
  printf '| %s | %.1f | %d | %d | %s |\n' "$name" "$(awk -v t="$ticks" -v h="$hz" 'BEGIN {print t / h}')" \
    "$((hwm / 1024))" "$((rss / 1024))" "$(du -sh "$dir/$name" | cut -f1)"
}
out="bench-results/$(date +%F)-witness-cost.md"
{
  echo "# Witness cost: 2 data members + 1 witness, $puts puts"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); commit $(git rev-parse --short HEAD); command: \`bash scripts/witness_cost.sh $puts\`"
  echo
  echo "Load: \`metastore-bench put --clients 64 --conns 16 --total $puts\` through both data members."
  echo
  echo '```'
  grep -E "ops/s|Requests/sec|p99|errors" "$dir/bench.txt" | head -5 || true
  echo '```'
  echo
  echo "| member | CPU s | peak RSS MiB | RSS MiB | data dir (WAL preallocated in 64 MiB segments) |"
  echo "|---|---|---|---|---|"
  report "${pids[0]}" m0
  report "${pids[1]}" m1
  report "${pids[2]}" w
  echo
  echo "Witness log trimmed up to index $(cat "$dir/w/member/witness-index" 2>/dev/null || echo 0); WAL segments: $(ls "$dir/w/member/wal" | grep -c '\.wal$') (witness) vs $(ls "$dir/m0/member/wal" | grep -c '\.wal$') (m0)."
} >"$out"
cat "$out"

#!/usr/bin/env bash
# What a client reading a million keys does to everyone else: the release binaries of BASE
# (every range read on the runtime's workers) and HEAD (ranges that may be large on tokio's
# blocking pool) take turns ROUNDS times. Each run: memory engine, KEYS keys (BatchPut), then
# for SECONDS one client reads the whole key space in a loop (no limit, serializable) while 16
# clients read single keys; reports the single reads' p50 / p99 / max, how many whole ranges
# completed, and the server's peak resident memory, to bench-results/<date>-range-stall.md.
#
#   bash scripts/range_stall.sh [BASE] [KEYS] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
base_rev="${1:-4617124}"
keys="${2:-1000000}"
seconds="${3:-10}"
rounds="${4:-2}"
source scripts/lib/ab.sh
git worktree add --detach "$work/base-src" "$base_rev" >&2
git worktree add --detach "$work/head-src" HEAD >&2
build "$work/base-src" "$work/base"
build "$work/head-src" "$work/head"
bench="$work/head/metastore-bench"

run() { # <bin dir>; prints "p50_ms p99_ms max_ms single_per_s whole_ranges peak_rss_mb"
  local report whole peak rss
  start_loaded "$1" "$keys" 1
  # Every key of the key space starts with "0" (zero-padded decimal).
  "$bench" --endpoints "127.0.0.1:$c" --clients 1 --duration "${seconds}s" --json --no-progress \
    --check-every 0 range --consistency s --prefix 0 >"$work/whole.json" &
  local whole_pid=$!
  "$bench" --endpoints "127.0.0.1:$c" --conns 4 --clients 16 --duration "${seconds}s" \
    --key-space-size "$keys" --json --no-progress --check-every 0 range --consistency s \
    >"$work/single.json" &
  local single_pid=$!
  peak=0
  while kill -0 "$single_pid" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    ((rss > peak)) && peak=$rss
    sleep 0.2
  done
  # A failed request makes the bench exit non-zero; its report still says what happened.
  wait "$single_pid" || true; wait "$whole_pid" || true
  report=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); l=r["latency_ms"]; print("%.2f %.2f %.1f %.0f" % (l["p50"], l["p99"], l["max"], r["ops_per_sec"]))' "$work/single.json")
  whole=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ok"])' "$work/whole.json")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  echo "$report $whole $((peak / 1024))"
}

rows=()
for ((r = 0; r < rounds; r++)); do
  for side in base head; do
    read -r p50 p99 max rate whole peak < <(run "$work/$side")
    echo "round $((r + 1)) $side: single p50 ${p50} p99 ${p99} max ${max} ms, ${rate}/s; ${whole} whole ranges; peak RSS ${peak} MB" >&2
    rows+=("| $((r + 1)) | $side | $p50 | $p99 | $max | $rate | $whole | $peak |")
  done
done
out="bench-results/$(date +%F)-range-stall.md"
{
  echo "# Single-key reads while one client reads ${keys} keys at a time: $base_rev (on the workers) vs $(git rev-parse --short HEAD) (blocking pool)"
  echo
  echo "Machine: $(nproc) cores; memory engine, single member; release builds."
  echo "Command: \`bash scripts/range_stall.sh $base_rev $keys $seconds $rounds\`. Each run loads the keys (BatchPut),"
  echo "then for ${seconds} s one client reads all of them per request (serializable, no limit) in a loop while 16"
  echo "clients read single keys (serializable)."
  echo
  echo "| round | build | single p50 ms | single p99 ms | single max ms | single reads/s | whole ranges | peak RSS MB |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
echo "wrote $out" >&2
cat "$out"

#!/usr/bin/env bash
# How long a compaction stalls writes: the release binaries of BASE (compaction done whole on the
# apply thread) and HEAD (bounded steps on the compactor thread) take turns ROUNDS times. Each
# run: memory engine, KEYS keys written twice (BatchPut), then `metastore-bench put` at 16 clients for
# SECONDS while `etcdctl compaction --physical` of the previous revision is issued one second in.
# Reports the puts' max and p99.9 latency and how long the Compact call took, to
# bench-results/<date>-compaction-stall.md.
#
#   bash scripts/compaction_stall.sh [BASE] [KEYS] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
base_rev="${1:-651122a}"
keys="${2:-1000000}"
seconds="${3:-8}"
rounds="${4:-2}"
source scripts/lib/ab.sh
git worktree add --detach "$work/base-src" "$base_rev" >&2
git worktree add --detach "$work/head-src" HEAD >&2
build "$work/base-src" "$work/base"
build "$work/head-src" "$work/head"
bench="$work/head/metastore-bench"

run() { # <bin dir>; prints "max_ms p999_ms compact_s"
  local rev report compact_s
  start_loaded "$1" "$keys" 2
  rev=$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$c" endpoint status -w json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["header"]["revision"])')
  "$bench" --endpoints "127.0.0.1:$c" --conns 4 --clients 16 --duration "${seconds}s" \
    --key-space-size "$keys" --json --no-progress --check-every 0 put >"$work/report.json" &
  local load=$!
  sleep 1
  local t0; t0=$(date +%s.%N)
  ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$c" --command-timeout 300s compaction --physical \
    $((rev - 1)) >/dev/null
  compact_s=$(awk -v s="$t0" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}')
  wait "$load" || true
  report=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); l=r["latency_ms"]; print("%.1f %.1f" % (l["max"], l["p999"]))' "$work/report.json")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  echo "$report $compact_s"
}

rows=()
for ((r = 0; r < rounds; r++)); do
  for side in base head; do
    read -r max p999 took < <(run "$work/$side")
    echo "round $((r + 1)) $side: put max ${max} ms, p99.9 ${p999} ms, compaction ${took} s" >&2
    rows+=("| $((r + 1)) | $side | $max | $p999 | $took |")
  done
done
out="bench-results/$(date +%F)-compaction-stall.md"
{
  echo "# Writes during a compaction of ${keys} keys: $base_rev (whole, on the apply thread) vs $(git rev-parse --short HEAD) (bounded steps)"
  echo
  echo "Machine: $(nproc) cores; memory engine, single member; release builds."
  echo "Command: \`bash scripts/compaction_stall.sh $base_rev $keys $seconds $rounds\`. Each run writes every key twice,"
  echo "then puts at 16 clients for ${seconds} s while \`etcdctl compaction --physical\` of the previous revision runs."
  echo
  echo "| round | build | put max ms | put p99.9 ms | compaction s |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
echo "wrote $out" >&2
cat "$out"

#!/usr/bin/env bash
# What recording the metrics costs: the release binary of BASE and of HEAD take turns, ROUNDS
# times, serving `metastore-bench put` and `range -s` at 256 clients for SECONDS each (memory
# engine, single member, fresh data dir per run). BASE defaults to `off`: HEAD itself with
# scripts/metrics-off.patch applied (no recorder installed, no per-call gRPC metrics), so the
# two binaries differ in nothing else; a commit can be named instead. Medians, the ratio of
# the medians and the median of each round's head/base ratio go to
# bench-results/<date>-metrics-cost.md, with a scrape of HEAD's /metrics taken after its last
# run (proof that it recorded while measured). Failed requests are counted, not fatal.
#
#   bash scripts/metrics_cost.sh [BASE] [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
base_rev="${1:-off}"
rounds="${2:-5}"
seconds="${3:-5}"
source scripts/lib/ab.sh
# Both from clean worktrees of their commits (HEAD: the last commit, not the working tree).
if [[ "$base_rev" == off ]]; then
  git worktree add --detach "$work/src" HEAD >&2
  git -C "$work/src" apply "$PWD/scripts/metrics-off.patch"
else
  git worktree add --detach "$work/src" "$base_rev" >&2
fi
git worktree add --detach "$work/head-src" HEAD >&2
build "$work/src" "$work/base"
build "$work/head-src" "$work/head"
bench="$work/head/metastore-bench"


# ops/s and server CPU µs per op of one JSON report.
fields() { python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %.2f %d" % (r["ops_per_sec"], r.get("server_cpu_us_per_op") or 0, sum(r["errors"].values())))'; }

# One run: start the server, measure put then range, stop. Prints
# "put_ops put_cpu put_errors range_ops range_cpu range_errors".
run() { # <bin dir> <scrape file or empty>
  local c p dir pid put range
  c="$(port)"; p="$(port)"; dir="$(mktemp -d -p "$work")"
  "$1/metastore" --data-dir "$dir" --listen-client-urls "http://127.0.0.1:$c" \
    --advertise-client-urls "http://127.0.0.1:$c" --listen-peer-urls "http://127.0.0.1:$p" \
    --initial-advertise-peer-urls "http://127.0.0.1:$p" --log-level warn >>"$work/server.log" 2>&1 &
  pid=$!; pids+=("$pid")
  sleep 1.5
  put="$( ("$bench" --endpoints "127.0.0.1:$c" --conns 100 --clients 256 --duration "${seconds}s" \
    --server-pid "$pid" --json --no-progress put || true) | fields)"
  range="$( ("$bench" --endpoints "127.0.0.1:$c" --conns 100 --clients 256 --duration "${seconds}s" \
    --server-pid "$pid" --json --no-progress range --consistency s || true) | fields)"
  if [[ -n "$2" ]]; then curl -s "http://127.0.0.1:$c/metrics" >"$2"; fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  echo "$put $range"
}

declare -a bp bpc br brc hp hpc hr hrc
errors=0
for ((r = 0; r < rounds; r++)); do
  read -r a b e c d f < <(run "$work/base" "")
  bp+=("$a"); bpc+=("$b"); br+=("$c"); brc+=("$d"); errors=$((errors + e + f))
  echo "round $((r + 1)) base: put $a/s ${b}us, range $c/s ${d}us" >&2
  read -r a b e c d f < <(run "$work/head" "$work/scrape.txt")
  hp+=("$a"); hpc+=("$b"); hr+=("$c"); hrc+=("$d"); errors=$((errors + e + f))
  echo "round $((r + 1)) head: put $a/s ${b}us, range $c/s ${d}us" >&2
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
# Median of each round's head/base ratio: <base values...> -- <head values...>.
paired() {
  local -a b=() h=() r=(); local side=b
  for v in "$@"; do
    if [[ "$v" == -- ]]; then side=h; elif [[ $side == b ]]; then b+=("$v"); else h+=("$v"); fi
  done
  for i in "${!b[@]}"; do r+=("$(ratio "${h[$i]}" "${b[$i]}")"); done
  median "${r[@]}"
}
row() { # <name> <base ops> <head ops> <base cpu> <head cpu>
  printf '| %s | %.0f | %.0f | %s | %.1f | %.1f | %s |\n' "$1" "$2" "$3" "$(ratio "$3" "$2")" \
    "$4" "$5" "$(ratio "$5" "$4")"
}
out="bench-results/$(date +%F)-metrics-cost.md"
{
  echo "# The cost of recording metrics: $base_rev (no metrics; \`off\` = HEAD with scripts/metrics-off.patch) vs $(git rev-parse --short HEAD)"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); command: \`bash scripts/metrics_cost.sh $base_rev $rounds $seconds\`"
  echo
  echo "Single member, memory engine, release builds taking turns $rounds times, a fresh data dir each run;"
  echo "\`metastore-bench --clients 256 --conns 100 --duration ${seconds}s\` \`put\`, then \`range --consistency s\`; medians."
  echo
  echo "| workload | base ops/s | head ops/s | head / base | base server CPU µs/op | head server CPU µs/op | head / base |"
  echo "|---|---|---|---|---|---|---|"
  row "put c256" "$(median "${bp[@]}")" "$(median "${hp[@]}")" "$(median "${bpc[@]}")" "$(median "${hpc[@]}")"
  row "range -s c256" "$(median "${br[@]}")" "$(median "${hr[@]}")" "$(median "${brc[@]}")" "$(median "${hrc[@]}")"
  echo
  echo "Every round, ops/s: put base ${bp[*]}, head ${hp[*]}; range base ${br[*]}, head ${hr[*]}."
  echo "Server CPU µs/op: put base ${bpc[*]}, head ${hpc[*]}; range base ${brc[*]}, head ${hrc[*]}."
  echo
  echo "Median of the rounds' head/base ratios: put ops $(paired "${bp[@]}" -- "${hp[@]}"), put CPU $(paired "${bpc[@]}" -- "${hpc[@]}"); range ops $(paired "${br[@]}" -- "${hr[@]}"), range CPU $(paired "${brc[@]}" -- "${hrc[@]}"). Failed requests, all runs: $errors."
  echo
  echo "HEAD's scrape after its last run (a few series):"
  echo
  echo '```'
  grep -E '^grpc_server_handled_total\{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="(Put|Range)",grpc_code="OK"\}|^etcd_disk_wal_fsync_duration_seconds_count|^metastore_raft_proposal_batch_size_(sum|count)' "$work/scrape.txt" || true
  echo '```'
} >"$out"
cat "$out"

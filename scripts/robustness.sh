#!/usr/bin/env bash
# Runs the robustness tests (crates/metastore-server/tests/robustness) with each fault held for
# longer than the few seconds `cargo test` gives them, on both engines, and writes a summary
# to bench-results/<date>-robustness.md. The default run is short so the test suite stays fast;
# long faults are what let elections, snapshot installs and reconnects overlap in ways a short
# run rarely reaches.
#
#   scripts/robustness.sh [seconds-per-fault]     (default 20)
#
# A failing test leaves its history and member logs in a directory its panic message names;
# the per-engine test output is kept next to the summary's name (.memory.log, .rocksdb.log)
# only when something failed.
#
# ROBUSTNESS_TEST_BIN=path runs that already built test binary instead of `cargo test`: for
# when another build holds the shared target dir's lock. The test binary runs the `metastore`
# binary at <target dir>/debug/metastore, which any build in a shared target dir (another
# worktree's included) overwrites, so the summary records that binary's Git SHA before and
# after the run.
set -uo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
date="$(date +%F)"
out="bench-results/${date}-robustness.md"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ -n "${ROBUSTNESS_TEST_BIN:-}" ]; then
  run=("$ROBUSTNESS_TEST_BIN" --nocapture)
else
  run=(cargo test --workspace --test robustness -- --nocapture)
  # Build first, so the compile time is not counted in the first engine's wall time. Always
  # --workspace: a `-p` selection resolves features differently and rebuilds RocksDB (~20 min).
  cargo test --workspace --test robustness --no-run || exit 1
fi
server="${CARGO_TARGET_DIR:-target}/debug/metastore"
server_sha() { "$server" --version 2>/dev/null | sed -n 's/^Git SHA: //p'; }
sha_before="$(server_sha)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

status=0
for engine in memory rocksdb; do
  start=$(date +%s)
  if [ "$engine" = rocksdb ]; then
    export METASTORE_TEST_STORAGE=rocksdb
  else
    unset METASTORE_TEST_STORAGE
  fi
  METASTORE_ROBUSTNESS_SECS="$secs" "${run[@]}" >"$tmp/$engine.log" 2>&1
  rc=$?
  echo "$(( $(date +%s) - start ))" >"$tmp/$engine.wall"
  if [ "$rc" -ne 0 ]; then
    status=1
    cp "$tmp/$engine.log" "bench-results/${date}-robustness.$engine.log"
  fi
  echo "$engine: exit $rc"
done

{
  echo "# Robustness run, ${date} (commit $(git rev-parse --short HEAD))"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(rustc --version)."
  echo
  echo "Server binary tested: \`$server\` at Git SHA ${sha_before:-unknown} (after the run: \
$(server_sha)). Load average at the start: ${load_before}."
  echo
  echo "Command: \`scripts/robustness.sh ${secs}\`: \`METASTORE_ROBUSTNESS_SECS=${secs} ${run[*]}\`, \
once per engine (\`METASTORE_TEST_STORAGE\` unset, then \`rocksdb\`), debug build, the tests one at a time."
  echo
  echo "Each fault held ${secs} s under load from 6 recording clients (2 per member, 10 keys), then \
healed; the history checked with metastore-checker and every member's HashKV compared at the \
final revision. \`secs\` is the whole test (cluster start, load, check, convergence); \
\`unknown\` counts requests that failed or timed out (recorded as unknown outcomes)."
  echo
  echo "| engine | test | result | secs | ops | reads | writes | unknown | check ms | final rev |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for engine in memory rocksdb; do
    grep -E '^test .* \.\.\. ' "$tmp/$engine.log" | while read -r _ name _ result; do
      report=""
      case "$name" in
        kill_the_leader*) report=kill_leader ;;
        pause_the_leader*) report=pause_leader_then_follower ;;
        isolate_the_leader) report=isolate_leader ;;
        cut_off_a_follower*) report=cut_off_follower_snapshot ;;
      esac
      line=$(grep -m1 "robustness-report name=${report:-none} " "$tmp/$engine.log" || true)
      field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
      if [ -n "$line" ]; then
        echo "| $engine | \`$name\` | $result | $(field secs) | $(field ops) | $(field reads) | \
$(field writes) | $(field unknown) | $(field check_ms) | $(field final_revision) |"
      else
        echo "| $engine | \`$name\` | $result | | | | | | | |"
      fi
    done
  done
  echo
  for engine in memory rocksdb; do
    echo "- $engine: $(grep -m1 '^test result' "$tmp/$engine.log" || echo 'no result line'), \
$(cat "$tmp/$engine.wall") s wall including the test binary's start."
  done
} >"$out"
echo "wrote $out"
exit "$status"

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

E2E_NAME=storage
# shellcheck source=harness.bash
source "$(dirname "${BASH_SOURCE[0]}")/harness.bash"

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

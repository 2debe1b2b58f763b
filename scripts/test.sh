#!/usr/bin/env bash
# Runs every test: unit, property and integration tests (the real binary driven by the
# etcd-client crate), then the etcdctl end-to-end script against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
# The state-machine suites and the server's integration tests again, on the RocksDB engine.
METASTORE_TEST_ENGINE=rocksdb cargo test -p metastore-mvcc --no-fail-fast
METASTORE_TEST_STORAGE=rocksdb cargo test -p metastore-server --no-fail-fast
target_dir="${CARGO_TARGET_DIR:-target}"
for script in tests/e2e/*.sh; do
  METASTORE_BIN="$target_dir/debug/metastore" bash "$script"
done

#!/usr/bin/env bash
# Runs every test: unit, property and integration tests (the real binary driven by the
# etcd-client crate), then the etcdctl end-to-end script against the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
# Every suite again on the RocksDB engine: the state-machine suites (METASTORE_TEST_ENGINE) and
# the server's integration tests (METASTORE_TEST_STORAGE). Always --workspace: a `-p` selection
# resolves features differently and would rebuild RocksDB from source (~20 min).
METASTORE_TEST_ENGINE=rocksdb METASTORE_TEST_STORAGE=rocksdb cargo test --workspace --no-fail-fast
target_dir="${CARGO_TARGET_DIR:-target}"
for script in tests/e2e/*.sh; do
  METASTORE_BIN="$target_dir/debug/metastore" bash "$script"
done
# The release artefact operators deploy: lean, answers --version, serves. The same package
# selection as `cargo xtask bench` (which `cargo test` ran above), so this rebuilds nothing.
cargo build --release -p metastore-server -p metastore-bench
METASTORE_BIN="$target_dir/release/metastore" bash tests/release/release_binary.sh

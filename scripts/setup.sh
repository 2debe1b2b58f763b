#!/usr/bin/env bash
# Installs what building and testing MetaStore needs beyond the Rust toolchain, on Debian.
# - protoc: the etcd-client test dependency generates its code with it (our own crates use a
#   vendored protoc and need nothing).
# - etcdctl (Debian package etcd-client): the end-to-end script drives the server with it.
# - clang and libclang: rust-rocksdb generates its RocksDB bindings with bindgen.
# - systemd-analyze (Debian package systemd): a test verifies configs/metastore.service with it.
# - etcd (Debian package etcd-server): the JSON gateway test sends the same requests to a real
#   etcd and compares the answers.
set -euo pipefail
need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
protoc --version
# sed, not head: head exits after one line and etcdctl, still writing, dies of SIGPIPE (fails the
# script under pipefail, now and then).
ETCDCTL_API=3 etcdctl version | sed -n 1p

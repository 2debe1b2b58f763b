# Shared by the scripts that compare two builds (metrics_cost.sh, compaction_stall.sh,
# range_stall.sh): a scratch dir with its cleanup, release builds from clean worktrees, and free
# ports. Source it from the repository root; it sets `target`, `work` and `pids`.

target="${CARGO_TARGET_DIR:-target}"
work="$(mktemp -d)"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  local wt
  for wt in "$work"/*src; do
    git worktree remove --force "$wt" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

build() { # <source dir> <out dir>
  # Cargo's unit hashes do not depend on the workspace's path and its freshness check compares
  # source mtimes with the last build's: without this, a worktree checked out before the other
  # one was built would reuse that build's crates wherever its sources look older.
  find "$1" -name '*.rs' -o -name 'Cargo.toml' -o -name '*.proto' | xargs touch
  (cd "$1" && cargo build --release -p metastore-server -p metastore-bench >&2)
  mkdir -p "$2"
  cp "$target/release/metastore" "$target/release/metastore-bench" "$2/"
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts `<bin dir>/metastore` alone on a fresh data dir under $work (8 GiB quota) and fills
# KEYS keys TIMES over with MetaStore's BatchPut (1000 keys per proposal: a million single
# puts would take minutes on a small machine). Sets `c` (its client port), `pid` and `dir`.
start_loaded() { # <bin dir> <keys> <times>
  local p
  c="$(port)"; p="$(port)"; dir="$(mktemp -d -p "$work")"
  "$1/metastore" --data-dir "$dir" --listen-client-urls "http://127.0.0.1:$c" \
    --advertise-client-urls "http://127.0.0.1:$c" --listen-peer-urls "http://127.0.0.1:$p" \
    --initial-advertise-peer-urls "http://127.0.0.1:$p" --initial-cluster "default=http://127.0.0.1:$p" \
    --quota-backend-bytes 8589934592 --log-level warn >>"$work/server.log" 2>&1 &
  pid=$!; pids+=("$pid")
  sleep 1.5
  "$work/head/metastore-bench" --endpoints "127.0.0.1:$c" --conns 4 --clients 4 \
    --total $(($3 * $2 / 1000)) --key-space-size "$2" --sequential-keys --no-progress \
    --check-every 0 batch-put --batch-size 1000 >/dev/null
}

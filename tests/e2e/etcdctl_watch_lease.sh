#!/usr/bin/env bash
# End-to-end check of metastore's Watch and Lease services with the stock
# etcdctl (v3 API), plus etcdctl's `lock` and `elect`, which etcdctl builds
# on the client side from KV, Lease (with keep-alive streams) and Watch.
#
# Builds nothing. Uses the binary at $METASTORE_BIN, else
# ${CARGO_TARGET_DIR:-<repo>/target}/debug/metastore. Installs etcdctl
# (Debian package etcd-client, etcdctl 3.4.x) when it is missing.
# Starts a single-member server on free loopback ports in a temp dir, drives
# it with etcdctl, prints PASS/FAIL per check and ends with exactly one line
# "N passed, M failed"; exits non-zero when M > 0. The server and every
# background etcdctl are always killed on exit.
set -euo pipefail

E2E_NAME=wl
# shellcheck source=harness.bash
source "$(dirname "${BASH_SOURCE[0]}")/harness.bash"

# bg FILE ETCDCTL-ARGS... : run etcdctl in the background with stdout+stderr
# to FILE; sets BG to its pid and remembers it for cleanup. etcdctl is
# started directly (not through a shell function, which would put a subshell
# between $! and etcdctl), so signals reach it; it is a Go program, so it
# handles SIGINT even though bash starts background jobs with SIGINT ignored.
bg() {
  local out="$1"
  shift
  "${CTL[@]}" "$@" >"$out" 2>&1 &
  BG=$!
  BG_PIDS+=("$BG")
}

# wait_for FILE TEXT [SECONDS] : wait until FILE contains TEXT (fixed string).
wait_for() {
  local file="$1" text="$2" limit="${3:-10}"
  local deadline=$((SECONDS + limit))
  while ((SECONDS < deadline)); do
    if [[ -f "$file" ]] && grep -qF -- "$text" "$file"; then return 0; fi
    sleep 0.1
  done
  return 1
}

# arm_watch FILE PREFIX : after a `watch --prefix PREFIX` was started into
# FILE, put PREFIX"ping" until the watcher shows it, so the watch is
# known to be registered before the real writes happen. Returns 1 on timeout.
arm_watch() {
  local file="$1" prefix="$2" i
  for i in $(seq 1 15); do
    ctl put "${prefix}ping" "$i" >/dev/null 2>&1 || true
    if wait_for "$file" "${prefix}ping" 1; then return 0; fi
  done
  return 1
}

# after_pings FILE PREFIX : FILE's lines after the last ping event (PUT,
# key, value: three lines), i.e. what the watcher printed for the real writes.
after_pings() {
  awk -v k="${2}ping" '{ l[NR] = $0; if ($0 == k) last = NR }
    END { for (i = last + 2; i <= NR; i++) print l[i] }' "$1"
}

if ! start_server; then
  fail "server starts and answers endpoint status"
  summary_and_exit
fi
pass "server starts and answers endpoint status"

# ---- watch ----------------------------------------------------------------------
bg "$WORK/w1.out" watch --prefix w1/
W1=$BG
if arm_watch "$WORK/w1.out" w1/; then
  pass "watch --prefix: registered (sees a put)"
  quiet ctl put w1/a 1
  quiet ctl put w1/b 2
  quiet ctl del w1/a
  quiet ctl put other/x 3
  if wait_for "$WORK/w1.out" DELETE 10; then
    sleep 0.3
    expect_eq "watch --prefix: PUT, PUT, DELETE in order, nothing outside the prefix" \
      "$(printf 'PUT\nw1/a\n1\nPUT\nw1/b\n2\nDELETE\nw1/a\n')" "$(after_pings "$WORK/w1.out" w1/)"
  else
    fail "watch --prefix: delete event shown" "$(cat "$WORK/w1.out")"
  fi
else
  fail "watch --prefix: registered (sees a put)" "$(cat "$WORK/w1.out")"
fi
stop_bg "$W1"

# watch one key: another key's events are not shown.
bg "$WORK/w2.out" watch w2/key
W2=$BG
# A single-key watch cannot be pinged on another key; retry the put of the
# watched key until it shows up, then check what follows.
ok=0
for i in $(seq 1 15); do
  ctl put w2/key "v$i" >/dev/null 2>&1 || true
  if wait_for "$WORK/w2.out" "v$i" 1; then ok=1; break; fi
done
if [[ $ok -eq 1 ]]; then
  quiet ctl put w2/keyz no
  quiet ctl put w2/key final
  if wait_for "$WORK/w2.out" final 10; then
    sleep 0.3
    expect_eq "watch KEY: only that key's events" "$(printf 'PUT\nw2/key\nfinal')" "$(tail -n 3 "$WORK/w2.out")"
  else
    fail "watch KEY: event shown" "$(cat "$WORK/w2.out")"
  fi
else
  fail "watch KEY: registered" "$(cat "$WORK/w2.out")"
fi
stop_bg "$W2"

# watch --rev: replay history from a past revision, then live.
quiet ctl put w3/h one
R_ONE="$(header_rev)"
quiet ctl put w3/h two
quiet ctl del w3/h
bg "$WORK/w3.out" watch --rev="$R_ONE" w3/h
W3=$BG
if wait_for "$WORK/w3.out" DELETE 10; then
  quiet ctl put w3/h three
  if wait_for "$WORK/w3.out" three 10; then
    sleep 0.3
    expect_eq "watch --rev: history then live events, in order" \
      "$(printf 'PUT\nw3/h\none\nPUT\nw3/h\ntwo\nDELETE\nw3/h\n\nPUT\nw3/h\nthree')" "$(cat "$WORK/w3.out")"
  else
    fail "watch --rev: live event after the replay" "$(cat "$WORK/w3.out")"
  fi
else
  fail "watch --rev: historical events replayed" "$(cat "$WORK/w3.out")"
fi
stop_bg "$W3"

# watch --prev-kv: events carry the previous value.
quiet ctl put w4/k old
bg "$WORK/w4.out" watch --prev-kv --prefix w4/
W4=$BG
if arm_watch "$WORK/w4.out" w4/; then
  quiet ctl put w4/k new
  quiet ctl del w4/k
  if wait_for "$WORK/w4.out" DELETE 10; then
    sleep 0.3
    # etcdctl prints: type, [prev key, prev value,] key, value.
    expect_eq "watch --prev-kv: overwrite and delete show the previous value" \
      "$(printf 'PUT\nw4/k\nold\nw4/k\nnew\nDELETE\nw4/k\nnew\nw4/k\n')" \
      "$(awk '/^w4\/k$/ && !seen { start = NR - 1; seen = 1 } { l[NR] = $0 } END { for (i = start; i <= NR; i++) print l[i] }' "$WORK/w4.out")"
  else
    fail "watch --prev-kv: delete event shown" "$(cat "$WORK/w4.out")"
  fi
else
  fail "watch --prev-kv: registered" "$(cat "$WORK/w4.out")"
fi
stop_bg "$W4"

# watch on a compacted revision is refused.
quiet ctl put w5/c 1
R_C1="$(header_rev)"
quiet ctl put w5/c 2
R_C2="$(header_rev)"
quiet ctl compaction "$R_C2"
expect_fail_contains "watch --rev below the compaction fails" "required revision has been compacted" -- \
  timeout 10 etcdctl --endpoints="$EP" watch --rev="$R_C1" w5/c

# ---- lease ----------------------------------------------------------------------
out="$(ctl lease grant 60 2>&1 || true)"
expect_match "lease grant" '^lease [0-9a-f]+ granted with TTL\(60s\)$' "$out"
LID="$(printf '%s' "$out" | awk '{print $2}')"
[[ "$LID" =~ ^[0-9a-f]+$ ]] || LID="0"
expect_out "put --lease" "OK" -- ctl put --lease="$LID" lk lv
ctl -w json get lk >"$WORK/lk.json" 2>&1 || true
expect_eq "get shows the key's lease" "$((16#$LID))" "$(json_get "$WORK/lk.json" 'j["kvs"][0]["lease"]')"
expect_out "lease keep-alive --once" "lease $LID keepalived with TTL(60)" -- ctl lease keep-alive --once "$LID"
out="$(ctl lease timetolive --keys "$LID" 2>&1 || true)"
expect_match "lease timetolive --keys" "^lease $LID granted with TTL\\(60s\\), remaining\\((5[89]|60)s\\), attached keys\\(\\[lk\\]\\)$" "$out"
out="$(ctl lease timetolive "$LID" 2>&1 || true)"
expect_match "lease timetolive" "^lease $LID granted with TTL\\(60s\\), remaining\\((5[89]|60)s\\)$" "$out"
out="$(ctl lease list 2>&1 || true)"
if [[ "$(printf '%s\n' "$out" | head -n1)" =~ ^found\ [0-9]+\ leases$ ]] && printf '%s\n' "$out" | grep -qx "$LID"; then
  pass "lease list shows the lease"
else
  fail "lease list shows the lease" "$out"
fi
out="$(ctl lease grant 1 2>&1 || true)"
expect_match "lease grant below the minimum TTL gets 2 s" '^lease [0-9a-f]+ granted with TTL\(2s\)$' "$out"
expect_out "lease revoke" "lease $LID revoked" -- ctl lease revoke "$LID"
expect_out "revoke deleted the attached key" "" -- ctl get lk
expect_out "lease timetolive after revoke" "lease $LID already expired" -- ctl lease timetolive "$LID"
if ctl lease list 2>/dev/null | grep -qx "$LID"; then
  fail "lease list no longer shows a revoked lease"
else
  pass "lease list no longer shows a revoked lease"
fi
expect_fail_contains "lease revoke of an unknown lease" "requested lease not found" -- ctl lease revoke "$LID"
expect_fail_contains "lease keep-alive --once of an unknown lease" "requested lease not found" -- \
  ctl lease keep-alive --once "$LID"
expect_fail_contains "put --lease with an unknown lease" "requested lease not found" -- \
  ctl put --lease="$LID" lk2 v

# expiry: a 2 s lease takes its key with it.
out="$(ctl lease grant 2 2>&1 || true)"
SHORT="$(printf '%s' "$out" | awk '{print $2}')"
quiet ctl put --lease="$SHORT" short-lived v
expect_out "key of a short lease exists before expiry" "v" -- ctl get --print-value-only short-lived
gone=0
for _ in $(seq 1 100); do
  if [[ -z "$(ctl get short-lived 2>/dev/null)" ]]; then gone=1; break; fi
  sleep 0.1
done
if [[ $gone -eq 1 ]]; then pass "expired lease deletes its key"; else fail "expired lease deletes its key" "still there after 10 s"; fi
expect_out "expired lease is gone" "lease $SHORT already expired" -- ctl lease timetolive "$SHORT"

# ---- lock -----------------------------------------------------------------------
expect_out "lock NAME -- CMD runs the command" "hi" -- ctl lock mylock -- echo hi
out="$(ctl lock mylock -- sh -c 'echo "$ETCD_LOCK_KEY"' 2>&1 || true)"
expect_match "lock exports ETCD_LOCK_KEY = NAME/<lease hex>" '^mylock/[0-9a-f]+$' "$out"
# Mutual exclusion: B cannot start while A holds the lock.
bg "$WORK/lockA.out" lock excl -- sh -c "echo start-A >>'$WORK/order'; sleep 2; echo end-A >>'$WORK/order'"
LA=$BG
if wait_for "$WORK/order" start-A 10; then
  if timeout 20 etcdctl --endpoints="$EP" lock excl -- sh -c "echo start-B >>'$WORK/order'" >/dev/null 2>&1; then
    expect_eq "lock: second holder runs only after the first released" \
      "$(printf 'start-A\nend-A\nstart-B')" "$(cat "$WORK/order")"
  else
    fail "lock: second locker acquires after the first" "$(cat "$WORK/order")"
  fi
else
  fail "lock: first holder runs" "$(cat "$WORK/lockA.out")"
fi
stop_bg "$LA"

# ---- elect ----------------------------------------------------------------------
bg "$WORK/obs.out" elect --listen myelection
OBS=$BG
bg "$WORK/c1.out" elect myelection cand1
C1=$BG
if wait_for "$WORK/c1.out" cand1 10; then
  expect_match "elect: first candidate becomes leader" $'^myelection/[0-9a-f]+\ncand1$' "$(cat "$WORK/c1.out")"
  bg "$WORK/c2.out" elect myelection cand2
  C2=$BG
  sleep 1
  expect_eq "elect: second candidate waits" "" "$(cat "$WORK/c2.out")"
  if wait_for "$WORK/obs.out" cand1 10; then
    pass "elect --listen: observer sees the leader"
  else
    fail "elect --listen: observer sees the leader" "$(cat "$WORK/obs.out")"
  fi
  # Leader 1 resigns on SIGINT; candidate 2 takes over.
  stop_bg "$C1" INT
  if wait_for "$WORK/c2.out" cand2 15; then
    expect_match "elect: second candidate becomes leader after the first resigns" \
      $'^myelection/[0-9a-f]+\ncand2$' "$(cat "$WORK/c2.out")"
  else
    fail "elect: second candidate becomes leader after the first resigns" "$(cat "$WORK/c2.out")"
  fi
  if wait_for "$WORK/obs.out" cand2 10; then
    pass "elect --listen: observer sees the new leader"
  else
    fail "elect --listen: observer sees the new leader" "$(cat "$WORK/obs.out")"
  fi
  stop_bg "$C2" INT
else
  fail "elect: first candidate becomes leader" "$(cat "$WORK/c1.out")"
  stop_bg "$C1"
fi
stop_bg "$OBS" INT

stop_server
summary_and_exit

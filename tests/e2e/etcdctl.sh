#!/usr/bin/env bash
# End-to-end check of metastore with the stock etcdctl (v3 API).
#
# Builds nothing. Uses the binary at $METASTORE_BIN, else
# ${CARGO_TARGET_DIR:-<repo>/target}/debug/metastore. Installs etcdctl
# (Debian package etcd-client, etcdctl 3.4.x) when it is missing.
# Starts a single-member server on free loopback ports in a temp dir, drives
# it with etcdctl, prints PASS/FAIL per check and ends with exactly one line
# "N passed, M failed"; exits non-zero when M > 0. The server is always
# killed on exit.
set -euo pipefail

E2E_NAME=kv
# shellcheck source=harness.bash
source "$(dirname "${BASH_SOURCE[0]}")/harness.bash"

if ! start_server; then
  fail "server starts and answers endpoint status"
  summary_and_exit
fi
pass "server starts and answers endpoint status"

# ---- put / get ----------------------------------------------------------
expect_out "put foo" "OK" -- ctl put foo bar
expect_out "get foo" "$(printf 'foo\nbar')" -- ctl get foo
expect_out "get --print-value-only" "bar" -- ctl get --print-value-only foo
expect_out "get missing key prints nothing" "" -- ctl get missing-key

quiet ctl put fruit/apple red
quiet ctl put fruit/banana yellow
quiet ctl put fruit/cherry dark-red
quiet ctl put fruitless x
expect_out "get --prefix" "$(printf 'fruit/apple\nred\nfruit/banana\nyellow\nfruit/cherry\ndark-red')" -- \
  ctl get --prefix fruit/
expect_out "get --prefix --keys-only" "$(printf 'fruit/apple\n\nfruit/banana\n\nfruit/cherry\n')" -- \
  ctl get --prefix --keys-only fruit/
expect_out "get range [start, end)" "$(printf 'red\nyellow')" -- \
  ctl get --print-value-only fruit/apple fruit/cherry
expect_out "get --limit" "$(printf 'fruit/apple\nred\nfruit/banana\nyellow')" -- \
  ctl get --prefix --limit=2 fruit/
expect_out "get --from-key" "$(printf 'dark-red\nx')" -- \
  ctl get --from-key --print-value-only fruit/c
expect_out "get --sort-by=KEY --order=DESCEND" "$(printf 'cherry\nbanana\napple')" -- \
  bash -c "etcdctl --endpoints=$EP get --prefix --keys-only --sort-by=KEY --order=DESCEND fruit/ | grep -v '^\$' | sed 's#fruit/##'"
expect_out "get --sort-by=VALUE --order=ASCEND" "$(printf 'dark-red\nred\nyellow')" -- \
  ctl get --prefix --print-value-only --sort-by=VALUE --order=ASCEND fruit/

# make create and mod orders differ from key order
quiet ctl put fruit/apple red2
expect_out "get --sort-by=MODIFY --order=DESCEND" "$(printf 'red2\ndark-red\nyellow')" -- \
  ctl get --prefix --print-value-only --sort-by=MODIFY --order=DESCEND fruit/
expect_out "get --sort-by=CREATE --order=ASCEND" "$(printf 'red2\nyellow\ndark-red')" -- \
  ctl get --prefix --print-value-only --sort-by=CREATE --order=ASCEND fruit/
expect_out "get --sort-by=VERSION --order=DESCEND --limit=1" "red2" -- \
  ctl get --prefix --print-value-only --sort-by=VERSION --order=DESCEND --limit=1 fruit/

# ---- json output, revisions, --rev ------------------------------------------
if ctl -w json get foo >"$WORK/get.json" 2>&1; then
  R_FOO_CREATE="$(json_get "$WORK/get.json" 'j["kvs"][0]["create_revision"]')"
  expect_eq "json get: key" "foo" "$(json_get "$WORK/get.json" 'b(j["kvs"][0]["key"])')"
  expect_eq "json get: value" "bar" "$(json_get "$WORK/get.json" 'b(j["kvs"][0]["value"])')"
  expect_eq "json get: version" "1" "$(json_get "$WORK/get.json" 'j["kvs"][0]["version"]')"
  expect_eq "json get: count" "1" "$(json_get "$WORK/get.json" 'j["count"]')"
  expect_eq "json get: header has cluster and member id" "True" \
    "$(json_get "$WORK/get.json" 'j["header"]["cluster_id"] != 0 and j["header"]["member_id"] != 0')"
else
  fail "json get foo" "$(cat "$WORK/get.json")"
  R_FOO_CREATE=0
fi

REV0="$(header_rev)"
quiet ctl put foo bar2
REV1="$(header_rev)"
expect_eq "a put bumps the revision by one" "$((REV0 + 1))" "$REV1"
expect_out "get --rev old value" "bar" -- ctl get --print-value-only --rev="$REV0" foo
expect_out "get --rev new value" "bar2" -- ctl get --print-value-only --rev="$REV1" foo
ctl -w json get foo >"$WORK/get2.json" 2>&1 || true
expect_eq "overwrite keeps create_revision" "$R_FOO_CREATE" "$(json_get "$WORK/get2.json" 'j["kvs"][0]["create_revision"]')"
expect_eq "overwrite sets mod_revision" "$REV1" "$(json_get "$WORK/get2.json" 'j["kvs"][0]["mod_revision"]')"
expect_eq "overwrite bumps version" "2" "$(json_get "$WORK/get2.json" 'j["kvs"][0]["version"]')"
ctl -w json get --prefix --limit=1 fruit/ >"$WORK/lim.json" 2>&1 || true
expect_eq "json get --limit: more and count" "True 3" \
  "$(json_get "$WORK/lim.json" 'str(j.get("more", False)) + " " + str(j["count"])')"
expect_fail_contains "get --rev in the future" "required revision is a future revision" -- \
  ctl get --rev=$((REV1 + 100)) foo

# ---- delete -------------------------------------------------------------------
expect_out "del" "1" -- ctl del fruitless
expect_out "del missing key" "0" -- ctl del fruitless
expect_out "del --prev-kv" "$(printf '1\nfoo\nbar2')" -- ctl del --prev-kv foo
expect_out "get after del" "" -- ctl get foo
REV_BEFORE="$(header_rev)"
expect_out "del --prefix" "3" -- ctl del --prefix fruit/
expect_eq "a multi-key delete is one revision" "$((REV_BEFORE + 1))" "$(header_rev)"
REV_BEFORE="$(header_rev)"
quiet ctl del --prefix nothing-here/
expect_eq "deleting nothing keeps the revision" "$REV_BEFORE" "$(header_rev)"

# ---- txn ----------------------------------------------------------------------
quiet ctl put tx/key1 v1
# Sections: compares, blank line, success ops, blank line, failure ops, blank line.
TXN_OUT="$(printf '%s\n' 'value("tx/key1") = "v1"' '' 'put tx/key1 "v2"' 'put tx/key2 "new"' '' 'put tx/else "e"' '' | ctl txn 2>&1 || true)"
expect_eq "txn success branch" "$(printf 'SUCCESS\n\nOK\n\nOK')" "$TXN_OUT"
expect_out "txn applied success ops" "$(printf 'v2\nnew')" -- ctl get --prefix --print-value-only tx/key
expect_out "txn did not apply failure ops" "" -- ctl get tx/else
TXN_OUT="$(printf '%s\n' 'value("tx/key1") = "v1"' 'mod("tx/key2") > "0"' '' 'put tx/key1 "v3"' '' 'put tx/else "e"' 'get tx/key1' '' | ctl txn 2>&1 || true)"
expect_eq "txn failure branch" "$(printf 'FAILURE\n\nOK\n\ntx/key1\nv2')" "$TXN_OUT"
expect_out "txn failure op applied" "e" -- ctl get --print-value-only tx/else
TXN_OUT="$(printf '%s\n' 'create("tx/absent") = "0"' 'ver("tx/key2") = "1"' '' 'del tx/else' '' '' | ctl txn 2>&1 || true)"
expect_eq "txn create()=0 and ver() compares" "$(printf 'SUCCESS\n\n1')" "$TXN_OUT"
REV_BEFORE="$(header_rev)"
TXN_OUT="$(printf '%s\n' '' 'put tx/a "1"' 'put tx/b "2"' '' '' | ctl -w json txn 2>/dev/null || true)"
echo "$TXN_OUT" >"$WORK/txn.json"
expect_eq "txn ops share one revision" "$((REV_BEFORE + 1))" "$(json_get "$WORK/txn.json" 'j["header"]["revision"]')"
ctl -w json get --prefix tx/ >"$WORK/txget.json" 2>&1 || true
expect_eq "txn puts carry the txn revision" "$((REV_BEFORE + 1)) $((REV_BEFORE + 1))" \
  "$(json_get "$WORK/txget.json" '" ".join(str(kv["mod_revision"]) for kv in j["kvs"] if b(kv["key"]) in ("tx/a", "tx/b"))')"
expect_fail_contains "txn with a duplicate put" "duplicate key given in txn request" -- \
  bash -c "printf '%s\n' '' 'put tx/d \"1\"' 'put tx/d \"2\"' '' '' | etcdctl --endpoints=$EP txn"

# ---- compaction ---------------------------------------------------------------------
quiet ctl put cmp v1
R1="$(header_rev)"
quiet ctl put cmp v2
R2="$(header_rev)"
quiet ctl put cmp v3
expect_out "compaction" "compacted revision $R2" -- ctl compaction "$R2"
expect_fail_contains "get --rev below the compaction" "required revision has been compacted" -- \
  ctl get --rev="$R1" cmp
expect_out "get --rev at the compaction revision" "v2" -- ctl get --print-value-only --rev="$R2" cmp
expect_fail_contains "compacting again" "required revision has been compacted" -- ctl compaction "$R1"
expect_out "physical compaction" "compacted revision $((R2 + 1))" -- ctl compaction --physical "$((R2 + 1))"

# ---- cluster / maintenance ---------------------------------------------------------
if ctl -w json endpoint status >"$WORK/status.json" 2>&1; then
  expect_eq "endpoint status: leader is this member" "True" \
    "$(json_get "$WORK/status.json" 'j[0]["Status"]["leader"] == j[0]["Status"]["header"]["member_id"] != 0')"
  expect_eq "endpoint status: raft index > 0" "True" \
    "$(json_get "$WORK/status.json" 'j[0]["Status"].get("raftIndex", 0) > 0')"
  expect_eq "endpoint status: version reported" "True" \
    "$(json_get "$WORK/status.json" 'len(j[0]["Status"].get("version", "")) > 0')"
else
  fail "endpoint status -w json" "$(cat "$WORK/status.json")"
fi
expect_out "endpoint status (table) says leader" "true" -- \
  bash -c "etcdctl --endpoints=$EP endpoint status | awk -F', ' '{print \$5}'"
if out="$(ctl member list 2>&1)"; then
  expect_eq "member list: one member" "1" "$(printf '%s\n' "$out" | grep -c .)"
  expect_eq "member list: started, name, urls, not learner" \
    "started, $NAME, $PURL, $CURL, false" \
    "$(printf '%s\n' "$out" | head -n1 | cut -d, -f2- | sed 's/^ //')"
else
  fail "member list" "$out"
fi
if out="$(ctl endpoint health 2>&1)" && [[ "$out" == *"is healthy"* ]]; then
  pass "endpoint health"
else
  fail "endpoint health" "$out"
fi

# ---- restart ------------------------------------------------------------------------
quiet ctl put persist/a 1
quiet ctl put persist/b 2
quiet ctl put persist/a 3
REV_BEFORE="$(header_rev)"
# HashKV: etcd's checksum of the history up to a revision; the same after a restart.
hashkv() {
  ctl endpoint hashkv --rev="$1" -w json >"$WORK/hashkv.json" 2>&1 || true
  json_get "$WORK/hashkv.json" 'j[0]["HashKV"]["hash"]'
}
HASH_BEFORE="$(hashkv "$REV_BEFORE")"
expect_match "endpoint hashkv answers a hash" '^[0-9]+$' "$HASH_BEFORE"
expect_fail_contains "endpoint hashkv of a compacted revision" "required revision has been compacted" -- \
  ctl endpoint hashkv --rev=1
kill -TERM "$SERVER_PID" 2>/dev/null || true
for _ in $(seq 1 100); do
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.2
done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  fail "server exits on SIGTERM within 20 s"
  stop_server
else
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  pass "server exits on SIGTERM within 20 s"
fi
if start_server; then
  pass "server restarts on the same data dir"
  expect_out "restart keeps data" "$(printf '3\n2')" -- ctl get --prefix --print-value-only persist/
  expect_eq "restart keeps the revision" "$REV_BEFORE" "$(header_rev)"
  expect_eq "restart keeps the HashKV" "$HASH_BEFORE" "$(hashkv "$REV_BEFORE")"
  ctl -w json get persist/a >"$WORK/pa.json" 2>&1 || true
  expect_eq "restart keeps version" "2" "$(json_get "$WORK/pa.json" 'j["kvs"][0]["version"]')"
  quiet ctl put persist/c 4
  expect_eq "revisions continue after restart" "$((REV_BEFORE + 1))" "$(header_rev)"
  expect_fail_contains "compaction survives restart" "required revision has been compacted" -- \
    ctl get --rev="$R1" cmp
  # Crash restart.
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  if start_server; then
    expect_out "kill -9 restart keeps acknowledged data" "$(printf '3\n2\n4')" -- \
      ctl get --prefix --print-value-only persist/
  else
    fail "server restarts after kill -9"
  fi
else
  fail "server restarts on the same data dir"
fi

stop_server
summary_and_exit

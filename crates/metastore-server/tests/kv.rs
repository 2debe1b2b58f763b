//! Black-box KV tests: hold `metastore` to etcd 3.5's v3 KV semantics,
//! talking to the real binary through the `etcd-client` crate.
//!
//! Every test starts its own single-member server (fresh data dir), so
//! revision arithmetic is exact and tests never see each other's keys.
//! The etcd source each expectation comes from is named next to it
//! (paths are in the etcd-io/etcd repository, release-3.5 layout).
#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Debug;

use common::{TestServer, MEMBER_NAME};
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, Error, GetOptions, KeyValue,
    PutOptions, ResponseHeader, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

// Error texts, verbatim from api/v3rpc/rpctypes/error.go.
const ERR_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const ERR_FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
const ERR_TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
const ERR_DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
const ERR_EMPTY_KEY: &str = "etcdserver: key is not provided";
const ERR_KEY_NOT_FOUND: &str = "etcdserver: key not found";
const ERR_VALUE_PROVIDED: &str = "etcdserver: value is provided";
const ERR_LEASE_PROVIDED: &str = "etcdserver: lease is provided";
const ERR_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const ERR_TOO_LARGE: &str = "etcdserver: request is too large";

async fn setup() -> (TestServer, Client) {
    let srv = TestServer::start().await;
    let client = srv.client().await;
    (srv, client)
}

fn rev_of(h: Option<&ResponseHeader>) -> i64 {
    h.expect("response has no header").revision()
}

/// Current store revision, read through a Range of a key no test writes.
async fn current_rev(c: &mut Client) -> i64 {
    rev_of(c.get("__never_written__", None).await.unwrap().header())
}

fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

fn values(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .collect()
}

/// Assert `res` failed with a gRPC status of the given code (tonic `Code`
/// variant name, e.g. "OutOfRange") and exactly the given message.
#[track_caller]
fn expect_grpc<T: Debug>(res: Result<T, Error>, code: &str, msg: &str) {
    match res {
        Err(Error::GRpcStatus(st)) => {
            assert_eq!(
                format!("{:?}", st.code()),
                code,
                "wrong gRPC code (message was {:?})",
                st.message()
            );
            assert_eq!(st.message(), msg, "wrong gRPC message");
        }
        other => panic!("expected gRPC {code} {msg:?}, got {other:?}"),
    }
}

/// Like `expect_grpc` but checks only the code.
#[track_caller]
fn expect_grpc_code<T: Debug>(res: Result<T, Error>, code: &str) {
    match res {
        Err(Error::GRpcStatus(st)) => assert_eq!(
            format!("{:?}", st.code()),
            code,
            "wrong gRPC code (message was {:?})",
            st.message()
        ),
        other => panic!("expected gRPC {code}, got {other:?}"),
    }
}

async fn put_all(c: &mut Client, kvs: &[(&str, &str)]) -> i64 {
    let mut rev = 0;
    for (k, v) in kvs {
        rev = rev_of(c.put(*k, *v, None).await.unwrap().header());
    }
    rev
}

/// Run a txn with a single compare and no ops; return `succeeded`.
async fn cmp_holds(c: &mut Client, cmp: Compare) -> bool {
    c.txn(Txn::new().when([cmp])).await.unwrap().succeeded()
}

fn as_put(r: &TxnOpResponse) -> &etcd_client::PutResponse {
    match r {
        TxnOpResponse::Put(p) => p,
        other => panic!("expected a put response, got {other:?}"),
    }
}

fn as_get(r: &TxnOpResponse) -> &etcd_client::GetResponse {
    match r {
        TxnOpResponse::Get(g) => g,
        other => panic!("expected a range response, got {other:?}"),
    }
}

fn as_delete(r: &TxnOpResponse) -> &etcd_client::DeleteResponse {
    match r {
        TxnOpResponse::Delete(d) => d,
        other => panic!("expected a delete response, got {other:?}"),
    }
}

fn as_txn(r: &TxnOpResponse) -> &etcd_client::TxnResponse {
    match r {
        TxnOpResponse::Txn(t) => t,
        other => panic!("expected a txn response, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// put / get basics and revision bookkeeping
// ---------------------------------------------------------------------------

#[tokio::test]
async fn fresh_store_starts_at_revision_one() {
    // mvcc/kvstore.go: a new store has currentRev = 1; the first write is 2.
    let (_srv, mut c) = setup().await;
    assert_eq!(current_rev(&mut c).await, 1);
    let r = c.put("first", "1", None).await.unwrap();
    assert_eq!(rev_of(r.header()), 2);
}

#[tokio::test]
async fn put_then_get() {
    let (_srv, mut c) = setup().await;
    let r1 = rev_of(c.put("foo", "bar", None).await.unwrap().header());

    let g = c.get("foo", None).await.unwrap();
    assert_eq!(g.kvs().len(), 1);
    let kv = &g.kvs()[0];
    assert_eq!(kv.key(), b"foo");
    assert_eq!(kv.value(), b"bar");
    assert_eq!(kv.create_revision(), r1);
    assert_eq!(kv.mod_revision(), r1);
    assert_eq!(kv.version(), 1);
    assert_eq!(kv.lease(), 0);
    assert_eq!(g.count(), 1);
    assert!(!g.more());
    assert_eq!(rev_of(g.header()), r1);

    // Missing key: empty result, header still carries the store revision.
    let g = c.get("nope", None).await.unwrap();
    assert!(g.kvs().is_empty());
    assert_eq!(g.count(), 0);
    assert!(!g.more());
    assert_eq!(rev_of(g.header()), r1);
}

#[tokio::test]
async fn binary_keys_and_values_and_empty_value_roundtrip() {
    let (_srv, mut c) = setup().await;
    let key: Vec<u8> = vec![0x00, 0x01, 0xfe, 0xff, b'k'];
    let val: Vec<u8> = (0u8..=255).collect();
    c.put(key.clone(), val.clone(), None).await.unwrap();
    let g = c.get(key.clone(), None).await.unwrap();
    assert_eq!(g.kvs().len(), 1);
    assert_eq!(g.kvs()[0].key(), key.as_slice());
    assert_eq!(g.kvs()[0].value(), val.as_slice());

    // An empty value is a legal value, distinct from a missing key.
    c.put("empty", "", None).await.unwrap();
    let g = c.get("empty", None).await.unwrap();
    assert_eq!(g.kvs().len(), 1);
    assert_eq!(g.kvs()[0].value(), b"");
    assert_eq!(g.kvs()[0].version(), 1);
}

#[tokio::test]
async fn put_prev_kv() {
    let (_srv, mut c) = setup().await;
    // No previous pair: prev_kv is absent even when asked for.
    let r1 = c
        .put("pk", "v1", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert!(r1.prev_key().is_none());
    let rev1 = rev_of(r1.header());

    let r2 = c
        .put("pk", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    let prev = r2.prev_key().expect("prev_kv requested and key existed");
    assert_eq!(prev.key(), b"pk");
    assert_eq!(prev.value(), b"v1");
    assert_eq!(prev.create_revision(), rev1);
    assert_eq!(prev.mod_revision(), rev1);
    assert_eq!(prev.version(), 1);
    assert_eq!(rev_of(r2.header()), rev1 + 1);

    // Not asked for: not returned.
    let r3 = c.put("pk", "v3", None).await.unwrap();
    assert!(r3.prev_key().is_none());
}

#[tokio::test]
async fn revisions_across_put_delete_reput() {
    // mvcc/kvstore_txn.go put(): create_revision is kept while the key is
    // live, version counts puts since creation; a delete ends the key's
    // life, so a re-put starts over at version 1 with a new create_revision.
    let (_srv, mut c) = setup().await;
    let base = current_rev(&mut c).await;

    let r1 = rev_of(c.put("k", "v1", None).await.unwrap().header());
    assert_eq!(r1, base + 1);
    let r2 = rev_of(c.put("k", "v2", None).await.unwrap().header());
    assert_eq!(r2, r1 + 1);

    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (r1, r2, 2)
    );

    let d = c.delete("k", None).await.unwrap();
    assert_eq!(d.deleted(), 1);
    let r3 = rev_of(d.header());
    assert_eq!(r3, r2 + 1, "a delete of a live key is a new revision");

    let g = c.get("k", None).await.unwrap();
    assert!(g.kvs().is_empty());
    assert_eq!(rev_of(g.header()), r3);

    let r4 = rev_of(c.put("k", "v3", None).await.unwrap().header());
    assert_eq!(r4, r3 + 1);
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (r4, r4, 1),
        "re-put after delete starts a new generation"
    );
    assert_eq!(kv.value(), b"v3");

    // History is still readable at every revision.
    let at = |r: i64| Some(GetOptions::new().with_revision(r));
    let g = c.get("k", at(r1)).await.unwrap();
    assert_eq!(values(g.kvs()), ["v1"]);
    assert_eq!(g.kvs()[0].version(), 1);
    // The header of a historical read carries the *current* revision
    // (mvcc/kvstore_txn.go rangeKeys returns Rev: curRev).
    assert_eq!(rev_of(g.header()), r4);
    let g = c.get("k", at(r2)).await.unwrap();
    assert_eq!(values(g.kvs()), ["v2"]);
    assert_eq!(
        (
            g.kvs()[0].create_revision(),
            g.kvs()[0].mod_revision(),
            g.kvs()[0].version()
        ),
        (r1, r2, 2)
    );
    let g = c.get("k", at(r3)).await.unwrap();
    assert!(g.kvs().is_empty(), "deleted at r3");
    assert_eq!(g.count(), 0);
    let g = c.get("k", at(base)).await.unwrap();
    assert!(g.kvs().is_empty(), "not yet created at base");
    let g = c.get("k", at(r4)).await.unwrap();
    assert_eq!(values(g.kvs()), ["v3"]);
}

#[tokio::test]
async fn every_write_bumps_revision_by_exactly_one() {
    let (_srv, mut c) = setup().await;
    let mut last = current_rev(&mut c).await;
    for i in 0..20 {
        let r = rev_of(
            c.put(format!("seq/{}", i % 3), format!("{i}"), None)
                .await
                .unwrap()
                .header(),
        );
        assert_eq!(r, last + 1);
        last = r;
    }
    // A multi-key delete is a single revision.
    let d = c
        .delete("seq/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(d.deleted(), 3);
    assert_eq!(rev_of(d.header()), last + 1);
}

// ---------------------------------------------------------------------------
// ranges
// ---------------------------------------------------------------------------

#[tokio::test]
async fn range_with_range_end_from_key_and_all_keys() {
    let (_srv, mut c) = setup().await;
    put_all(
        &mut c,
        &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")],
    )
    .await;

    // [b, d) - end exclusive.
    let g = c
        .get("b", Some(GetOptions::new().with_range("d")))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["b", "c"]);
    assert_eq!(g.count(), 2);

    // End beyond the last key.
    let g = c
        .get("c", Some(GetOptions::new().with_range("zzz")))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["c", "d", "e"]);

    // An end that sorts below the start is an empty range.
    let g = c
        .get("d", Some(GetOptions::new().with_range("b")))
        .await
        .unwrap();
    assert!(g.kvs().is_empty());
    assert_eq!(g.count(), 0);

    // from-key: range_end = "\0" means every key >= key.
    let g = c
        .get("c", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["c", "d", "e"]);
    let g = c
        .get("bb", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["c", "d", "e"]);

    // All keys: key = range_end = "\0".
    let g = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["a", "b", "c", "d", "e"]);
    assert_eq!(g.count(), 5);
}

#[tokio::test]
async fn range_prefix() {
    let (_srv, mut c) = setup().await;
    put_all(
        &mut c,
        &[
            ("pr", "x"),
            ("pre", "x"),
            ("pre/a", "x"),
            ("pre/b", "x"),
            ("pre/c", "x"),
            ("prf", "x"),
            ("pre0", "x"),
        ],
    )
    .await;

    let g = c
        .get("pre/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["pre/a", "pre/b", "pre/c"]);
    assert_eq!(g.count(), 3);

    // Prefix "pre" is the range ["pre", "prf"): includes "pre" itself.
    let g = c
        .get("pre", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["pre", "pre/a", "pre/b", "pre/c", "pre0"]);

    let g = c
        .get("nothing/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(g.kvs().is_empty());
    assert_eq!(g.count(), 0);

    // Prefixes ending in 0xff: the range end is computed by dropping
    // trailing 0xff bytes and incrementing ("a\xff" -> "b"), and an
    // all-0xff prefix becomes "\0" (every key >= prefix).
    c.put(b"a\xff".to_vec(), "1", None).await.unwrap();
    c.put(b"a\xff\x01".to_vec(), "2", None).await.unwrap();
    c.put(b"b".to_vec(), "3", None).await.unwrap();
    let g = c
        .get(b"a\xff".to_vec(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(g.kvs().len(), 2);
    assert_eq!(g.kvs()[0].key(), b"a\xff");
    assert_eq!(g.kvs()[1].key(), b"a\xff\x01");

    c.put(b"\xff".to_vec(), "4", None).await.unwrap();
    c.put(b"\xff\xff".to_vec(), "5", None).await.unwrap();
    let g = c
        .get(b"\xff".to_vec(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(g.kvs().len(), 2);
    assert_eq!(g.kvs()[0].key(), b"\xff");
    assert_eq!(g.kvs()[1].key(), b"\xff\xff");
}

#[tokio::test]
async fn range_limit_more_and_count() {
    // etcdserver/apply.go Range: the store is asked for limit+1 keys to set
    // `more`; `count` is the number of keys in the whole range regardless of
    // the limit (the 3.5.0 regression capping it was reverted, etcd#13060).
    let (_srv, mut c) = setup().await;
    for i in 0..5 {
        c.put(format!("lim/{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let get = |limit: i64| Some(GetOptions::new().with_prefix().with_limit(limit));

    let g = c.get("lim/", get(2)).await.unwrap();
    assert_eq!(keys(g.kvs()), ["lim/0", "lim/1"]);
    assert!(g.more());
    assert_eq!(g.count(), 5);

    let g = c.get("lim/", get(4)).await.unwrap();
    assert_eq!(g.kvs().len(), 4);
    assert!(g.more());
    assert_eq!(g.count(), 5);

    let g = c.get("lim/", get(5)).await.unwrap();
    assert_eq!(g.kvs().len(), 5);
    assert!(!g.more(), "limit == number of keys: nothing more");
    assert_eq!(g.count(), 5);

    let g = c.get("lim/", get(10)).await.unwrap();
    assert_eq!(g.kvs().len(), 5);
    assert!(!g.more());

    // limit 0 means no limit.
    let g = c.get("lim/", get(0)).await.unwrap();
    assert_eq!(g.kvs().len(), 5);
    assert!(!g.more());

    // Limit applies after sorting.
    let g = c
        .get(
            "lim/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(2)
                    .with_sort(SortTarget::Key, SortOrder::Descend),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["lim/4", "lim/3"]);
    assert!(g.more());
    assert_eq!(g.count(), 5);

    // Pagination the way clients do it: continue from last key + "\0".
    let g = c
        .get(
            "lim/1\0",
            Some(GetOptions::new().with_range("lim0").with_limit(2)),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["lim/2", "lim/3"]);
    assert!(g.more());
    assert_eq!(g.count(), 3);
}

#[tokio::test]
async fn range_count_only_and_keys_only() {
    let (_srv, mut c) = setup().await;
    let mut revs = Vec::new();
    for i in 0..4 {
        revs.push(rev_of(
            c.put(format!("co/{i}"), format!("value-{i}"), None)
                .await
                .unwrap()
                .header(),
        ));
    }
    c.put("co/1", "again", None).await.unwrap();

    let g = c
        .get(
            "co/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert!(g.kvs().is_empty(), "count_only returns no kvs");
    assert_eq!(g.count(), 4);
    assert!(!g.more());

    let g = c
        .get(
            "co/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["co/0", "co/1", "co/2", "co/3"]);
    assert_eq!(g.count(), 4);
    for kv in g.kvs() {
        assert!(kv.value().is_empty(), "keys_only strips values");
    }
    // Metadata is still there.
    assert_eq!(g.kvs()[0].create_revision(), revs[0]);
    assert_eq!(g.kvs()[1].version(), 2);
    assert_eq!(g.kvs()[1].create_revision(), revs[1]);

    // count_only on a single missing key.
    let g = c
        .get("co/none", Some(GetOptions::new().with_count_only()))
        .await
        .unwrap();
    assert_eq!(g.count(), 0);
}

#[tokio::test]
async fn range_sort_every_target_and_order() {
    // etcdserver/apply.go Range: sorting is done in the server for every
    // target; SortOrder NONE with a target other than KEY means ASCEND.
    let (_srv, mut c) = setup().await;
    // Build three keys whose orders differ for every target:
    //   key:     a b c
    //   create:  c a b
    //   mod:     b a c
    //   version: b c a   (a=3, b=1, c=2)
    //   value:   c b a   (a="z", b="y", c="x")
    c.put("s/c", "c1", None).await.unwrap();
    c.put("s/a", "a1", None).await.unwrap();
    c.put("s/b", "y", None).await.unwrap();
    c.put("s/a", "a2", None).await.unwrap();
    c.put("s/a", "z", None).await.unwrap();
    c.put("s/c", "x", None).await.unwrap();

    let cases: &[(SortTarget, SortOrder, [&str; 3])] = &[
        (SortTarget::Key, SortOrder::None, ["s/a", "s/b", "s/c"]),
        (SortTarget::Key, SortOrder::Ascend, ["s/a", "s/b", "s/c"]),
        (SortTarget::Key, SortOrder::Descend, ["s/c", "s/b", "s/a"]),
        (SortTarget::Create, SortOrder::Ascend, ["s/c", "s/a", "s/b"]),
        (
            SortTarget::Create,
            SortOrder::Descend,
            ["s/b", "s/a", "s/c"],
        ),
        (SortTarget::Create, SortOrder::None, ["s/c", "s/a", "s/b"]),
        (SortTarget::Mod, SortOrder::Ascend, ["s/b", "s/a", "s/c"]),
        (SortTarget::Mod, SortOrder::Descend, ["s/c", "s/a", "s/b"]),
        (SortTarget::Mod, SortOrder::None, ["s/b", "s/a", "s/c"]),
        (
            SortTarget::Version,
            SortOrder::Ascend,
            ["s/b", "s/c", "s/a"],
        ),
        (
            SortTarget::Version,
            SortOrder::Descend,
            ["s/a", "s/c", "s/b"],
        ),
        (SortTarget::Version, SortOrder::None, ["s/b", "s/c", "s/a"]),
        (SortTarget::Value, SortOrder::Ascend, ["s/c", "s/b", "s/a"]),
        (SortTarget::Value, SortOrder::Descend, ["s/a", "s/b", "s/c"]),
        (SortTarget::Value, SortOrder::None, ["s/c", "s/b", "s/a"]),
    ];
    for (target, order, want) in cases {
        let g = c
            .get(
                "s/",
                Some(GetOptions::new().with_prefix().with_sort(*target, *order)),
            )
            .await
            .unwrap();
        assert_eq!(keys(g.kvs()), want, "sort by {target:?} {order:?}");
        assert_eq!(g.count(), 3);
        assert!(!g.more());
    }

    // Sort + limit: the top of the sorted list, `more` set.
    let g = c
        .get(
            "s/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["s/c"]);
    assert!(g.more());
    assert_eq!(g.count(), 3);
}

#[tokio::test]
async fn range_min_max_revision_filters() {
    // etcdserver/apply.go Range: the four filters prune kvs after the range
    // read; `count` is taken before pruning (it counts the whole range; etcd
    // documents this, see etcd#18267), `more` after pruning.
    let (_srv, mut c) = setup().await;
    let ra = rev_of(c.put("f/a", "1", None).await.unwrap().header());
    let rb = rev_of(c.put("f/b", "1", None).await.unwrap().header());
    let rc = rev_of(c.put("f/c", "1", None).await.unwrap().header());
    let ra2 = rev_of(c.put("f/a", "2", None).await.unwrap().header());
    // a: create ra, mod ra2 | b: create rb, mod rb | c: create rc, mod rc
    let p = || GetOptions::new().with_prefix();

    let g = c
        .get("f/", Some(p().with_min_mod_revision(rc)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/a", "f/c"]);
    assert_eq!(g.count(), 3, "count ignores the revision filters");

    let g = c
        .get("f/", Some(p().with_max_mod_revision(rc)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/b", "f/c"]);

    let g = c
        .get("f/", Some(p().with_min_create_revision(rb)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/b", "f/c"]);

    let g = c
        .get("f/", Some(p().with_max_create_revision(rb)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/a", "f/b"]);

    let g = c
        .get(
            "f/",
            Some(p().with_min_create_revision(rb).with_max_mod_revision(rb)),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/b"]);

    // Bounds are inclusive.
    let g = c
        .get(
            "f/",
            Some(p().with_min_mod_revision(ra2).with_max_mod_revision(ra2)),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/a"]);
    let g = c
        .get(
            "f/",
            Some(
                p().with_min_create_revision(ra)
                    .with_max_create_revision(ra),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/a"]);

    // Nothing matches.
    let g = c
        .get("f/", Some(p().with_min_mod_revision(ra2 + 1)))
        .await
        .unwrap();
    assert!(g.kvs().is_empty());
    assert!(!g.more());

    // Filter + limit: `more` reflects the filtered list.
    let g = c
        .get("f/", Some(p().with_min_mod_revision(rc).with_limit(1)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["f/a"]);
    assert!(g.more());
    let g = c
        .get("f/", Some(p().with_min_mod_revision(rc).with_limit(2)))
        .await
        .unwrap();
    assert_eq!(g.kvs().len(), 2);
    assert!(!g.more());
}

#[tokio::test]
async fn historical_range_reads() {
    let (_srv, mut c) = setup().await;
    let r1 = rev_of(c.put("h/a", "a1", None).await.unwrap().header());
    let r2 = rev_of(c.put("h/b", "b1", None).await.unwrap().header());
    let r3 = rev_of(c.put("h/a", "a2", None).await.unwrap().header());
    let r4 = rev_of(c.delete("h/b", None).await.unwrap().header());
    let r5 = rev_of(c.put("h/c", "c1", None).await.unwrap().header());

    let at = |r: i64| Some(GetOptions::new().with_prefix().with_revision(r));
    let g = c.get("h/", at(r1)).await.unwrap();
    assert_eq!(keys(g.kvs()), ["h/a"]);
    assert_eq!(values(g.kvs()), ["a1"]);
    assert_eq!(g.count(), 1);
    let g = c.get("h/", at(r2)).await.unwrap();
    assert_eq!(values(g.kvs()), ["a1", "b1"]);
    let g = c.get("h/", at(r3)).await.unwrap();
    assert_eq!(values(g.kvs()), ["a2", "b1"]);
    let g = c.get("h/", at(r4)).await.unwrap();
    assert_eq!(values(g.kvs()), ["a2"]);
    let g = c.get("h/", at(r5)).await.unwrap();
    assert_eq!(values(g.kvs()), ["a2", "c1"]);
    assert_eq!(rev_of(g.header()), r5);
    // revision 0 (or negative) = latest.
    let g = c.get("h/", at(0)).await.unwrap();
    assert_eq!(values(g.kvs()), ["a2", "c1"]);

    // Historical read + sort + limit + count.
    let g = c
        .get(
            "h/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(r3)
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["h/b"]);
    assert!(g.more());
    assert_eq!(g.count(), 2);
}

#[tokio::test]
async fn serializable_reads() {
    let (_srv, mut c) = setup().await;
    let r1 = rev_of(c.put("ser", "v1", None).await.unwrap().header());
    let r2 = rev_of(c.put("ser", "v2", None).await.unwrap().header());
    // Single member: a serializable read after an acknowledged write sees it.
    let g = c
        .get("ser", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert_eq!(values(g.kvs()), ["v2"]);
    assert_eq!(rev_of(g.header()), r2);
    let g = c
        .get(
            "ser",
            Some(GetOptions::new().with_serializable().with_revision(r1)),
        )
        .await
        .unwrap();
    assert_eq!(values(g.kvs()), ["v1"]);
}

// ---------------------------------------------------------------------------
// delete
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delete_range_prev_kv_and_deleted_count() {
    let (_srv, mut c) = setup().await;
    put_all(
        &mut c,
        &[
            ("d/a", "1"),
            ("d/b", "2"),
            ("d/c", "3"),
            ("e", "4"),
            ("f", "5"),
            ("g", "6"),
        ],
    )
    .await;
    let before = current_rev(&mut c).await;

    let d = c
        .delete(
            "d/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(d.deleted(), 3);
    assert_eq!(keys(d.prev_kvs()), ["d/a", "d/b", "d/c"]);
    assert_eq!(values(d.prev_kvs()), ["1", "2", "3"]);
    assert_eq!(rev_of(d.header()), before + 1);
    assert!(c
        .get("d/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .is_empty());

    // Without prev_kv: no prev_kvs.
    let d = c.delete("e", None).await.unwrap();
    assert_eq!(d.deleted(), 1);
    assert!(d.prev_kvs().is_empty());

    // [f, g) deletes only f.
    let d = c
        .delete(
            "f",
            Some(DeleteOptions::new().with_range("g").with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(d.deleted(), 1);
    assert_eq!(keys(d.prev_kvs()), ["f"]);
    assert_eq!(values(c.get("g", None).await.unwrap().kvs()), ["6"]);

    // from-key.
    c.put("h", "7", None).await.unwrap();
    let d = c
        .delete("g", Some(DeleteOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(d.deleted(), 2);

    // The deleted data is still in history.
    let g = c
        .get(
            "d/",
            Some(GetOptions::new().with_prefix().with_revision(before)),
        )
        .await
        .unwrap();
    assert_eq!(values(g.kvs()), ["1", "2", "3"]);
}

#[tokio::test]
async fn deleting_nothing_does_not_bump_revision() {
    // mvcc/kvstore_txn.go DeleteRange: with no key deleted (and no earlier
    // change in the txn) the returned revision is beginRev, and End() only
    // increments currentRev when there were changes.
    let (_srv, mut c) = setup().await;
    c.put("x", "1", None).await.unwrap();
    let r = current_rev(&mut c).await;

    let d = c.delete("missing", None).await.unwrap();
    assert_eq!(d.deleted(), 0);
    assert_eq!(rev_of(d.header()), r);
    let d = c
        .delete(
            "missing/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(d.deleted(), 0);
    assert!(d.prev_kvs().is_empty());
    assert_eq!(rev_of(d.header()), r);
    assert_eq!(current_rev(&mut c).await, r);

    // Deleting an already-deleted key is also a no-op.
    c.delete("x", None).await.unwrap();
    let r2 = current_rev(&mut c).await;
    assert_eq!(r2, r + 1);
    let d = c.delete("x", None).await.unwrap();
    assert_eq!(d.deleted(), 0);
    assert_eq!(rev_of(d.header()), r2);

    let p = c.put("y", "1", None).await.unwrap();
    assert_eq!(rev_of(p.header()), r2 + 1);
}

// ---------------------------------------------------------------------------
// txn: compares
// ---------------------------------------------------------------------------

#[tokio::test]
async fn txn_compare_value_all_operators() {
    let (_srv, mut c) = setup().await;
    c.put("tv", "m", None).await.unwrap();
    let r = current_rev(&mut c).await;

    use CompareOp::*;
    let cases = [
        (Equal, "m", true),
        (Equal, "x", false),
        (NotEqual, "x", true),
        (NotEqual, "m", false),
        (Greater, "a", true), // stored "m" > "a"
        (Greater, "m", false),
        (Greater, "z", false),
        (Less, "z", true),
        (Less, "m", false),
        (Less, "a", false),
        (Greater, "", true), // anything non-empty > ""
        (Less, "mm", true),  // byte-wise: "m" < "mm"
    ];
    for (op, target, want) in cases {
        let got = cmp_holds(&mut c, Compare::value("tv", op, target)).await;
        assert_eq!(got, want, "value(tv)={:?} {op:?} {target:?}", "m");
    }
    // Read-only txns do not create revisions.
    assert_eq!(current_rev(&mut c).await, r);
}

#[tokio::test]
async fn txn_compare_version_create_mod_all_operators() {
    let (_srv, mut c) = setup().await;
    let rc = rev_of(c.put("tk", "1", None).await.unwrap().header());
    c.put("other", "1", None).await.unwrap();
    let rm = rev_of(c.put("tk", "2", None).await.unwrap().header());
    // tk: version 2, create rc, mod rm (rm = rc + 2)

    use CompareOp::*;
    for (op, n, want) in [
        (Equal, 2, true),
        (Equal, 1, false),
        (NotEqual, 1, true),
        (NotEqual, 2, false),
        (Greater, 1, true),
        (Greater, 2, false),
        (Less, 3, true),
        (Less, 2, false),
    ] {
        assert_eq!(
            cmp_holds(&mut c, Compare::version("tk", op, n)).await,
            want,
            "version(tk)=2 {op:?} {n}"
        );
    }
    for (op, n, want) in [
        (Equal, rc, true),
        (Equal, rm, false),
        (NotEqual, rm, true),
        (NotEqual, rc, false),
        (Greater, rc - 1, true),
        (Greater, rc, false),
        (Less, rc + 1, true),
        (Less, rc, false),
    ] {
        assert_eq!(
            cmp_holds(&mut c, Compare::create_revision("tk", op, n)).await,
            want,
            "create_revision(tk)={rc} {op:?} {n}"
        );
    }
    for (op, n, want) in [
        (Equal, rm, true),
        (Equal, rc, false),
        (NotEqual, rc, true),
        (NotEqual, rm, false),
        (Greater, rm - 1, true),
        (Greater, rm, false),
        (Less, rm + 1, true),
        (Less, rm, false),
    ] {
        assert_eq!(
            cmp_holds(&mut c, Compare::mod_revision("tk", op, n)).await,
            want,
            "mod_revision(tk)={rm} {op:?} {n}"
        );
    }

    // Several compares are ANDed.
    let t = c
        .txn(Txn::new().when([
            Compare::version("tk", Equal, 2),
            Compare::value("tk", Equal, "2"),
            Compare::mod_revision("tk", Equal, rm),
        ]))
        .await
        .unwrap();
    assert!(t.succeeded());
    let t = c
        .txn(Txn::new().when([
            Compare::version("tk", Equal, 2),
            Compare::value("tk", Equal, "nope"),
        ]))
        .await
        .unwrap();
    assert!(!t.succeeded());
}

#[tokio::test]
async fn txn_compare_on_missing_key() {
    // etcdserver/apply.go applyCompare: with no key in range, a VALUE
    // compare always fails ("no way to represent missing value"), whatever
    // the operator; other targets compare against a zero KeyValue, so
    // version/create/mod of a missing key are 0.
    let (_srv, mut c) = setup().await;
    use CompareOp::*;
    for op in [Equal, NotEqual, Greater, Less] {
        assert!(
            !cmp_holds(&mut c, Compare::value("ghost", op, "")).await,
            "value compare {op:?} on a missing key must fail"
        );
        assert!(!cmp_holds(&mut c, Compare::value("ghost", op, "x")).await);
    }
    assert!(cmp_holds(&mut c, Compare::version("ghost", Equal, 0)).await);
    assert!(cmp_holds(&mut c, Compare::create_revision("ghost", Equal, 0)).await);
    assert!(cmp_holds(&mut c, Compare::mod_revision("ghost", Equal, 0)).await);
    assert!(!cmp_holds(&mut c, Compare::version("ghost", Greater, 0)).await);
    assert!(cmp_holds(&mut c, Compare::create_revision("ghost", Less, 1)).await);

    // A deleted key is missing too.
    c.put("gone", "v", None).await.unwrap();
    c.delete("gone", None).await.unwrap();
    assert!(cmp_holds(&mut c, Compare::version("gone", Equal, 0)).await);
    assert!(!cmp_holds(&mut c, Compare::value("gone", NotEqual, "v")).await);

    // The classic create-if-absent idiom.
    let t = c
        .txn(
            Txn::new()
                .when([Compare::create_revision("lock", Equal, 0)])
                .and_then([TxnOp::put("lock", "me", None)])
                .or_else([TxnOp::get("lock", None)]),
        )
        .await
        .unwrap();
    assert!(t.succeeded());
    let t = c
        .txn(
            Txn::new()
                .when([Compare::create_revision("lock", Equal, 0)])
                .and_then([TxnOp::put("lock", "you", None)])
                .or_else([TxnOp::get("lock", None)]),
        )
        .await
        .unwrap();
    assert!(!t.succeeded());
    let resps = t.op_responses();
    assert_eq!(values(as_get(&resps[0]).kvs()), ["me"]);
}

#[tokio::test]
async fn txn_compare_with_range_end() {
    // etcdserver/apply.go applyCompare: with a range_end every key in the
    // range must satisfy the compare; an empty range behaves like a missing
    // key.
    let (_srv, mut c) = setup().await;
    c.put("r/a", "1", None).await.unwrap();
    c.put("r/b", "1", None).await.unwrap();
    c.put("r/b", "1", None).await.unwrap(); // r/b version 2
    c.put("r/c", "2", None).await.unwrap();
    c.put("s", "9", None).await.unwrap();
    use CompareOp::*;

    assert!(cmp_holds(&mut c, Compare::version("r/", Greater, 0).with_prefix()).await);
    assert!(!cmp_holds(&mut c, Compare::version("r/", Equal, 1).with_prefix()).await);
    assert!(cmp_holds(&mut c, Compare::version("r/", Less, 3).with_prefix()).await);
    // [r/a, r/c) holds "1" everywhere, the whole prefix does not.
    assert!(cmp_holds(&mut c, Compare::value("r/a", Equal, "1").with_range("r/c")).await);
    assert!(!cmp_holds(&mut c, Compare::value("r/", Equal, "1").with_prefix()).await);
    assert!(cmp_holds(&mut c, Compare::value("r/", NotEqual, "9").with_prefix()).await);
    assert!(cmp_holds(&mut c, Compare::value("r/", Less, "3").with_prefix()).await);
    let big = current_rev(&mut c).await + 1;
    assert!(cmp_holds(&mut c, Compare::mod_revision("r/", Less, big).with_prefix()).await);
    assert!(
        cmp_holds(
            &mut c,
            Compare::create_revision("r/", Greater, 1).with_prefix()
        )
        .await
    );

    // Empty range.
    assert!(!cmp_holds(&mut c, Compare::value("empty/", Equal, "").with_prefix()).await);
    assert!(
        !cmp_holds(
            &mut c,
            Compare::value("empty/", NotEqual, "x").with_prefix()
        )
        .await
    );
    assert!(cmp_holds(&mut c, Compare::version("empty/", Equal, 0).with_prefix()).await);
    assert!(
        cmp_holds(
            &mut c,
            Compare::create_revision("empty/", Equal, 0).with_prefix()
        )
        .await
    );
}

// ---------------------------------------------------------------------------
// txn: branches, nesting, revisions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn txn_then_and_else_branches() {
    let (_srv, mut c) = setup().await;
    c.put("br", "1", None).await.unwrap();
    c.put("br/x", "x", None).await.unwrap();
    let r0 = current_rev(&mut c).await;

    let mk = |expect: &str| {
        Txn::new()
            .when([Compare::value("br", CompareOp::Equal, expect.to_string())])
            .and_then([
                TxnOp::put("then-key", "t", Some(PutOptions::new().with_prev_key())),
                TxnOp::get("br", None),
                TxnOp::delete("br/x", Some(DeleteOptions::new().with_prev_key())),
            ])
            .or_else([
                TxnOp::put("else-key", "e", None),
                TxnOp::get("br/", Some(GetOptions::new().with_prefix())),
            ])
    };

    // Compare fails -> else branch only.
    let t = c.txn(mk("2")).await.unwrap();
    assert!(!t.succeeded());
    let resps = t.op_responses();
    assert_eq!(resps.len(), 2);
    let put_rev = rev_of(as_put(&resps[0]).header());
    assert_eq!(put_rev, r0 + 1);
    assert_eq!(values(as_get(&resps[1]).kvs()), ["x"]);
    assert_eq!(rev_of(t.header()), r0 + 1);
    assert!(c.get("then-key", None).await.unwrap().kvs().is_empty());
    assert_eq!(values(c.get("else-key", None).await.unwrap().kvs()), ["e"]);

    // Compare holds -> then branch only.
    let t = c.txn(mk("1")).await.unwrap();
    assert!(t.succeeded());
    let resps = t.op_responses();
    assert_eq!(resps.len(), 3);
    assert!(as_put(&resps[0]).prev_key().is_none());
    assert_eq!(values(as_get(&resps[1]).kvs()), ["1"]);
    let d = as_delete(&resps[2]);
    assert_eq!(d.deleted(), 1);
    assert_eq!(values(d.prev_kvs()), ["x"]);
    assert_eq!(rev_of(t.header()), r0 + 2);
    assert_eq!(values(c.get("then-key", None).await.unwrap().kvs()), ["t"]);
    assert!(c.get("br/x", None).await.unwrap().kvs().is_empty());
    // else-key untouched by the second txn.
    let kv = c.get("else-key", None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.version(), 1);
}

#[tokio::test]
async fn txn_ops_share_one_revision() {
    // A txn is one revision: every put in it gets mod_revision = header
    // revision = previous revision + 1.
    let (_srv, mut c) = setup().await;
    c.put("one/c", "old", None).await.unwrap();
    c.put("one/d", "old", None).await.unwrap();
    let r0 = current_rev(&mut c).await;

    let t = c
        .txn(Txn::new().and_then([
            TxnOp::put("one/a", "1", None),
            TxnOp::put("one/b", "2", None),
            TxnOp::delete("one/c", None),
            TxnOp::put("one/d", "new", None),
        ]))
        .await
        .unwrap();
    assert!(t.succeeded(), "a txn without compares succeeds");
    let r1 = rev_of(t.header());
    assert_eq!(r1, r0 + 1);
    let resps = t.op_responses();
    assert_eq!(rev_of(as_put(&resps[0]).header()), r1);
    assert_eq!(rev_of(as_put(&resps[1]).header()), r1);
    assert_eq!(rev_of(as_delete(&resps[2]).header()), r1);
    assert_eq!(rev_of(as_put(&resps[3]).header()), r1);

    let g = c
        .get("one/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["one/a", "one/b", "one/d"]);
    for kv in g.kvs() {
        assert_eq!(kv.mod_revision(), r1, "{:?}", kv.key_str());
    }
    assert_eq!(g.kvs()[2].version(), 2);
    assert_eq!(current_rev(&mut c).await, r1);

    // The state just before the txn is intact at r0.
    let g = c
        .get(
            "one/",
            Some(GetOptions::new().with_prefix().with_revision(r0)),
        )
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["one/c", "one/d"]);
}

#[tokio::test]
async fn txn_revision_only_moves_on_change() {
    // etcdserver/apply.go Txn: header revision = txn.Rev(), +1 only if the
    // txn changed something.
    let (_srv, mut c) = setup().await;
    c.put("ro", "1", None).await.unwrap();
    let r = current_rev(&mut c).await;

    let t = c.txn(Txn::new()).await.unwrap();
    assert!(t.succeeded(), "empty txn succeeds");
    assert!(t.op_responses().is_empty());
    assert_eq!(rev_of(t.header()), r);

    let t = c
        .txn(Txn::new().and_then([TxnOp::get("ro", None), TxnOp::get("zz", None)]))
        .await
        .unwrap();
    assert_eq!(rev_of(t.header()), r);

    // A write txn whose only write deletes nothing changes nothing.
    let t = c
        .txn(Txn::new().and_then([TxnOp::delete("missing", None), TxnOp::get("ro", None)]))
        .await
        .unwrap();
    assert_eq!(as_delete(&t.op_responses()[0]).deleted(), 0);
    assert_eq!(rev_of(t.header()), r);
    assert_eq!(current_rev(&mut c).await, r);

    // A failing compare with an empty else branch changes nothing either.
    let t = c
        .txn(
            Txn::new()
                .when([Compare::value("ro", CompareOp::Equal, "other")])
                .and_then([TxnOp::put("ro", "2", None)]),
        )
        .await
        .unwrap();
    assert!(!t.succeeded());
    assert_eq!(rev_of(t.header()), r);
    assert_eq!(values(c.get("ro", None).await.unwrap().kvs()), ["1"]);
}

#[tokio::test]
async fn txn_read_your_writes() {
    let (_srv, mut c) = setup().await;
    c.put("ryw/gone", "g", None).await.unwrap();
    c.put("ryw/k", "v0", None).await.unwrap();
    let r0 = current_rev(&mut c).await;

    let t = c
        .txn(Txn::new().and_then([
            TxnOp::get("ryw/k", None),
            TxnOp::put("ryw/k", "v1", None),
            TxnOp::get("ryw/k", None),
            TxnOp::delete("ryw/gone", None),
            TxnOp::get("ryw/", Some(GetOptions::new().with_prefix())),
            TxnOp::put("ryw/new", "n", None),
            TxnOp::get(
                "ryw/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ]))
        .await
        .unwrap();
    let r1 = r0 + 1;
    assert_eq!(rev_of(t.header()), r1);
    let resps = t.op_responses();

    let before = &as_get(&resps[0]).kvs()[0];
    assert_eq!(before.value(), b"v0");
    assert_eq!(before.version(), 1);

    let after = &as_get(&resps[2]).kvs()[0];
    assert_eq!(
        after.value(),
        b"v1",
        "a get after a put in the same txn sees the put"
    );
    assert_eq!(after.mod_revision(), r1);
    assert_eq!(after.version(), 2);

    let g = as_get(&resps[4]);
    assert_eq!(keys(g.kvs()), ["ryw/k"], "the delete is visible");

    assert_eq!(as_get(&resps[6]).count(), 2, "ryw/k and ryw/new");
}

#[tokio::test]
async fn txn_nested() {
    // etcdserver/apply.go Txn: compareToPath() evaluates the compares of the
    // txn *and of every nested txn on the chosen path* against the state
    // before the txn runs; the ops then run in order and see earlier writes.
    let (_srv, mut c) = setup().await;
    c.put("n/k", "old", None).await.unwrap();
    let r0 = current_rev(&mut c).await;
    use CompareOp::Equal;

    let t = c
        .txn(
            Txn::new()
                .when([Compare::value("n/k", Equal, "old")])
                .and_then([
                    TxnOp::put("n/k", "new", None),
                    // Sees "old": compares are evaluated up front.
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::value("n/k", Equal, "old")])
                            .and_then([TxnOp::put("n/then", "1", None), TxnOp::get("n/k", None)])
                            .or_else([TxnOp::put("n/else", "1", None)]),
                    ),
                    // Does not see "new" for the same reason.
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::value("n/k", Equal, "new")])
                            .and_then([TxnOp::put("n/then2", "1", None)])
                            .or_else([TxnOp::put("n/else2", "1", None), TxnOp::get("n/k", None)]),
                    ),
                ])
                .or_else([TxnOp::put("n/outer-else", "1", None)]),
        )
        .await
        .unwrap();
    assert!(t.succeeded());
    let r1 = rev_of(t.header());
    assert_eq!(r1, r0 + 1, "nested txns share the outer revision");
    let resps = t.op_responses();
    assert_eq!(resps.len(), 3);
    assert_eq!(rev_of(as_put(&resps[0]).header()), r1);

    let inner1 = as_txn(&resps[1]);
    assert!(inner1.succeeded());
    let ir = inner1.op_responses();
    assert_eq!(ir.len(), 2);
    assert_eq!(
        values(as_get(&ir[1]).kvs()),
        ["new"],
        "ops see earlier writes"
    );

    let inner2 = as_txn(&resps[2]);
    assert!(!inner2.succeeded());
    let ir = inner2.op_responses();
    assert_eq!(ir.len(), 2);
    assert_eq!(values(as_get(&ir[1]).kvs()), ["new"]);

    let g = c
        .get("n/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), ["n/else2", "n/k", "n/then"]);
    for kv in g.kvs() {
        assert_eq!(kv.mod_revision(), r1);
    }
}

// ---------------------------------------------------------------------------
// txn: request validation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn txn_too_many_ops() {
    // api/v3rpc/key.go checkTxnRequest: max(len(compare), len(success),
    // len(failure)) must be <= --max-txn-ops (default 128).
    let (_srv, mut c) = setup().await;
    let puts = |n: usize| -> Vec<TxnOp> {
        (0..n)
            .map(|i| TxnOp::put(format!("many/{i:03}"), "v", None))
            .collect()
    };
    let r0 = current_rev(&mut c).await;

    expect_grpc(
        c.txn(Txn::new().and_then(puts(129))).await,
        "InvalidArgument",
        ERR_TOO_MANY_OPS,
    );
    expect_grpc(
        c.txn(Txn::new().or_else(puts(129))).await,
        "InvalidArgument",
        ERR_TOO_MANY_OPS,
    );
    let cmps: Vec<Compare> = (0..129)
        .map(|i| Compare::version(format!("many/{i:03}"), CompareOp::Equal, 0))
        .collect();
    expect_grpc(
        c.txn(Txn::new().when(cmps)).await,
        "InvalidArgument",
        ERR_TOO_MANY_OPS,
    );
    assert_eq!(
        current_rev(&mut c).await,
        r0,
        "rejected txns change nothing"
    );

    // Exactly at the limit is fine.
    let t = c.txn(Txn::new().and_then(puts(128))).await.unwrap();
    assert_eq!(t.op_responses().len(), 128);
    assert_eq!(rev_of(t.header()), r0 + 1);
    let g = c
        .get(
            "many/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(g.count(), 128);
}

#[tokio::test]
async fn max_txn_ops_flag() {
    let srv = TestServer::start_with_args(&["--max-txn-ops", "4"]).await;
    let mut c = srv.client().await;
    let puts = |n: usize| -> Vec<TxnOp> {
        (0..n)
            .map(|i| TxnOp::put(format!("m/{i}"), "v", None))
            .collect()
    };
    let t = c.txn(Txn::new().and_then(puts(4))).await.unwrap();
    assert!(t.succeeded());
    expect_grpc(
        c.txn(Txn::new().and_then(puts(5))).await,
        "InvalidArgument",
        ERR_TOO_MANY_OPS,
    );
    let cmps: Vec<Compare> = (0..5)
        .map(|i| Compare::version(format!("m/{i}"), CompareOp::Greater, -1))
        .collect();
    expect_grpc(
        c.txn(Txn::new().when(cmps)).await,
        "InvalidArgument",
        ERR_TOO_MANY_OPS,
    );
}

#[tokio::test]
async fn txn_duplicate_keys() {
    // api/v3rpc/key.go checkIntervals: within one branch a key may be
    // written (put, or covered by a delete) only once, nested txns included;
    // the then/else branches of one txn are mutually exclusive, so they may
    // write the same key; deletes may overlap each other.
    let (_srv, mut c) = setup().await;
    c.put("dup", "0", None).await.unwrap();
    let r0 = current_rev(&mut c).await;

    let cases = vec![
        Txn::new().and_then([TxnOp::put("dup", "1", None), TxnOp::put("dup", "2", None)]),
        Txn::new().or_else([TxnOp::put("dup", "1", None), TxnOp::put("dup", "2", None)]),
        Txn::new().and_then([TxnOp::put("dup", "1", None), TxnOp::delete("dup", None)]),
        Txn::new().and_then([TxnOp::delete("dup", None), TxnOp::put("dup", "1", None)]),
        Txn::new().and_then([
            TxnOp::put("dup/x", "1", None),
            TxnOp::delete("dup/", Some(DeleteOptions::new().with_prefix())),
        ]),
        Txn::new().and_then([
            TxnOp::put("dup", "1", None),
            TxnOp::txn(Txn::new().and_then([TxnOp::put("dup", "2", None)])),
        ]),
        Txn::new().and_then([
            TxnOp::txn(Txn::new().and_then([TxnOp::put("dup", "1", None)])),
            TxnOp::txn(Txn::new().or_else([TxnOp::put("dup", "2", None)])),
        ]),
        Txn::new().and_then([
            TxnOp::delete("dup", None),
            TxnOp::txn(Txn::new().and_then([TxnOp::put("dup", "2", None)])),
        ]),
    ];
    for (i, t) in cases.into_iter().enumerate() {
        let res = c.txn(t).await;
        match &res {
            Err(Error::GRpcStatus(_)) => {}
            other => panic!("case {i}: expected duplicate-key error, got {other:?}"),
        }
        expect_grpc(res, "InvalidArgument", ERR_DUPLICATE_KEY);
    }
    assert_eq!(current_rev(&mut c).await, r0);

    // Allowed: same key in then and else of one txn.
    let t = c
        .txn(
            Txn::new()
                .when([Compare::value("dup", CompareOp::Equal, "0")])
                .and_then([TxnOp::put("dup", "then", None)])
                .or_else([TxnOp::put("dup", "else", None)]),
        )
        .await
        .unwrap();
    assert!(t.succeeded());
    // Allowed: same key in then and else of a nested txn.
    c.txn(
        Txn::new().and_then([TxnOp::txn(
            Txn::new()
                .and_then([TxnOp::put("dup", "a", None)])
                .or_else([TxnOp::put("dup", "b", None)]),
        )]),
    )
    .await
    .unwrap();
    // Allowed: overlapping deletes; get + put of one key.
    c.txn(Txn::new().and_then([
        TxnOp::delete("dup", None),
        TxnOp::delete("dup", Some(DeleteOptions::new().with_prefix())),
    ]))
    .await
    .unwrap();
    c.txn(Txn::new().and_then([TxnOp::get("dup2", None), TxnOp::put("dup2", "1", None)]))
        .await
        .unwrap();
}

#[tokio::test]
async fn empty_key_is_rejected() {
    // api/v3rpc/key.go: Range, Put, DeleteRange and every compare/op inside
    // a txn need a non-empty key.
    let (_srv, mut c) = setup().await;
    let bad = |r| expect_grpc(r, "InvalidArgument", ERR_EMPTY_KEY);
    bad(c.put("", "v", None).await.map(|_| ()));
    bad(c.get("", None).await.map(|_| ()));
    bad(c.delete("", None).await.map(|_| ()));
    bad(c
        .txn(Txn::new().and_then([TxnOp::put("", "v", None)]))
        .await
        .map(|_| ()));
    bad(c
        .txn(Txn::new().or_else([TxnOp::get("", None)]))
        .await
        .map(|_| ()));
    bad(c
        .txn(Txn::new().when([Compare::version("", CompareOp::Equal, 0)]))
        .await
        .map(|_| ()));
    assert_eq!(current_rev(&mut c).await, 1);
}

#[tokio::test]
async fn put_with_unknown_lease_is_rejected() {
    let (_srv, mut c) = setup().await;
    let r0 = current_rev(&mut c).await;
    expect_grpc(
        c.put("leased", "v", Some(PutOptions::new().with_lease(0x1234)))
            .await,
        "NotFound",
        ERR_LEASE_NOT_FOUND,
    );
    expect_grpc(
        c.txn(Txn::new().and_then([TxnOp::put(
            "leased",
            "v",
            Some(PutOptions::new().with_lease(77)),
        )]))
        .await,
        "NotFound",
        ERR_LEASE_NOT_FOUND,
    );
    assert!(c.get("leased", None).await.unwrap().kvs().is_empty());
    assert_eq!(current_rev(&mut c).await, r0);
}

#[tokio::test]
async fn put_ignore_value_and_ignore_lease() {
    // api/v3rpc/key.go checkPutRequest + etcdserver/apply.go Put.
    let (_srv, mut c) = setup().await;
    expect_grpc(
        c.put("iv", "", Some(PutOptions::new().with_ignore_value()))
            .await,
        "InvalidArgument",
        ERR_KEY_NOT_FOUND,
    );
    expect_grpc(
        c.put("iv", "", Some(PutOptions::new().with_ignore_lease()))
            .await,
        "InvalidArgument",
        ERR_KEY_NOT_FOUND,
    );
    expect_grpc(
        c.put("iv", "x", Some(PutOptions::new().with_ignore_value()))
            .await,
        "InvalidArgument",
        ERR_VALUE_PROVIDED,
    );
    expect_grpc(
        c.put(
            "iv",
            "x",
            Some(PutOptions::new().with_ignore_lease().with_lease(5)),
        )
        .await,
        "InvalidArgument",
        ERR_LEASE_PROVIDED,
    );

    let r1 = rev_of(c.put("iv", "keep-me", None).await.unwrap().header());
    let r2 = rev_of(
        c.put("iv", "", Some(PutOptions::new().with_ignore_value()))
            .await
            .unwrap()
            .header(),
    );
    assert_eq!(r2, r1 + 1);
    let kv = c.get("iv", None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.value(), b"keep-me");
    assert_eq!(kv.version(), 2);
    assert_eq!(kv.mod_revision(), r2);
}

#[tokio::test]
async fn request_too_large() {
    // etcdserver/v3_server.go processInternalRaftRequestOnce rejects a
    // marshalled request over --max-request-bytes (default 1.5 MiB) with
    // ErrGRPCRequestTooLarge; the gRPC receive limit is that plus 512 KiB.
    let (_srv, mut c) = setup().await;
    let r0 = current_rev(&mut c).await;
    let big = vec![b'x'; 1024 * 1024 * 16 / 10]; // 1.6 MiB
    expect_grpc(
        c.put("big", big.clone(), None).await,
        "InvalidArgument",
        ERR_TOO_LARGE,
    );
    expect_grpc(
        c.txn(Txn::new().and_then([TxnOp::put("big", big, None)]))
            .await,
        "InvalidArgument",
        ERR_TOO_LARGE,
    );
    assert_eq!(current_rev(&mut c).await, r0);

    // Just under the limit is fine, and comes back intact.
    let ok = vec![b'y'; 1024 * 1024];
    c.put("big", ok.clone(), None).await.unwrap();
    let g = c.get("big", None).await.unwrap();
    assert_eq!(g.kvs()[0].value().len(), ok.len());
    assert!(g.kvs()[0].value() == ok.as_slice());
}

#[tokio::test]
async fn request_over_grpc_limit_is_resource_exhausted() {
    // etcd's gRPC server limit is --max-request-bytes + 512 KiB
    // (embed/serve.go grpcOverheadBytes); grpc-go answers ResourceExhausted.
    let (_srv, mut c) = setup().await;
    let huge = vec![b'z'; 2 * 1024 * 1024 + 512 * 1024];
    expect_grpc_code(c.put("huge", huge, None).await, "ResourceExhausted");
    // The server is still fine afterwards.
    c.put("after", "ok", None).await.unwrap();
}

#[tokio::test]
async fn max_request_bytes_flag() {
    let srv = TestServer::start_with_args(&["--max-request-bytes", "4096"]).await;
    let mut c = srv.client().await;
    c.put("small", vec![b'a'; 1000], None).await.unwrap();
    expect_grpc(
        c.put("small", vec![b'a'; 6000], None).await,
        "InvalidArgument",
        ERR_TOO_LARGE,
    );
}

// ---------------------------------------------------------------------------
// compaction and revision bounds
// ---------------------------------------------------------------------------

#[tokio::test]
async fn compaction_and_revision_bounds() {
    // mvcc/kvstore_txn.go rangeKeys: rev > current -> ErrFutureRev,
    // rev < compacted -> ErrCompacted (the compaction revision itself is
    // still readable). mvcc/kvstore.go updateCompactRev: rev <= compacted
    // -> ErrCompacted, rev > current -> ErrFutureRev.
    let (_srv, mut c) = setup().await;
    let r1 = rev_of(c.put("ck", "v1", None).await.unwrap().header());
    let r2 = rev_of(c.put("ck", "v2", None).await.unwrap().header());
    let r3 = rev_of(c.put("ck", "v3", None).await.unwrap().header());
    c.put("gone", "x", None).await.unwrap();
    let r5 = rev_of(c.delete("gone", None).await.unwrap().header());

    // Future revisions.
    let at = |r: i64| Some(GetOptions::new().with_revision(r));
    expect_grpc(c.get("ck", at(r5 + 1)).await, "OutOfRange", ERR_FUTURE_REV);
    expect_grpc(
        c.get("ck", at(r5 + 1000)).await,
        "OutOfRange",
        ERR_FUTURE_REV,
    );
    expect_grpc(
        c.txn(Txn::new().and_then([TxnOp::get("ck", at(r5 + 1))]))
            .await,
        "OutOfRange",
        ERR_FUTURE_REV,
    );
    expect_grpc(c.compact(r5 + 1, None).await, "OutOfRange", ERR_FUTURE_REV);
    // The current revision is not in the future.
    assert_eq!(values(c.get("ck", at(r5)).await.unwrap().kvs()), ["v3"]);

    let cr = c.compact(r2, None).await.unwrap();
    assert_eq!(
        rev_of(cr.header()),
        r5,
        "compact header carries the current revision"
    );
    assert_eq!(
        current_rev(&mut c).await,
        r5,
        "compaction is not a revision"
    );

    expect_grpc(c.get("ck", at(r1)).await, "OutOfRange", ERR_COMPACTED);
    expect_grpc(
        c.get("c", Some(GetOptions::new().with_prefix().with_revision(r1)))
            .await,
        "OutOfRange",
        ERR_COMPACTED,
    );
    expect_grpc(
        c.txn(Txn::new().and_then([TxnOp::get("ck", at(r1))])).await,
        "OutOfRange",
        ERR_COMPACTED,
    );
    let g = c.get("ck", at(r2)).await.unwrap();
    assert_eq!(
        values(g.kvs()),
        ["v2"],
        "the compaction revision stays readable"
    );
    assert_eq!(values(c.get("ck", at(r3)).await.unwrap().kvs()), ["v3"]);
    let kv = c.get("ck", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.version()),
        (r1, 3),
        "compaction keeps create_revision and version of live keys"
    );

    // Compacting at or below the compacted revision.
    expect_grpc(c.compact(r2, None).await, "OutOfRange", ERR_COMPACTED);
    expect_grpc(c.compact(r1, None).await, "OutOfRange", ERR_COMPACTED);

    // Physical compaction up to the current revision.
    c.compact(r5, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    expect_grpc(c.get("ck", at(r3)).await, "OutOfRange", ERR_COMPACTED);
    let g = c.get("ck", at(r5)).await.unwrap();
    assert_eq!(values(g.kvs()), ["v3"]);
    assert!(c.get("gone", None).await.unwrap().kvs().is_empty());

    // Writes go on from where they were.
    let r6 = rev_of(c.put("ck", "v4", None).await.unwrap().header());
    assert_eq!(r6, r5 + 1);
    let kv = c.get("ck", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.create_revision(), kv.version()), (r1, 4));
    // A re-put of a key deleted before the compaction starts fresh.
    let r7 = rev_of(c.put("gone", "y", None).await.unwrap().header());
    let kv = c.get("gone", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.create_revision(), kv.version()), (r7, 1));
}

// ---------------------------------------------------------------------------
// cluster / maintenance / headers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn status_reports_self_as_leader() {
    let (srv, mut c) = setup().await;
    c.put("st", "1", None).await.unwrap();
    let st = c.status().await.unwrap();
    let h = st.header().expect("status header");
    assert_ne!(h.member_id(), 0);
    assert_ne!(h.cluster_id(), 0);
    assert_eq!(
        st.leader(),
        h.member_id(),
        "single member is its own leader"
    );
    assert!(st.raft_index() > 0, "raft index after a write");
    assert!(st.raft_term() >= 1);
    assert!(st.raft_applied_index() > 0);
    assert!(st.raft_applied_index() <= st.raft_index());
    assert!(!st.version().is_empty(), "status must report a version");
    assert!(!st.is_learner());
    assert!(st.errors().is_empty());

    // The raft index moves with writes, and is never behind the applied index, also right
    // after an acknowledged write (the apply thread answers while the raft thread may not
    // have published the Ready's commit index yet).
    let mut before = st.raft_index();
    for i in 0..300 {
        c.put("st", format!("{i}"), None).await.unwrap();
        let st2 = c.status().await.unwrap();
        assert!(
            st2.raft_index() > before,
            "write {i}: raft index did not move"
        );
        assert!(
            st2.raft_index() >= st2.raft_applied_index(),
            "write {i}: raft index {} behind applied {}",
            st2.raft_index(),
            st2.raft_applied_index()
        );
        before = st2.raft_index();
    }
    drop(srv);
}

#[tokio::test]
async fn member_list_shows_this_member() {
    let (srv, mut c) = setup().await;
    let ml = c.member_list().await.unwrap();
    let h = ml.header().expect("member list header");
    assert_eq!(ml.members().len(), 1);
    let m = &ml.members()[0];
    assert_eq!(m.name(), MEMBER_NAME);
    assert_eq!(m.client_urls(), [srv.endpoint()]);
    assert_eq!(m.peer_urls(), [srv.peer_url()]);
    assert!(!m.is_learner());
    assert_ne!(m.id(), 0);
    assert_eq!(m.id(), h.member_id());
    assert_ne!(h.cluster_id(), 0);

    let st = c.status().await.unwrap();
    assert_eq!(st.leader(), m.id());
}

#[tokio::test]
async fn response_headers_are_consistent() {
    // api/v3rpc/header.go fill(): every response carries cluster_id,
    // member_id and raft_term; KV responses also the store revision.
    let (_srv, mut c) = setup().await;
    let mut headers: Vec<(String, ResponseHeader)> = Vec::new();

    let p = c.put("hd", "1", None).await.unwrap();
    headers.push(("put".into(), p.header().unwrap().clone()));
    let g = c.get("hd", None).await.unwrap();
    headers.push(("get".into(), g.header().unwrap().clone()));
    let t = c
        .txn(Txn::new().and_then([TxnOp::put("hd", "2", None)]))
        .await
        .unwrap();
    headers.push(("txn".into(), t.header().unwrap().clone()));
    let d = c.delete("hd", None).await.unwrap();
    headers.push(("delete".into(), d.header().unwrap().clone()));
    let cp = c.compact(rev_of(d.header()), None).await.unwrap();
    headers.push(("compact".into(), cp.header().unwrap().clone()));
    let st = c.status().await.unwrap();
    headers.push(("status".into(), st.header().unwrap().clone()));
    let ml = c.member_list().await.unwrap();
    headers.push(("member_list".into(), ml.header().unwrap().clone()));

    let (cid, mid) = (headers[0].1.cluster_id(), headers[0].1.member_id());
    assert_ne!(cid, 0, "cluster_id");
    assert_ne!(mid, 0, "member_id");
    for (what, h) in &headers {
        assert_eq!(h.cluster_id(), cid, "{what}: cluster_id");
        assert_eq!(h.member_id(), mid, "{what}: member_id");
    }
    for (what, h) in &headers[..5] {
        assert!(h.raft_term() >= 1, "{what}: raft_term");
    }
    let rp = rev_of(p.header());
    assert_eq!(rev_of(g.header()), rp);
    assert_eq!(rev_of(t.header()), rp + 1);
    assert_eq!(rev_of(d.header()), rp + 2);
    assert_eq!(rev_of(cp.header()), rp + 2);
    // Status carries the current store revision too (etcdserver newHeader).
    assert_eq!(rev_of(st.header()), rp + 2);
}

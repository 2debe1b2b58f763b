//! Black-box Lease tests: hold `metastore` to etcd's v3 Lease semantics,
//! talking to the real binary through the `etcd-client` crate.
//!
//! Every test starts its own single-member server (fresh data dir). Every
//! wait is bounded, so a hung server fails the test instead of hanging it.
//! The etcd source each expectation comes from is named next to it (paths in
//! the etcd-io/etcd repository: server/lease/lessor.go, server/lease/lease.go,
//! server/etcdserver/api/v3rpc/lease.go, server/etcdserver/v3_server.go,
//! api/v3rpc/rpctypes/error.go). Every test was run against real etcd
//! (3.4.23 and 3.5.1) through `METASTORE_TEST_BIN`; the exception is the
//! checkpoint half of `lease_ttl_survives_restart`, see there.
//!
//! Timing notes. etcd's lease clock: `TimeToLive.TTL` is the remaining time
//! truncated to whole seconds (v3_server.go `int64(Remaining().Seconds())`),
//! the expiry loop runs every 500 ms (lessor.go runLoop), and the minimum TTL
//! is ceil(1.5 x election timeout) = 2 s with the default 1 s election
//! timeout. Assertions allow for a second of rounding either way.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use etcd_client::{
    Client, Error, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
};
use tokio::time::{sleep, timeout};

const ERR_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const ERR_LEASE_EXISTS: &str = "etcdserver: lease already exists";
const ERR_TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";
/// lease/lessor.go MaxLeaseTTL.
const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// The minimum TTL with the default election timeout (see the module doc).
const MIN_TTL: i64 = 2;

/// Upper bound for any single request or expected stream message.
const STEP: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

async fn setup() -> (TestServer, Client) {
    let srv = TestServer::start().await;
    let client = srv.client().await;
    (srv, client)
}

fn rev_of(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.expect("response has no header").revision()
}

async fn current_rev(c: &mut Client) -> i64 {
    rev_of(c.get("__never_written__", None).await.unwrap().header())
}

/// Assert `res` failed with a gRPC status of the given code (tonic `Code`
/// variant name) and exactly the given message.
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

async fn grant(c: &mut Client, ttl: i64) -> i64 {
    let r = c.lease_grant(ttl, None).await.unwrap();
    assert!(r.id() > 0, "server-assigned lease ids are positive: {r:?}");
    r.id()
}

async fn put_leased(c: &mut Client, k: &str, v: &str, lease: i64) -> i64 {
    rev_of(
        c.put(k, v, Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap()
            .header(),
    )
}

async fn exists(c: &mut Client, k: &str) -> bool {
    !c.get(k, None).await.unwrap().kvs().is_empty()
}

/// (ttl, granted_ttl, sorted keys) of a lease, via TimeToLive with keys.
async fn ttl_of(c: &mut Client, id: i64) -> (i64, i64, Vec<String>) {
    let r = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(r.id(), id);
    let mut keys: Vec<String> = r
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    (r.ttl(), r.granted_ttl(), keys)
}

async fn listed(c: &mut Client) -> HashSet<i64> {
    c.leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect()
}

/// Poll `cond` every 100 ms until it holds or `limit` passes; returns the
/// time it took, or None on timeout.
async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(start.elapsed());
        }
        sleep(Duration::from_millis(100)).await;
    }
    None
}

// ---------------------------------------------------------------------------
// grant
// ---------------------------------------------------------------------------

#[tokio::test]
async fn grant_server_and_client_ids() {
    let (_srv, mut c) = setup().await;
    let r = c.lease_grant(30, None).await.unwrap();
    assert!(r.id() > 0);
    assert_eq!(r.ttl(), 30);
    assert_eq!(r.error(), "");
    let r2 = c.lease_grant(30, None).await.unwrap();
    assert_ne!(r2.id(), r.id(), "server-assigned ids are unique");

    // A client-chosen id is used as is.
    let r = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x1234_5678)))
        .await
        .unwrap();
    assert_eq!(r.id(), 0x1234_5678);
    assert_eq!(r.ttl(), 30);
    let (ttl, granted, keys) = ttl_of(&mut c, 0x1234_5678).await;
    assert_eq!(granted, 30);
    assert!((28..=30).contains(&ttl), "ttl {ttl}");
    assert!(keys.is_empty());

    // The same id again: lessor.go ErrLeaseExists -> FailedPrecondition.
    expect_grpc(
        c.lease_grant(10, Some(LeaseGrantOptions::new().with_id(0x1234_5678)))
            .await,
        "FailedPrecondition",
        ERR_LEASE_EXISTS,
    );
    // Granting does not touch the KV revision.
    assert_eq!(current_rev(&mut c).await, 1);
}

#[tokio::test]
async fn grant_ttl_bounds() {
    let (_srv, mut c) = setup().await;
    // lessor.go Grant: a TTL under the minimum is raised to it, and the
    // response reports the raised TTL.
    for asked in [1, 0] {
        let r = c.lease_grant(asked, None).await.unwrap();
        assert_eq!(r.ttl(), MIN_TTL, "grant({asked})");
        let (_, granted, _) = ttl_of(&mut c, r.id()).await;
        assert_eq!(granted, MIN_TTL);
    }
    // lessor.go MaxLeaseTTL: larger is ErrLeaseTTLTooLarge -> OutOfRange.
    expect_grpc(
        c.lease_grant(MAX_LEASE_TTL + 1, None).await,
        "OutOfRange",
        ERR_TTL_TOO_LARGE,
    );
    // The maximum itself is accepted.
    let r = c.lease_grant(MAX_LEASE_TTL, None).await.unwrap();
    assert_eq!(r.ttl(), MAX_LEASE_TTL);
    let (ttl, granted, _) = ttl_of(&mut c, r.id()).await;
    assert_eq!(granted, MAX_LEASE_TTL);
    assert!(ttl > MAX_LEASE_TTL - 10, "ttl {ttl}");
}

// ---------------------------------------------------------------------------
// attaching keys
// ---------------------------------------------------------------------------

#[tokio::test]
async fn put_with_lease_ignore_lease_and_detach() {
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 60).await;
    put_leased(&mut c, "a", "1", l).await;
    put_leased(&mut c, "b", "1", l).await;
    let kv = c.get("a", None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.lease(), l);
    assert_eq!(ttl_of(&mut c, l).await.2, vec!["a", "b"]);

    // ignore_lease keeps the key's current lease.
    c.put("a", "2", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap();
    let kv = c.get("a", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.lease(), kv.value()), (l, &b"2"[..]));
    assert_eq!(ttl_of(&mut c, l).await.2, vec!["a", "b"]);

    // A plain put detaches the key (lease 0), a delete detaches it too.
    c.put("a", "3", None).await.unwrap();
    assert_eq!(c.get("a", None).await.unwrap().kvs()[0].lease(), 0);
    c.delete("b", None).await.unwrap();
    assert!(ttl_of(&mut c, l).await.2.is_empty());

    // Moving a key from one lease to another.
    let l2 = grant(&mut c, 60).await;
    put_leased(&mut c, "m", "1", l).await;
    put_leased(&mut c, "m", "2", l2).await;
    assert!(ttl_of(&mut c, l).await.2.is_empty());
    assert_eq!(ttl_of(&mut c, l2).await.2, vec!["m"]);

    // Revoking the first lease leaves the detached keys alone.
    c.lease_revoke(l).await.unwrap();
    assert!(exists(&mut c, "a").await);
    assert!(exists(&mut c, "m").await);
}

#[tokio::test]
async fn put_with_unknown_lease_is_not_found() {
    let (_srv, mut c) = setup().await;
    let r0 = current_rev(&mut c).await;
    expect_grpc(
        c.put("k", "v", Some(PutOptions::new().with_lease(0x7777)))
            .await,
        "NotFound",
        ERR_LEASE_NOT_FOUND,
    );
    // A revoked lease is unknown too.
    let l = grant(&mut c, 60).await;
    c.lease_revoke(l).await.unwrap();
    expect_grpc(
        c.put("k", "v", Some(PutOptions::new().with_lease(l))).await,
        "NotFound",
        ERR_LEASE_NOT_FOUND,
    );
    // Nothing was written.
    assert!(!exists(&mut c, "k").await);
    assert_eq!(current_rev(&mut c).await, r0);
}

// ---------------------------------------------------------------------------
// revoke
// ---------------------------------------------------------------------------

#[tokio::test]
async fn revoke_deletes_attached_keys_at_one_revision() {
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 60).await;
    for k in ["r/1", "r/2", "r/3"] {
        put_leased(&mut c, k, "v", l).await;
    }
    c.put("r/free", "v", None).await.unwrap();
    let before = current_rev(&mut c).await;

    let resp = c.lease_revoke(l).await.unwrap();
    // lessor.go Revoke: all keys go in one backend txn -> one revision.
    assert_eq!(rev_of(resp.header()), before + 1);
    assert_eq!(current_rev(&mut c).await, before + 1);
    let g = c
        .get("r/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let left: Vec<&[u8]> = g.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(left, vec![&b"r/free"[..]]);

    // The lease is gone: TimeToLive says -1 (api/v3rpc/lease.go turns
    // ErrLeaseNotFound into TTL -1, not an error), Leases() omits it,
    // revoking again is NotFound.
    let r = c.lease_time_to_live(l, None).await.unwrap();
    assert_eq!(r.ttl(), -1);
    assert!(!listed(&mut c).await.contains(&l));
    expect_grpc(c.lease_revoke(l).await, "NotFound", ERR_LEASE_NOT_FOUND);
    expect_grpc(
        c.lease_revoke(0x4242).await,
        "NotFound",
        ERR_LEASE_NOT_FOUND,
    );
}

#[tokio::test]
async fn revoking_a_lease_without_keys_keeps_the_revision() {
    // lessor.go Revoke runs a delete txn with no deletes; a write txn that
    // changed nothing does not bump the revision (mvcc kvstore_txn.go End).
    let (_srv, mut c) = setup().await;
    c.put("x", "1", None).await.unwrap();
    let l = grant(&mut c, 60).await;
    let before = current_rev(&mut c).await;
    let resp = c.lease_revoke(l).await.unwrap();
    assert_eq!(rev_of(resp.header()), before);
    assert_eq!(current_rev(&mut c).await, before);
}

// ---------------------------------------------------------------------------
// keep-alive, time-to-live, list
// ---------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_renews_to_the_granted_ttl() {
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 10).await;
    sleep(Duration::from_millis(2200)).await;
    let (ttl, granted, _) = ttl_of(&mut c, l).await;
    assert_eq!(granted, 10);
    assert!(
        (6..=8).contains(&ttl),
        "after 2.2 s of a 10 s lease: ttl {ttl}"
    );

    let (mut keeper, mut stream) = timeout(STEP, c.lease_keep_alive(l)).await.unwrap().unwrap();
    assert_eq!(keeper.id(), l);
    let (ttl, _, _) = ttl_of(&mut c, l).await;
    assert!(ttl >= 9, "keep-alive must reset the TTL: ttl {ttl}");

    // More keep-alives on the same stream: one response each, TTL = granted.
    for _ in 0..3 {
        sleep(Duration::from_millis(300)).await;
        keeper.keep_alive().await.unwrap();
        let r = timeout(STEP, stream.message())
            .await
            .expect("no keep-alive response")
            .unwrap()
            .expect("keep-alive stream ended");
        assert_eq!(r.id(), l);
        assert_eq!(r.ttl(), 10);
        assert!(r.header().is_some());
    }

    // Once the lease is revoked, a keep-alive on the open stream answers
    // TTL 0 (api/v3rpc/lease.go leaseKeepAlive: ErrLeaseNotFound -> ttl 0).
    c.lease_revoke(l).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let r = timeout(STEP, stream.message())
        .await
        .expect("no keep-alive response")
        .unwrap()
        .expect("keep-alive stream ended");
    assert_eq!(r.id(), l);
    assert_eq!(r.ttl(), 0);
}

#[tokio::test]
async fn keep_alive_of_an_unknown_lease_answers_ttl_zero() {
    // The server answers TTL 0 on the stream; etcd-client turns a first
    // response with TTL <= 0 into LeaseKeepAliveError (a gRPC error from the
    // server would surface as GRpcStatus instead).
    let (_srv, mut c) = setup().await;
    match timeout(STEP, c.lease_keep_alive(0x5151)).await.unwrap() {
        Err(Error::LeaseKeepAliveError(_)) => {}
        other => panic!("expected LeaseKeepAliveError, got {other:?}"),
    }
}

#[tokio::test]
async fn time_to_live_with_keys_and_unknown_lease() {
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 20).await;
    for k in ["t/c", "t/a", "t/b"] {
        put_leased(&mut c, k, "v", l).await;
    }
    let (ttl, granted, keys) = ttl_of(&mut c, l).await;
    assert_eq!(granted, 20);
    assert!((18..=20).contains(&ttl), "ttl {ttl}");
    assert_eq!(keys, vec!["t/a", "t/b", "t/c"]);

    // Without keys=true no keys are returned.
    let r = c.lease_time_to_live(l, None).await.unwrap();
    assert!(r.keys().is_empty());
    assert_eq!(r.granted_ttl(), 20);

    // Unknown lease: TTL -1, no error.
    let r = c
        .lease_time_to_live(0x6161, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(r.id(), 0x6161);
    assert_eq!(r.ttl(), -1);
    assert!(r.keys().is_empty());
}

#[tokio::test]
async fn leases_lists_every_live_lease() {
    let (_srv, mut c) = setup().await;
    assert!(listed(&mut c).await.is_empty());
    let a = grant(&mut c, 60).await;
    let b = grant(&mut c, 60).await;
    let l3 = c
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(777)))
        .await
        .unwrap()
        .id();
    assert_eq!(listed(&mut c).await, HashSet::from([a, b, l3]));
    c.lease_revoke(b).await.unwrap();
    assert_eq!(listed(&mut c).await, HashSet::from([a, l3]));
}

// ---------------------------------------------------------------------------
// expiry
// ---------------------------------------------------------------------------

#[tokio::test]
async fn expiry_deletes_keys_and_the_lease() {
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 2).await;
    let granted_at = Instant::now();
    put_leased(&mut c, "e/1", "v", l).await;
    put_leased(&mut c, "e/2", "v", l).await;
    c.put("e/keep", "v", None).await.unwrap();
    let before = current_rev(&mut c).await;

    // Not before its TTL.
    sleep(Duration::from_millis(1000)).await;
    assert!(exists(&mut c, "e/1").await, "expired too early");
    assert!(listed(&mut c).await.contains(&l));

    wait_until(Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { !exists(&mut c, "e/1").await }
    })
    .await
    .expect("keys of a 2 s lease still there after 10 s");
    let since_grant = granted_at.elapsed();
    assert!(
        since_grant >= Duration::from_millis(1900),
        "expired after {since_grant:?}, before its TTL"
    );
    assert!(!exists(&mut c, "e/2").await);
    assert!(exists(&mut c, "e/keep").await);
    // Both keys went in one revoke: one revision.
    assert_eq!(current_rev(&mut c).await, before + 1);
    assert_eq!(c.lease_time_to_live(l, None).await.unwrap().ttl(), -1);
    assert!(!listed(&mut c).await.contains(&l));
}

#[tokio::test]
async fn a_thousand_leases_expire_while_writes_go_on() {
    // lessor.go revokes at most leaseRevokeRate (1000) leases per second;
    // expiry of many leases at once must neither lose any nor block writes.
    const N: usize = 1000;
    const TTL: i64 = 4;
    let (_srv, c) = setup().await;

    // Grant concurrently and attach one key to each lease right away (a
    // slow server must not let a lease expire before its key is put).
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(N)));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let mut c = c.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < N {
                let id = c.lease_grant(TTL, None).await.unwrap().id();
                c.put(
                    format!("many/{i:04}"),
                    "v",
                    Some(PutOptions::new().with_lease(id)),
                )
                .await
                .unwrap();
                ids.lock().unwrap().push(id);
                i += 16;
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
    }
    let ids: Vec<i64> = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), N);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N, "ids unique");
    let mut c = c;

    // Meanwhile a writer keeps putting; every put must succeed promptly.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut c = c.clone();
        let stop = stop.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = timeout(
                    Duration::from_secs(5),
                    c.put(format!("busy/{i}"), "x", None),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {}
                    other => panic!("put during mass expiry failed: {other:?}"),
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };

    let took = wait_until(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            c.get(
                "many/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap()
            .count()
                == 0
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    timeout(STEP, writer).await.unwrap().unwrap();
    assert!(
        took.is_some(),
        "leased keys still present 30 s after expiry began"
    );
    assert!(done.load(Ordering::Relaxed) > 10, "writer made no progress");

    // Every lease is gone.
    let live = listed(&mut c).await;
    assert!(
        ids.iter().all(|id| !live.contains(id)),
        "{} expired leases still listed",
        ids.iter().filter(|id| live.contains(id)).count()
    );
    for id in ids.iter().step_by(97) {
        assert_eq!(c.lease_time_to_live(*id, None).await.unwrap().ttl(), -1);
    }
}

// ---------------------------------------------------------------------------
// restart
// ---------------------------------------------------------------------------

#[tokio::test]
async fn remaining_ttl_is_checkpointed_across_restart() {
    // The leader checkpoints remaining TTLs through raft (lessor.go
    // checkpointScheduledLeases: remaining = ceil(seconds left)); a restarted
    // server resumes from the checkpoint (lessor.go initAndRecover, then
    // Promote: expiry = now + extend + remainingTTL) instead of handing out
    // the full TTL again. metastore: --lease-checkpoint-interval-ms.
    //
    // NOT verifiable on real etcd 3.4/3.5: they have no flag for the
    // checkpoint interval (fixed at 5 min, lessor.go
    // defaultLeaseCheckpointInterval), so a 30 s lease is never checkpointed
    // and etcd reports the full TTL (+ 1 s election-timeout extension) after
    // a restart; run against etcd this test fails on the `<= 27` assertion
    // with "30 s left". With 500 ms checkpoints and a 5 s wait the last
    // checkpoint holds <= 26 s, so <= 27 s is reported even with a 1 s
    // extension.
    let mut srv = TestServer::start_with_args(&["--lease-checkpoint-interval-ms", "500"]).await;
    let mut c = srv.client().await;
    let long = grant(&mut c, 30).await;
    put_leased(&mut c, "ckpt/long", "v", long).await;
    sleep(Duration::from_secs(5)).await;
    let (before, _, _) = ttl_of(&mut c, long).await;
    assert!((23..=25).contains(&before), "ttl before restart {before}");
    drop(c);
    srv.restart().await;
    let mut c = srv.client().await;
    let (after, granted, keys) = ttl_of(&mut c, long).await;
    assert_eq!(granted, 30);
    assert_eq!(keys, vec!["ckpt/long"], "attached keys survive the restart");
    assert!(after > 0, "lease lost in the restart (ttl {after})");
    assert!(
        after <= 27,
        "lease TTL was reset by the restart: {after} s left of 30 s after 5 s"
    );
    assert!(after >= 15, "lease TTL shrank too much: {after}");
    assert!(exists(&mut c, "ckpt/long").await);
}

#[tokio::test]
async fn short_lease_expires_after_restart() {
    // A 4 s lease, restart after 1 s: the key lives through the restart and
    // is deleted a few seconds later (etcd: leases are recovered from the
    // backend and Promote gives them remaining TTL + 1 s election-timeout
    // extension; verified on etcd). With metastore's checkpoints the
    // remaining TTL is ~3 s instead of the full 4 s.
    let mut srv = TestServer::start_with_args(&["--lease-checkpoint-interval-ms", "500"]).await;
    let mut c = srv.client().await;
    let short = grant(&mut c, 4).await;
    put_leased(&mut c, "ckpt/short", "v", short).await;
    sleep(Duration::from_secs(1)).await;
    drop(c);
    srv.restart().await;
    let ready = Instant::now();
    let mut c = srv.client().await;
    assert!(
        exists(&mut c, "ckpt/short").await,
        "the key of a live lease vanished in the restart"
    );
    assert_eq!(ttl_of(&mut c, short).await.2, vec!["ckpt/short"]);
    let took = wait_until(Duration::from_secs(12), || {
        let mut c = c.clone();
        async move { !exists(&mut c, "ckpt/short").await }
    })
    .await
    .expect("a 4 s lease outlived the restart by 12 s: forgotten by the restart?");
    eprintln!("key of the 4 s lease deleted {took:?} after the restart");
    assert!(
        ready.elapsed() <= Duration::from_secs(8),
        "deleted only {took:?} after the restart"
    );
    assert_eq!(c.lease_time_to_live(short, None).await.unwrap().ttl(), -1);
    assert!(!listed(&mut c).await.contains(&short));
}

//! Black-box Lock and Election tests: hold `metastore` to etcd's v3lock and
//! v3election services, talking to the real binary through `etcd-client`.
//!
//! etcd implements both services on top of its own KV/Lease/Watch API with
//! client/v3/concurrency (server/etcdserver/api/v3lock/lock.go,
//! server/etcdserver/api/v3election/election.go,
//! client/v3/concurrency/{mutex,election,key,session}.go). What follows
//! from that and is asserted here:
//! * a lock or candidate key is `<name>/<lease id in lower-case hex>`,
//!   attached to the lease; ownership goes by lowest create revision;
//! * a waiter is woken by the deletion of every earlier key (unlock, lease
//!   revoke or lease expiry);
//! * Unlock is a plain delete of the given key (no error if it is gone);
//! * Proclaim/Resign check the leader key's create revision; Proclaim with
//!   a stale key fails with "election: not leader", Resign with a stale key
//!   succeeds and does nothing;
//! * Leader with no candidate fails with "election: no leader";
//! * those two errors are plain Go errors, so gRPC reports code Unknown.
//!
//! Every test starts its own server, and every wait is bounded. Every test
//! was run against real etcd (3.4.23 and 3.5.1) through `METASTORE_TEST_BIN`.
#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Debug;
use std::time::Duration;

use common::TestServer;
use etcd_client::{
    Client, Error, LeaderKey, LockOptions, ProclaimOptions, PutOptions, ResignOptions,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

const ERR_NOT_LEADER: &str = "election: not leader";
const ERR_NO_LEADER: &str = "election: no leader";
const ERR_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

/// Upper bound for any request expected to complete.
const STEP: Duration = Duration::from_secs(15);
/// How long a blocked Lock/Campaign must stay blocked to count as waiting.
const BLOCKED: Duration = Duration::from_millis(700);

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
    c.lease_grant(ttl, None).await.unwrap().id()
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Await a spawned task with the standard bound.
async fn join<T>(what: &str, h: JoinHandle<T>) -> T {
    match timeout(STEP, h).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: task failed: {e}"),
        Err(_) => panic!("{what}: not done within {STEP:?}"),
    }
}

/// Assert a spawned blocking call is still blocked after `BLOCKED`.
async fn assert_blocked<T>(what: &str, h: &JoinHandle<T>) {
    sleep(BLOCKED).await;
    assert!(
        !h.is_finished(),
        "{what} returned while it should still wait"
    );
}

/// Spawn `lock(name, lease)` on its own client.
fn spawn_lock(c: &Client, name: &'static str, lease: i64) -> JoinHandle<(Vec<u8>, i64)> {
    let mut c = c.clone();
    tokio::spawn(async move {
        let r = c
            .lock(name, Some(LockOptions::new().with_lease(lease)))
            .await
            .unwrap();
        (r.key().to_vec(), rev_of(r.header()))
    })
}

// ---------------------------------------------------------------------------
// lock
// ---------------------------------------------------------------------------

#[tokio::test]
async fn lock_is_mutually_exclusive_and_unlock_hands_over() {
    let (_srv, mut c) = setup().await;
    let l1 = grant(&mut c, 60).await;
    let l2 = grant(&mut c, 60).await;

    let r1 = timeout(STEP, c.lock("mtx", Some(LockOptions::new().with_lease(l1))))
        .await
        .unwrap()
        .unwrap();
    let key1 = r1.key().to_vec();
    assert_eq!(s(&key1), format!("mtx/{l1:x}"));
    // The key exists, attached to the lease, and is the oldest under mtx/.
    let kv = c.get(key1.clone(), None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.lease(), l1);
    assert!(rev_of(r1.header()) >= kv.create_revision());

    // A second locker waits...
    let second = spawn_lock(&c, "mtx", l2);
    assert_blocked("second lock", &second).await;
    // ...while its key is already queued behind the first.
    let kv2 = c.get(format!("mtx/{l2:x}"), None).await.unwrap().kvs()[0].clone();
    assert!(kv2.create_revision() > kv.create_revision());

    // Unlock hands the lock over; the second lock completed after the
    // unlock's deletion (its header revision is not older).
    let un = c.unlock(key1.clone()).await.unwrap();
    let un_rev = rev_of(un.header());
    assert!(c.get(key1.clone(), None).await.unwrap().kvs().is_empty());
    let (key2, rev2) = join("second lock", second).await;
    assert_eq!(s(&key2), format!("mtx/{l2:x}"));
    assert!(
        rev2 >= un_rev,
        "second lock acquired at {rev2}, before unlock at {un_rev}"
    );

    // A third locker now waits for the second.
    let l3 = grant(&mut c, 60).await;
    let third = spawn_lock(&c, "mtx", l3);
    assert_blocked("third lock", &third).await;
    c.unlock(key2).await.unwrap();
    let (key3, _) = join("third lock", third).await;
    assert_eq!(s(&key3), format!("mtx/{l3:x}"));

    // Different lock names do not interfere.
    let other = timeout(
        STEP,
        c.lock("other", Some(LockOptions::new().with_lease(l1))),
    )
    .await
    .expect("an unrelated lock name must not wait")
    .unwrap();
    assert_eq!(s(other.key()), format!("other/{l1:x}"));
}

#[tokio::test]
async fn lock_with_the_same_lease_is_reentrant() {
    // concurrency/mutex.go tryAcquire: the key for this lease already exists,
    // so the existing key (and its create revision) is reused.
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 60).await;
    let a = c
        .lock("re", Some(LockOptions::new().with_lease(l)))
        .await
        .unwrap();
    let b = timeout(STEP, c.lock("re", Some(LockOptions::new().with_lease(l))))
        .await
        .expect("locking again with the same lease must not wait")
        .unwrap();
    assert_eq!(a.key(), b.key());
}

#[tokio::test]
async fn lock_is_released_when_its_lease_is_revoked() {
    let (_srv, mut c) = setup().await;
    let l1 = grant(&mut c, 60).await;
    let l2 = grant(&mut c, 60).await;
    let key1 = c
        .lock("rv", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap()
        .key()
        .to_vec();
    let second = spawn_lock(&c, "rv", l2);
    assert_blocked("second lock", &second).await;
    let rev = rev_of(c.lease_revoke(l1).await.unwrap().header());
    let (key2, rev2) = join("second lock", second).await;
    assert_eq!(s(&key2), format!("rv/{l2:x}"));
    assert!(rev2 >= rev);
    assert!(c.get(key1, None).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn lock_is_released_when_its_lease_expires() {
    let (_srv, mut c) = setup().await;
    let short = grant(&mut c, 2).await;
    let l2 = grant(&mut c, 60).await;
    c.lock("ex", Some(LockOptions::new().with_lease(short)))
        .await
        .unwrap();
    let second = spawn_lock(&c, "ex", l2);
    assert_blocked("second lock", &second).await;
    // No keep-alive: the 2 s lease expires and the waiter gets the lock.
    let (key2, _) = join("second lock", second).await;
    assert_eq!(s(&key2), format!("ex/{l2:x}"));
    assert_eq!(c.lease_time_to_live(short, None).await.unwrap().ttl(), -1);
}

#[tokio::test]
async fn unlock_of_a_missing_key_succeeds() {
    // v3lock/lock.go Unlock is a plain Delete: no error when nothing is there.
    let (_srv, mut c) = setup().await;
    c.put("x", "1", None).await.unwrap();
    let rev = rev_of(c.get("x", None).await.unwrap().header());
    let r = timeout(STEP, c.unlock("no-such-lock/abc"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rev_of(r.header()),
        rev,
        "deleting nothing keeps the revision"
    );
}

#[tokio::test]
async fn lock_with_an_unknown_lease_fails() {
    // concurrency/mutex.go tryAcquire puts the key with the lease; the put
    // fails with ErrGRPCLeaseNotFound. v3lock returns the client error as is
    // (EtcdError carries no gRPC status), so the code is Unknown.
    let (_srv, mut c) = setup().await;
    let r = timeout(
        STEP,
        c.lock("bad", Some(LockOptions::new().with_lease(0x9999))),
    )
    .await
    .expect("lock with an unknown lease must fail, not wait");
    expect_grpc(r, "Unknown", ERR_LEASE_NOT_FOUND);
}

#[tokio::test]
async fn lock_without_a_lease_uses_a_fresh_session_lease() {
    // v3lock/lock.go: lease 0 makes concurrency.NewSession grant a lease
    // with the default session TTL (60 s) and orphan it.
    let (_srv, mut c) = setup().await;
    let r = timeout(STEP, c.lock("nolease", None))
        .await
        .unwrap()
        .unwrap();
    let key = s(r.key());
    let hex = key
        .strip_prefix("nolease/")
        .expect("key under the lock name");
    let lease = i64::from_str_radix(hex, 16).unwrap();
    assert_ne!(lease, 0);
    let kv = c.get(r.key(), None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.lease(), lease);
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    assert!(ttl.ttl() > 50);
}

// ---------------------------------------------------------------------------
// election
// ---------------------------------------------------------------------------

/// Spawn `campaign(name, value, lease)`; returns the leader key.
fn spawn_campaign(
    c: &Client,
    name: &'static str,
    value: &'static str,
    lease: i64,
) -> JoinHandle<LeaderKey> {
    let mut c = c.clone();
    tokio::spawn(async move {
        let mut r = c.campaign(name, value, lease).await.unwrap();
        r.take_leader()
            .expect("campaign response without leader key")
    })
}

/// Run Observe(name) in a task that forwards (key, value) of every message.
fn spawn_observer(c: &Client, name: &'static str) -> mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut c = c.clone();
    tokio::spawn(async move {
        let mut stream = c.observe(name).await.unwrap();
        while let Ok(Some(r)) = stream.message().await {
            let kv = r.kv().expect("observe message without kv");
            if tx.send((s(kv.key()), s(kv.value()))).is_err() {
                break;
            }
        }
    });
    rx
}

/// (key, value) of the next Observe message.
async fn next_obs(o: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    timeout(STEP, o.recv())
        .await
        .expect("no observe message")
        .expect("observe stream ended")
}

async fn leader_value(c: &mut Client, name: &str) -> (String, String) {
    let r = timeout(STEP, c.leader(name)).await.unwrap().unwrap();
    let kv = r.kv().expect("leader response without kv");
    (s(kv.key()), s(kv.value()))
}

#[tokio::test]
async fn leader_without_candidates_is_an_error() {
    let (_srv, mut c) = setup().await;
    expect_grpc(
        timeout(STEP, c.leader("nobody")).await.unwrap(),
        "Unknown",
        ERR_NO_LEADER,
    );
    // A key that merely starts with the name is not a candidate: candidates
    // live under "<name>/".
    c.put("nobody-else", "x", None).await.unwrap();
    expect_grpc(
        timeout(STEP, c.leader("nobody")).await.unwrap(),
        "Unknown",
        ERR_NO_LEADER,
    );
}

#[tokio::test]
async fn campaign_proclaim_resign_and_observe() {
    let (_srv, mut c) = setup().await;
    let l1 = grant(&mut c, 60).await;
    let l2 = grant(&mut c, 60).await;

    // Observe before anyone campaigns: the stream waits for the first leader.
    // (On etcd the Observe call itself only returns once there is one: gRPC
    // response headers go out with the first message.)
    let mut obs = spawn_observer(&c, "el");

    let r = timeout(STEP, c.campaign("el", "v1", l1))
        .await
        .unwrap()
        .unwrap();
    let lk1 = r.leader().expect("leader key").clone();
    assert_eq!(lk1.name(), b"el");
    assert_eq!(s(lk1.key()), format!("el/{l1:x}"));
    assert_eq!(lk1.lease(), l1);
    let kv = c.get(lk1.key(), None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        lk1.rev(),
        kv.create_revision(),
        "LeaderKey.rev is the create revision"
    );
    assert_eq!(kv.lease(), l1);
    assert_eq!(kv.value(), b"v1");
    assert_eq!(
        leader_value(&mut c, "el").await,
        (format!("el/{l1:x}"), "v1".into())
    );

    assert_eq!(
        next_obs(&mut obs).await,
        (format!("el/{l1:x}"), "v1".into())
    );

    // A second candidate waits.
    let second = spawn_campaign(&c, "el", "v2", l2);
    assert_blocked("second campaign", &second).await;
    assert_eq!(leader_value(&mut c, "el").await.1, "v1");

    // The leader proclaims a new value without a new election.
    let pr = c
        .proclaim("v1b", Some(ProclaimOptions::new().with_leader(lk1.clone())))
        .await
        .unwrap();
    assert!(rev_of(pr.header()) > lk1.rev());
    assert_eq!(leader_value(&mut c, "el").await.1, "v1b");
    assert_eq!(
        next_obs(&mut obs).await,
        (format!("el/{l1:x}"), "v1b".into())
    );
    assert!(!second.is_finished(), "proclaim must not end the election");
    // A new observer starts with the current leader value.
    let mut late_obs = spawn_observer(&c, "el");
    assert_eq!(
        next_obs(&mut late_obs).await,
        (format!("el/{l1:x}"), "v1b".into())
    );

    // Proclaim with a key whose create revision does not match fails.
    let bogus = lk1.clone().with_rev(lk1.rev() + 1000);
    expect_grpc(
        c.proclaim("evil", Some(ProclaimOptions::new().with_leader(bogus)))
            .await,
        "Unknown",
        ERR_NOT_LEADER,
    );
    assert_eq!(leader_value(&mut c, "el").await.1, "v1b");

    // Resign: the waiting candidate becomes leader.
    let rr = c
        .resign(Some(ResignOptions::new().with_leader(lk1.clone())))
        .await
        .unwrap();
    let resign_rev = rev_of(rr.header());
    let lk2 = join("second campaign", second).await;
    assert_eq!(s(lk2.key()), format!("el/{l2:x}"));
    assert_eq!(lk2.lease(), l2);
    assert!(
        lk2.rev() < resign_rev,
        "candidate key was created while waiting"
    );
    assert_eq!(
        leader_value(&mut c, "el").await,
        (format!("el/{l2:x}"), "v2".into())
    );
    assert_eq!(
        next_obs(&mut obs).await,
        (format!("el/{l2:x}"), "v2".into())
    );
    assert_eq!(
        next_obs(&mut late_obs).await,
        (format!("el/{l2:x}"), "v2".into())
    );

    // The old leader key is stale now: proclaim fails, resign is a no-op.
    expect_grpc(
        c.proclaim(
            "late",
            Some(ProclaimOptions::new().with_leader(lk1.clone())),
        )
        .await,
        "Unknown",
        ERR_NOT_LEADER,
    );
    c.resign(Some(ResignOptions::new().with_leader(lk1.clone())))
        .await
        .unwrap();
    assert_eq!(leader_value(&mut c, "el").await.1, "v2");

    // The new leader can proclaim; observers see it.
    c.proclaim("v2b", Some(ProclaimOptions::new().with_leader(lk2.clone())))
        .await
        .unwrap();
    assert_eq!(
        next_obs(&mut obs).await,
        (format!("el/{l2:x}"), "v2b".into())
    );
}

#[tokio::test]
async fn campaign_again_with_the_same_lease_keeps_leadership() {
    // concurrency/election.go Campaign: the key for this lease exists, so
    // the txn falls to Else; the existing create revision is kept and a
    // different value is proclaimed.
    let (_srv, mut c) = setup().await;
    let l = grant(&mut c, 60).await;
    let a = c.campaign("same", "first", l).await.unwrap();
    let b = timeout(STEP, c.campaign("same", "second", l))
        .await
        .expect("re-campaigning with the leader's lease must not wait")
        .unwrap();
    let (ka, kb) = (a.leader().unwrap(), b.leader().unwrap());
    assert_eq!(ka.key(), kb.key());
    assert_eq!(ka.rev(), kb.rev());
    assert_eq!(leader_value(&mut c, "same").await.1, "second");
}

#[tokio::test]
async fn leadership_passes_on_when_the_leader_lease_goes() {
    let (_srv, mut c) = setup().await;
    let short = grant(&mut c, 2).await;
    let l2 = grant(&mut c, 60).await;
    let l3 = grant(&mut c, 60).await;
    c.campaign("lg", "a", short).await.unwrap();
    let second = spawn_campaign(&c, "lg", "b", l2);
    assert_blocked("second campaign", &second).await;
    // Expiry of the leader's lease (no keep-alive) elects the next one.
    let lk2 = join("second campaign", second).await;
    assert_eq!(s(lk2.key()), format!("lg/{l2:x}"));
    assert_eq!(leader_value(&mut c, "lg").await.1, "b");

    // Revoking the leader's lease elects the next one too.
    let third = spawn_campaign(&c, "lg", "c", l3);
    assert_blocked("third campaign", &third).await;
    c.lease_revoke(l2).await.unwrap();
    let lk3 = join("third campaign", third).await;
    assert_eq!(s(lk3.key()), format!("lg/{l3:x}"));
    assert_eq!(leader_value(&mut c, "lg").await.1, "c");

    // And with everyone gone there is no leader.
    c.lease_revoke(l3).await.unwrap();
    expect_grpc(
        timeout(STEP, c.leader("lg")).await.unwrap(),
        "Unknown",
        ERR_NO_LEADER,
    );
}

#[tokio::test]
async fn campaign_with_an_unknown_lease_fails() {
    let (_srv, mut c) = setup().await;
    let r = timeout(STEP, c.campaign("bad", "v", 0x8888))
        .await
        .expect("campaign with an unknown lease must fail, not wait");
    expect_grpc(r, "Unknown", ERR_LEASE_NOT_FOUND);
    // Writing a candidate key by hand makes it a candidate like any other:
    // the election is plain keys under "<name>/".
    let l = grant(&mut c, 60).await;
    c.put(
        format!("bad/{l:x}"),
        "manual",
        Some(PutOptions::new().with_lease(l)),
    )
    .await
    .unwrap();
    assert_eq!(leader_value(&mut c, "bad").await.1, "manual");
}

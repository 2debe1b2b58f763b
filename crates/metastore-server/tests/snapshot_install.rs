//! Followers too far behind the leader's log catch up from a snapshot: the leader builds one
//! from its state machine, streams it on the peer port, and the follower installs it (engine,
//! key index, leases, watchers) and converges to the same HashKV. Runs on either engine
//! (METASTORE_TEST_STORAGE).

mod cluster_harness;

use cluster_harness::Cluster;
use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use std::time::{Duration, Instant};

/// Snapshots every 100 entries, and a leader that keeps only 50 entries for slow followers: a
/// follower a few hundred writes behind needs a snapshot.
fn small_log_cluster() -> Cluster {
    Cluster::create(3).start_small_log()
}

/// Writes `n` entries through `c`, one at a time (each its own raft entry): puts over 100 keys,
/// a delete every tenth write, and keys on a lease. Returns the last revision.
async fn write_entries(c: &mut Client, n: usize, tag: &str, lease: i64) -> i64 {
    let mut last = 0;
    for i in 0..n {
        let key = format!("k/{:03}", i % 100);
        let header = if i % 10 == 9 {
            c.delete(key, None).await.expect("delete").take_header()
        } else if i % 10 == 4 {
            let opts = PutOptions::new().with_lease(lease);
            c.put(key, format!("{tag}-{i}"), Some(opts))
                .await
                .expect("put with lease")
                .take_header()
        } else {
            c.put(key, format!("{tag}-{i}"), None)
                .await
                .expect("put")
                .take_header()
        };
        last = header.expect("header").revision();
    }
    last
}

/// A follower paused (SIGSTOP) while the leader writes far past its log window gets a
/// snapshot when it resumes; a watch open on it all along delivers every event, in order,
/// from the installed state's history; all members end with the same HashKV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_installs_a_snapshot_and_its_watchers_catch_up() {
    let cluster = small_log_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let mut lc = cluster.client(leader).await;
    let lease = lc.lease_grant(3600, None).await.expect("lease").id();
    let first = write_entries(&mut lc, 20, "a", lease).await;

    let mut fc = cluster.client(follower).await;
    let mut watch = fc
        .watch(
            "k/",
            Some(WatchOptions::new().with_prefix().with_start_revision(2)),
        )
        .await
        .expect("watch on the follower");
    let created = watch.message().await.expect("created").expect("a response");
    assert!(created.created());

    cluster.signal(follower, "-STOP");
    // More entries than raft sends unacknowledged (512 append messages in flight, which the
    // paused member's socket buffers take in): the rest is trimmed from the leader's log
    // before the follower can ask for it.
    let last = write_entries(&mut lc, 1000, "b", lease).await;
    assert!(last > first + 800);
    cluster.signal(follower, "-CONT");

    let hashes = cluster.hashes_at(last, Duration::from_secs(60)).await;
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "members differ at revision {last}: {hashes:?}"
    );
    assert!(
        cluster
            .log_of(follower)
            .contains("installed the leader's snapshot"),
        "the follower caught up without a snapshot: the test did not test it\n{}",
        cluster.log_of(follower)
    );
    // The lease and its keys came with the snapshot.
    let ttl = fc.lease_time_to_live(lease, None).await.expect("ttl");
    assert!(ttl.ttl() > 0, "the lease is known on the follower");

    // Every revision from 2 to the last, once, in order.
    let mut next = 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next <= last {
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = tokio::time::timeout(left, watch.message())
            .await
            .unwrap_or_else(|_| panic!("watch stalled before revision {next} of {last}"))
            .expect("watch stream")
            .expect("a response");
        assert!(!resp.canceled(), "watch canceled: {resp:?}");
        for ev in resp.events() {
            let kv = ev.kv().expect("kv");
            assert_eq!(kv.mod_revision(), next, "events out of order or missing");
            if ev.event_type() == EventType::Delete {
                assert!(kv.value().is_empty());
            }
            next += 1;
        }
    }
}

/// A member killed while more than `snapshot-count` writes go by restarts, catches up from a
/// snapshot, and after a restart of the whole cluster on the same data dirs (the installed
/// state recovered from the WAL's record of it) every member still agrees, compaction included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_catches_up_from_a_snapshot_and_survives_a_restart() {
    let mut cluster = small_log_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let down = (0..3).find(|&i| i != leader).expect("a follower");
    let mut lc = cluster.client(leader).await;
    let lease = lc.lease_grant(3600, None).await.expect("lease").id();
    write_entries(&mut lc, 50, "a", lease).await;
    cluster.kill9(down);
    let mid = write_entries(&mut lc, 200, "b", lease).await;
    lc.compact(mid - 50, None).await.expect("compact");
    let last = write_entries(&mut lc, 150, "c", lease).await;
    cluster.spawn(down);

    let hashes = cluster.hashes_at(last, Duration::from_secs(60)).await;
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "members differ at revision {last}: {hashes:?}"
    );
    assert_eq!(hashes[0].1, mid - 50, "HashKV reports the compact revision");
    assert!(
        cluster
            .log_of(down)
            .contains("installed the leader's snapshot"),
        "the member caught up without a snapshot\n{}",
        cluster.log_of(down)
    );

    for i in 0..3 {
        cluster.kill9(i);
    }
    for i in 0..3 {
        cluster.spawn(i);
    }
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let mut lc = cluster.client(leader).await;
    let after = lc
        .put("after-restart", "1", None)
        .await
        .expect("put after restart")
        .take_header()
        .expect("header")
        .revision();
    let hashes = cluster.hashes_at(after, Duration::from_secs(60)).await;
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "members differ after the restart: {hashes:?}"
    );
    let hash_before = cluster.hashes_at(last, Duration::from_secs(10)).await;
    assert!(hash_before.iter().all(|h| *h == hash_before[0]));
}

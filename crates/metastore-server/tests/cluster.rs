//! A static 3-member cluster of real `metastore` processes on loopback: any member serves
//! writes and reads, a `kill -9` of the leader under write load elects a new one and loses no
//! acknowledged write, and the killed member catches up from the log when it comes back.

mod cluster_harness;

use cluster_harness::Cluster;
use etcd_client::{Client, ConnectOptions, GetOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn data_dir_exists(p: &Path) -> bool {
    p.join("member").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_serve_fail_over_and_catch_up() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // Any member serves: a write through a follower, a linearizable read on the other one.
    let mut a = cluster.client(followers[0]).await;
    a.put("via-follower", "1", None)
        .await
        .expect("put through a follower");
    let mut b = cluster.client(followers[1]).await;
    let got = b.get("via-follower", None).await.expect("linearizable get");
    assert_eq!(got.kvs()[0].value_str().expect("utf-8"), "1");
    // Every member publishes its client URLs through raft: each MemberList names them all.
    let want: BTreeMap<String, Vec<String>> = (0..3)
        .map(|i| (cluster.members[i].name.clone(), vec![cluster.endpoint(i)]))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..3 {
        loop {
            let mut c = cluster.client(i).await;
            let list = c.member_list().await.expect("member list");
            let got: BTreeMap<String, Vec<String>> = list
                .members()
                .iter()
                .map(|m| (m.name().to_string(), m.client_urls().to_vec()))
                .collect();
            if got == want {
                break;
            }
            assert!(Instant::now() < deadline, "member {i} lists {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A steady write load through one follower; the leader is killed in the middle of it.
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let acknowledged = acknowledged.clone();
        let stop = stop.clone();
        let mut c = cluster.client(followers[0]).await;
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let (k, v) = (format!("load/{i:06}"), format!("v{i}"));
                match c.put(k.clone(), v.clone(), None).await {
                    Ok(_) => acknowledged.lock().expect("lock").push((k, v)),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before_kill = acknowledged.lock().expect("lock").len();
    assert!(before_kill > 0, "writes flow before the kill");
    let killed_at = Instant::now();
    cluster.kill9(leader);
    // Writes resume under a new leader: the writer gets acknowledgements again.
    let resumed = loop {
        let n = acknowledged.lock().expect("lock").len();
        if n > before_kill + 20 {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "writes did not resume after the leader was killed\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("writes resumed {resumed:?} after kill -9 of the leader");
    let new_leader = cluster.leader(Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);

    // The killed member comes back on its data dir and catches up from the leader's log.
    assert!(data_dir_exists(&cluster.members[leader].data_dir));
    cluster.spawn(leader);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let errors = writer.await.expect("writer");
    // Failed writes are allowed only with etcd's retryable texts.
    for e in &errors {
        assert!(
            e.contains("leader changed")
                || e.contains("no leader")
                || e.contains("request timed out")
                || e.contains("timeout"),
            "unexpected write error: {e}"
        );
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    // A last write through the new leader orders everything before it on every member.
    let mut c = cluster.client(new_leader).await;
    c.put("last", "x", None)
        .await
        .expect("put through the new leader");

    let deadline = Instant::now() + Duration::from_secs(30);
    let contents = loop {
        let mut contents = Vec::new();
        for i in 0..3 {
            contents.push(cluster.contents(i).await.unwrap_or_default());
        }
        if contents.iter().all(|c| c.contains_key("last"))
            && contents[0] == contents[1]
            && contents[1] == contents[2]
        {
            break contents;
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge: sizes {:?}\n{}",
            contents.iter().map(|c| c.len()).collect::<Vec<_>>(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // No acknowledged write lost, on any member.
    for (k, v) in &acknowledged {
        assert_eq!(contents[0].get(k), Some(v), "acknowledged {k} lost");
    }
    assert_eq!(
        contents[0].get("via-follower").map(String::as_str),
        Some("1")
    );
}

/// A member cut off from the majority (here: the other two killed) steps down (CheckQuorum),
/// reports `etcdserver: no leader` in Status, fails requests that require a leader at once,
/// and commits nothing; the cluster recovers when a majority is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_alone_has_no_leader_and_says_so() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let survivor = leader;
    for i in (0..3).filter(|&i| i != survivor) {
        cluster.kill9(i);
    }
    // CheckQuorum: the leader steps down within about an election timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let mut c = cluster.client(survivor).await;
        let status = c.status().await.expect("status answers without a leader");
        if status.leader() == 0 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the lone leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.errors().iter().any(|e| e == "etcdserver: no leader"),
        "{:?}",
        status.errors()
    );
    let opts = ConnectOptions::new()
        .with_require_leader(true)
        .with_timeout(Duration::from_secs(5));
    let mut c = Client::connect([cluster.endpoint(survivor)], Some(opts))
        .await
        .expect("connect");
    let started = Instant::now();
    let err = c
        .put("k", "v", None)
        .await
        .expect_err("no leader, no write");
    assert!(err.to_string().contains("etcdserver: no leader"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "failed at once");
    // A serializable read needs no leader, unless the client requires one (`hasleader`).
    let serializable = || Some(GetOptions::new().with_serializable());
    let err = c
        .get("k", serializable())
        .await
        .expect_err("hasleader without a leader");
    assert!(err.to_string().contains("etcdserver: no leader"), "{err}");
    let mut plain = cluster.client(survivor).await;
    plain
        .get("k", serializable())
        .await
        .expect("a serializable read is served without a leader");
    // A majority again: the cluster elects and writes go through.
    let back = (0..3).find(|&i| i != survivor).expect("another member");
    cluster.spawn(back);
    cluster.leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(survivor).await;
    let put = async {
        loop {
            match c.put("after", "1", None).await {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), put)
        .await
        .expect("writes resume with a majority");
}

/// Leases through a follower: granted there, kept alive there (the follower sends each
/// renewal on to the leader, which alone keeps lease time), expired by the leader once the
/// keep-alives stop, with the attached key gone on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_kept_alive_through_a_follower_live_and_expire_by_the_leader() {
    let cluster = Cluster::start(3);
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    // The follower forwards to the leader's published client URL: wait until it knows it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = cluster.client(follower).await;
        let list = c.member_list().await.expect("member list");
        if list.members().iter().all(|m| !m.client_urls().is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "client URLs never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = cluster.client(follower).await;
    let ttl = 3;
    let lease = c.lease_grant(ttl, None).await.expect("grant").id();
    c.put(
        "leased",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with lease");
    let (mut keeper, mut responses) = c.lease_keep_alive(lease).await.expect("keep-alive stream");
    // Twice the TTL of keep-alives through the follower: the lease lives.
    let until = Instant::now() + Duration::from_secs(2 * ttl as u64);
    while Instant::now() < until {
        keeper.keep_alive().await.expect("send keep-alive");
        let resp = responses
            .message()
            .await
            .expect("keep-alive answered")
            .expect("a response");
        assert_eq!(resp.ttl(), ttl, "the leader renewed it to its full TTL");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let got = c.get("leased", None).await.expect("get");
    assert_eq!(
        got.kvs().len(),
        1,
        "the lease outlived its TTL while kept alive"
    );
    drop(keeper);
    drop(responses);
    // No more keep-alives: the leader revokes it, and the key goes on every member.
    let deadline = Instant::now() + Duration::from_secs(4 * ttl as u64 + 10);
    for i in 0..3 {
        loop {
            let gone = cluster
                .contents(i)
                .await
                .is_some_and(|c| !c.contains_key("leased"));
            if gone {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the lease never expired on member {i}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The leader sets the cluster version only once every member has announced its version on
/// the peer streams: with one member never started, nothing newer than what it might run is
/// enabled; it is set when that member joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_version_waits_for_every_member() {
    let mut cluster = Cluster::create(3);
    cluster.spawn(0);
    cluster.spawn(1);
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(leader).await;
    c.put("k", "v", None).await.expect("a quorum serves");
    // The monitor retries every 500 ms while undecided: give it several rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..2 {
        assert!(
            !cluster.log_of(i).contains("cluster version set"),
            "set without member 3's version:\n{}",
            cluster.log_of(i)
        );
    }
    cluster.spawn(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..3 {
        while !cluster.log_of(i).contains("cluster version set") {
            assert!(
                Instant::now() < deadline,
                "member {i} never applied the cluster version\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

//! Membership changes with etcdctl, against real members on loopback, while clients write:
//! learners added, started with `--initial-cluster-state existing` and promoted, members
//! updated and removed (the leader included), leadership moved; and every rule's error text.

mod cluster_harness;

use cluster_harness::Cluster;
use etcd_client::{Client, ConnectOptions, GetOptions};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// etcd's reconfiguration checks count a peer only once connected this long (5 s), and a
/// little more.
const HEALTHY_AFTER: Duration = Duration::from_millis(5_500);

/// The member id etcdctl prints for `member add`.
fn added_id(out: &str) -> u64 {
    let hex = out
        .split_whitespace()
        .skip_while(|w| *w != "Member")
        .nth(1)
        .unwrap_or_else(|| panic!("no member id in {out:?}"));
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{hex:?}: {e}"))
}

/// Writes unique keys through `members` until stopped; returns what was acknowledged and
/// every error that a client must not retry.
fn spawn_writer(
    cluster: &Cluster,
    members: &[usize],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(BTreeMap<String, String>, Vec<String>, usize)> {
    let endpoints: Vec<String> = members.iter().map(|&i| cluster.endpoint(i)).collect();
    tokio::spawn(async move {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        let mut clients = Vec::new();
        for e in &endpoints {
            clients.push(
                Client::connect([e.clone()], Some(opts.clone()))
                    .await
                    .expect("connect"),
            );
        }
        let (mut acked, mut fatal, mut retryable) = (BTreeMap::new(), Vec::new(), 0);
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            n += 1;
            let (key, value) = (format!("load/{n:06}"), format!("v{n}"));
            let client = &mut clients[n as usize % endpoints.len()];
            match client.put(key.clone(), value.clone(), None).await {
                Ok(_) => {
                    acked.insert(key, value);
                }
                // Unavailable is what etcd's clients retry: leader changed, no leader,
                // timed out.
                Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::Unavailable => {
                    retryable += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => fatal.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, fatal, retryable)
    })
}

/// Runs etcdctl until it succeeds (a learner still catching up, a leader just elected).
async fn etcdctl_until_ok(cluster: &Cluster, members: &[usize], args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = cluster.etcdctl(members, args);
        if ok {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "etcdctl {args:?} kept failing: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_grow_to_five_and_shrink_to_three_under_load() {
    let mut cluster = Cluster::start(3);
    cluster.leader(Duration::from_secs(20)).await;
    tokio::time::sleep(HEALTHY_AFTER).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&cluster, &[0, 1, 2], stop.clone());

    // A learner: added, started with `existing`, catches up, serves only what a learner may.
    let m4 = cluster.add_slot();
    let url4 = cluster.peer_url(m4);
    let (ok, out) = cluster.etcdctl(
        &[1],
        &[
            "member",
            "add",
            "m4",
            "--learner",
            &format!("--peer-urls={url4}"),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{out}"
    );
    let id4 = added_id(&out);
    cluster.spawn_joining(m4, &[0, 1, 2]);
    let mut learner = cluster.client(m4).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    // It serves once it has caught up with the log.
    let status = loop {
        match learner.status().await {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "the learner never served: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.is_learner());
    let err = learner
        .put("k", "v", None)
        .await
        .expect_err("a learner refuses writes");
    assert!(
        err.to_string()
            .contains("etcdserver: rpc not supported for learner"),
        "{err}"
    );
    let err = learner
        .get("k", None)
        .await
        .expect_err("and linearizable reads");
    assert!(
        err.to_string()
            .contains("etcdserver: rpc not supported for learner"),
        "{err}"
    );
    learner
        .get(
            "load/",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .expect("a learner serves serializable reads");
    let out = etcdctl_until_ok(&cluster, &[2], &["member", "promote", &format!("{id4:x}")]).await;
    assert!(out.contains("promoted"), "{out}");

    // A voter added directly (strict checks: every voter connected).
    let m5 = cluster.add_slot();
    let url5 = cluster.peer_url(m5);
    let (ok, out) = cluster.etcdctl(
        &[0],
        &["member", "add", "m5", &format!("--peer-urls={url5}")],
    );
    assert!(ok, "{out}");
    let id5 = added_id(&out);
    cluster.spawn_joining(m5, &[0, 1, 2, m4]);
    let out = etcdctl_until_ok(&cluster, &[m5], &["endpoint", "status"]).await;
    assert!(out.contains(&format!("{id5:x}")), "{out}");
    let (ok, out) = cluster.etcdctl(&[0], &["member", "list"]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(!out.contains("true"), "no learner is left: {out}");

    // Update: its own URL again is fine; another member's is not.
    let (ok, out) = cluster.etcdctl(
        &[1],
        &[
            "member",
            "update",
            &format!("{id5:x}"),
            &format!("--peer-urls={url5}"),
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = cluster.etcdctl(
        &[1],
        &[
            "member",
            "update",
            &format!("{id5:x}"),
            &format!("--peer-urls={url4}"),
        ],
    );
    assert!(
        !ok && out.contains("etcdserver: Peer URLs already exists"),
        "{out}"
    );

    // Leadership to the new member, then remove it while it leads: it hands leadership over
    // first and stops on its own, cleanly.
    let all = [0, 1, 2, m4, m5];
    let out = etcdctl_until_ok(&cluster, &all, &["move-leader", &format!("{id5:x}")]).await;
    assert!(out.contains("Leadership transferred"), "{out}");
    assert_eq!(cluster.leader(Duration::from_secs(10)).await, m5);
    let out = etcdctl_until_ok(&cluster, &[m5], &["member", "remove", &format!("{id5:x}")]).await;
    assert!(out.contains("removed"), "{out}");
    let status = cluster.wait_exit(m5, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "removed member exit: {status:?}"
    );
    assert!(cluster.log_of(m5).contains("leadership handed over"));
    let out = etcdctl_until_ok(&cluster, &[0], &["member", "remove", &format!("{id4:x}")]).await;
    assert!(out.contains("removed"), "{out}");
    let status = cluster.wait_exit(m4, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "removed member exit: {status:?}"
    );

    // A removed member never comes back: restarted on its data dir, it stops again (its
    // peers tell it, if its own log ends before its removal).
    let before = cluster.log_of(m4).len();
    cluster.spawn_joining(m4, &[0, 1, 2]);
    let status = cluster.wait_exit(m4, Duration::from_secs(10));
    assert!(status.is_some(), "a removed member kept running");
    assert!(
        cluster.log_of(m4)[before..].contains("permanently removed from the cluster"),
        "{}",
        cluster.log_of(m4)
    );

    stop.store(true, Ordering::Release);
    let (acked, fatal, retryable) = writer.await.expect("writer");
    assert!(fatal.is_empty(), "non-retryable write errors: {fatal:?}");
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );
    eprintln!(
        "{} writes acknowledged, {retryable} retryable errors",
        acked.len()
    );

    let (ok, out) = cluster.etcdctl(&[0], &["member", "list"]);
    assert!(ok && out.lines().count() == 3, "{out}");
    let mut c = cluster.client(0).await;
    let rev = c
        .status()
        .await
        .expect("status")
        .header()
        .expect("h")
        .revision();
    let hashes = cluster
        .hashes_of(&[0, 1, 2], rev, Duration::from_secs(20))
        .await;
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    let got = c
        .get("load/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read back");
    let stored: BTreeMap<String, String> = got
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().expect("utf8").to_string(),
                kv.value_str().expect("utf8").to_string(),
            )
        })
        .collect();
    for (k, v) in &acked {
        assert_eq!(stored.get(k), Some(v), "acknowledged write {k} lost");
    }

    // SIGTERM of the leader hands leadership over before it stops.
    let leader = cluster.leader(Duration::from_secs(10)).await;
    cluster.signal(leader, "-TERM");
    let status = cluster.wait_exit(leader, Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        cluster.log_of(leader).contains("leadership handed over"),
        "{}",
        cluster.log_of(leader)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_rules_answer_with_etcds_texts() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(Duration::from_secs(20)).await;
    tokio::time::sleep(HEALTHY_AFTER).await;
    let follower = (leader + 1) % 3;
    let mut c = cluster.client(follower).await;
    let err = |r: Result<_, etcd_client::Error>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    let expect = |text: String, want: &str| assert!(text.contains(want), "{text:?} lacks {want:?}");

    expect(
        err(c.member_remove(0x1234).await.map(|_| ())),
        "etcdserver: member not found",
    );
    expect(
        err(c.member_promote(0x1234).await.map(|_| ())),
        "etcdserver: member not found",
    );
    expect(
        err(c
            .member_update(0x1234, vec!["http://127.0.0.1:1".to_string()])
            .await
            .map(|_| ())),
        "etcdserver: member not found",
    );
    expect(
        err(c
            .member_add(vec!["http://no-port".to_string()], None)
            .await
            .map(|_| ())),
        "etcdserver: given member URLs are invalid",
    );
    expect(
        err(c
            .member_add(vec![cluster.peer_url(0)], None)
            .await
            .map(|_| ())),
        "etcdserver: Peer URLs already exists",
    );
    let voters = c.member_list().await.expect("list");
    let voter = voters.members()[0].id();
    expect(
        err(c.member_promote(voter).await.map(|_| ())),
        "etcdserver: can only promote a learner member",
    );

    // One learner at most; a learner that never started is not in sync.
    let l1 = c
        .member_add(
            vec!["http://127.0.0.1:9".to_string()],
            Some(etcd_client::MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("add a learner");
    let l1 = l1.member().expect("added").id();
    expect(
        err(c
            .member_add(
                vec!["http://127.0.0.1:10".to_string()],
                Some(etcd_client::MemberAddOptions::new().with_is_learner()),
            )
            .await
            .map(|_| ())),
        "etcdserver: too many learner members in cluster",
    );
    expect(
        err(c.member_promote(l1).await.map(|_| ())),
        "etcdserver: can only promote a learner member which is in sync with leader",
    );

    // MoveLeader: only the leader moves leadership, and only to a voter.
    expect(
        err(c.move_leader(voter).await.map(|_| ())),
        "etcdserver: not leader",
    );
    let mut on_leader = cluster.client(leader).await;
    expect(
        err(on_leader.move_leader(l1).await.map(|_| ())),
        "etcdserver: bad leader transferee",
    );
    expect(
        err(on_leader.move_leader(0x1234).await.map(|_| ())),
        "etcdserver: bad leader transferee",
    );
    c.member_remove(l1).await.expect("remove the learner");

    // With a voter down, a change that would leave too few connected voters is refused;
    // removing the member that is down is not.
    let down = (leader + 2) % 3;
    cluster.kill9(down);
    // Its data dir wiped and started again with `new`: refused, it would start a second
    // history beside the cluster's.
    std::fs::remove_dir_all(&cluster.members[down].data_dir).expect("wipe");
    cluster.spawn(down);
    let exit = cluster.wait_exit(down, Duration::from_secs(10));
    assert!(exit.is_some_and(|s| !s.success()), "{exit:?}");
    assert!(
        cluster
            .log_of(down)
            .contains("has already been bootstrapped"),
        "{}",
        cluster.log_of(down)
    );
    let ids: Vec<u64> = voters.members().iter().map(|m| m.id()).collect();
    let id_of = |i: usize| {
        let url = cluster.peer_url(i);
        voters
            .members()
            .iter()
            .find(|m| m.peer_urls().contains(&url))
            .map(|m| m.id())
            .expect("member")
    };
    assert_eq!(ids.len(), 3);
    expect(
        err(on_leader
            .member_add(vec!["http://127.0.0.1:11".to_string()], None)
            .await
            .map(|_| ())),
        "etcdserver: unhealthy cluster",
    );
    expect(
        err(on_leader.member_remove(id_of(follower)).await.map(|_| ())),
        "etcdserver: unhealthy cluster",
    );
    on_leader
        .member_remove(id_of(down))
        .await
        .expect("a member that is down can be removed");

    // Two voters: a third that never starts may join (two of three are up)...
    on_leader
        .member_add(vec!["http://127.0.0.1:12".to_string()], None)
        .await
        .expect("add a voter");
    // ...but not a fourth: two started members are not a quorum of four.
    expect(
        err(on_leader
            .member_add(vec!["http://127.0.0.1:13".to_string()], None)
            .await
            .map(|_| ())),
        "etcdserver: re-configuration failed due to not enough started members",
    );
    // Nor may a started member go: one started member is not a quorum of two.
    expect(
        err(on_leader.member_remove(id_of(follower)).await.map(|_| ())),
        "etcdserver: re-configuration failed due to not enough started members",
    );
}

//! Robustness tests in the spirit of etcd's tests/robustness: a real 3-member cluster of the
//! `metastore` binary on loopback, recording clients on every member, one fault per test
//! (kill -9, SIGSTOP, a partition through the peer proxies, a follower cut off until it needs
//! a snapshot), then heal; the recorded history must be linearizable and every member must end
//! with the same HashKV. Runs on either engine (METASTORE_TEST_STORAGE). Each fault lasts
//! METASTORE_ROBUSTNESS_SECS seconds (default 3; scripts/robustness.sh runs them longer).

#[path = "../cluster_harness/mod.rs"]
mod cluster_harness;
mod injection;
mod verify;
mod workload;

use cluster_harness::Cluster;
use std::time::{Duration, Instant};
use verify::verify;
use workload::Workload;

/// The tests take turns: three members and six clients already keep this machine's cores
/// busy, and two clusters at once would make elections time out for reasons no fault caused.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Clients per member: two, so each member serves concurrent requests from separate
/// connections, and histories stay small enough to check in a moment.
const CLIENTS_PER_MEMBER: usize = 2;

fn fault_duration() -> Duration {
    std::env::var("METASTORE_ROBUSTNESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_secs(3), Duration::from_secs_f64)
}

/// Three members behind peer proxies. Snapshots every 100 entries and a leader that keeps
/// only 50 for slow followers: a member that misses a few hundred entries (killed, paused,
/// cut off) needs a snapshot, so every scenario may exercise the install path.
fn proxied_cluster() -> Cluster {
    Cluster::create_proxied(3).start_small_log()
}

fn endpoints(cluster: &Cluster) -> Vec<String> {
    (0..cluster.members.len())
        .map(|i| cluster.endpoint(i))
        .collect()
}

/// Load before the fault, so that it hits a cluster in the middle of serving.
const WARM_UP: Duration = Duration::from_secs(1);
/// Load after healing, so that the history also covers the recovered cluster.
const AFTER_HEAL: Duration = Duration::from_secs(2);

/// The leader `among` these members agree on (none of the others asked), within `within`.
async fn leader_among(cluster: &Cluster, among: &[usize], within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut ids = Vec::new();
        for &i in among {
            let status = async {
                let mut c = cluster.client(i).await;
                c.status().await
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), status).await {
                ids.push((i, s.header().map(|h| h.member_id()), s.leader()));
            }
        }
        if ids.len() == among.len() && ids[0].2 != 0 && ids.iter().all(|x| x.2 == ids[0].2) {
            if let Some((i, _, _)) = ids.iter().find(|x| x.1 == Some(ids[0].2)) {
                return Some(*i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The leader is killed (SIGKILL) under load and restarted from its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_leader_and_restart_it() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = proxied_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let load = Workload::start(&endpoints(&cluster), CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    cluster.kill9(leader);
    tokio::time::sleep(fault_duration()).await;
    cluster.spawn(leader);

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "kill_leader", &history, started).await;
}

/// The leader is paused (SIGSTOP) until the others elect a new one, then resumed as a stale
/// leader; then a follower is paused and resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_the_leader_then_a_follower() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = proxied_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let load = Workload::start(&endpoints(&cluster), CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    let fault_started = Instant::now();
    cluster.signal(leader, "-STOP");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let fault = fault_duration();
    let new_leader = leader_among(&cluster, &others, fault.max(Duration::from_secs(10))).await;
    tokio::time::sleep(fault.saturating_sub(fault_started.elapsed())).await;
    cluster.signal(leader, "-CONT");
    assert!(
        new_leader.is_some(),
        "the two running members elected no leader while the old one was paused\n{}",
        cluster.logs()
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    cluster.signal(follower, "-STOP");
    tokio::time::sleep(fault).await;
    cluster.signal(follower, "-CONT");

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "pause_leader_then_follower", &history, started).await;
}

/// The leader hears nothing (its proxy blackholed) while its own messages still reach the
/// others: it must stop committing and step down (CheckQuorum), the majority must elect a
/// leader among themselves and go on, and after healing the old leader must rejoin and agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolate_the_leader() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = proxied_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let load = Workload::start(&endpoints(&cluster), CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    let fault_started = Instant::now();
    cluster.proxy(leader).blackhole();
    // On a key outside the checked set: if it took effect anyway (the entry reached the
    // others before the old leader stepped down), the history need not explain it.
    let mut probe = cluster.client(leader).await;
    let minority_write = tokio::time::timeout(
        Duration::from_secs(4),
        probe.put("robustness/minority", "must-not-commit-in-time", None),
    )
    .await;
    assert!(
        !matches!(minority_write, Ok(Ok(_))),
        "a write through the isolated leader succeeded: a minority committed\n{}",
        cluster.logs()
    );
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new_leader = leader_among(&cluster, &others, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the majority elected no leader of its own while the old one was isolated\n{}",
                cluster.logs()
            )
        });
    assert_ne!(new_leader, leader);
    let mut majority = cluster.client(new_leader).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        majority.put("robustness/majority", "commits", None),
    )
    .await
    .expect("a write through the majority's leader timed out")
    .expect("a write through the majority's leader failed");
    tokio::time::sleep(fault_duration().saturating_sub(fault_started.elapsed())).await;
    cluster.proxy(leader).pass();

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "isolate_leader", &history, started).await;
}

/// A follower hears nothing while the leader writes several hundred entries and compacts:
/// once healed it can only catch up from a snapshot, which it must install and converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_a_follower_until_it_needs_a_snapshot() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = proxied_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let load = Workload::start(&endpoints(&cluster), CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    let fault_started = Instant::now();
    cluster.proxy(follower).blackhole();
    // Outside the checked keys, one entry each: past the leader's 50-entry catch-up window
    // many times over, whatever the workload adds.
    let mut lc = cluster.client(leader).await;
    let mut last = 0;
    for i in 0..300 {
        let resp = lc
            .put(format!("robustness/fill/{}", i % 50), format!("{i}"), None)
            .await
            .expect("a write through the leader while a follower is cut off");
        last = resp.header().expect("header").revision();
    }
    lc.compact(last - 20, None).await.expect("compact");
    tokio::time::sleep(fault_duration().saturating_sub(fault_started.elapsed())).await;
    cluster.proxy(follower).pass();

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "cut_off_follower_snapshot", &history, started).await;
    assert!(
        cluster
            .log_of(follower)
            .contains("installed the leader's snapshot"),
        "the cut-off follower caught up without a snapshot: the test did not test it\n{}",
        cluster.log_of(follower)
    );
}

/// Retries a membership request until the leader accepts it: right after a start the strict
/// reconfiguration checks wait for peers connected 5 s, and a learner needs time to catch up.
async fn until_accepted<T, F, Fut>(what: &str, client: &etcd_client::Client, mut call: F) -> T
where
    F: FnMut(etcd_client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match call(client.clone()).await {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < deadline, "{what} kept failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The id of the member whose peer URL is `url`.
async fn member_id_of(cluster: &Cluster, via: usize, url: &str) -> u64 {
    let mut c = cluster.client(via).await;
    let list = c.member_list().await.expect("member list");
    list.members()
        .iter()
        .find(|m| m.peer_urls().iter().any(|u| u == url))
        .map(|m| m.id())
        .unwrap_or_else(|| panic!("no member with peer URL {url}: {list:?}"))
}

/// A follower is replaced under load as an operator replaces a failed machine: removed (it
/// stops itself), its data dir wiped, added again with the same peer URL, and started with
/// `--initial-cluster-state existing`; it catches up by snapshot and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_member() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = proxied_cluster();
    let leader = cluster.leader(Duration::from_secs(30)).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let others: Vec<usize> = (0..3).filter(|&i| i != follower).collect();
    let load = Workload::start(&endpoints(&cluster), CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    let url = cluster.peer_url(follower);
    let id = member_id_of(&cluster, leader, &url).await;
    let admin = cluster.client(others[0]).await;
    until_accepted("member remove", &admin, |mut c| async move {
        c.member_remove(id).await
    })
    .await;
    let exit = cluster.wait_exit(follower, Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "removed member: {exit:?}"
    );
    std::fs::remove_dir_all(&cluster.members[follower].data_dir).expect("wipe the data dir");
    tokio::time::sleep(fault_duration()).await;
    let added = until_accepted("member add", &admin, |mut c| {
        let url = url.clone();
        async move { c.member_add([url], None).await }
    })
    .await;
    assert_ne!(added.member().map(|m| m.id()), Some(id), "a new id");
    cluster.spawn_joining(follower, &others);

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "replace_member", &history, started).await;
}

/// A fourth member joins as a learner under load, is promoted once in sync, and is removed
/// again; the three others serve throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_promote_and_remove_a_member() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = proxied_cluster();
    cluster.leader(Duration::from_secs(30)).await;
    let load = Workload::start(&endpoints(&cluster), CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    let extra = cluster.add_slot();
    let url = cluster.peer_url(extra);
    let admin = cluster.client(1).await;
    let added = until_accepted("member add --learner", &admin, |mut c| {
        let url = url.clone();
        let learner = etcd_client::MemberAddOptions::new().with_is_learner();
        async move { c.member_add([url], Some(learner)).await }
    })
    .await;
    let id = added.member().expect("the added member").id();
    cluster.spawn_joining(extra, &[0, 1, 2]);
    until_accepted("member promote", &admin, |mut c| async move {
        c.member_promote(id).await
    })
    .await;
    tokio::time::sleep(fault_duration()).await;
    until_accepted("member remove", &admin, |mut c| async move {
        c.member_remove(id).await
    })
    .await;
    let exit = cluster.wait_exit(extra, Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "removed member: {exit:?}"
    );

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "add_promote_remove", &history, started).await;
}

/// Two data members and a witness, each fault in turn under load: the witness killed and
/// restarted, the leader killed and restarted (the witness may be elected, and must hand
/// leadership over), the witness cut off and healed. With one member of three down the other
/// two are a quorum, so writes go on throughout; the history must be linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_data_members_and_a_witness_under_faults() {
    let _turn = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::create_proxied(3);
    cluster.extra_args = cluster_harness::SMALL_LOG_ARGS
        .iter()
        .map(|s| s.to_string())
        .collect();
    cluster.spawn(0);
    cluster.spawn(1);
    cluster.spawn_witness(2);
    cluster.leader(Duration::from_secs(30)).await;
    let data: Vec<String> = (0..2).map(|i| cluster.endpoint(i)).collect();
    let load = Workload::start(&data, CLIENTS_PER_MEMBER, Instant::now());
    tokio::time::sleep(WARM_UP).await;

    cluster.kill9(2);
    tokio::time::sleep(fault_duration()).await;
    cluster.spawn_witness(2);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let leader = cluster.leader(Duration::from_secs(30)).await;
    cluster.kill9(leader);
    tokio::time::sleep(fault_duration()).await;
    cluster.spawn(leader);
    tokio::time::sleep(Duration::from_secs(1)).await;

    cluster.proxy(2).blackhole();
    tokio::time::sleep(fault_duration()).await;
    cluster.proxy(2).pass();

    tokio::time::sleep(AFTER_HEAL).await;
    let history = load.stop().await;
    verify(&cluster, "witness_faults", &history, started).await;
}

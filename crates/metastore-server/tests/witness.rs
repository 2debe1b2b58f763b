//! Two data members and a witness (`--witness`): the witness votes and keeps the log but holds
//! no data and serves no clients; the three survive the loss of any one, under load, with no
//! acknowledged write lost, and the witness's log stays bounded.

mod cluster_harness;

use cluster_harness::Cluster;
use etcd_client::{Client, ConnectOptions, GetOptions};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const WITNESS: usize = 2;

/// Writes `n` unique keys through whichever data member answers; returns those acknowledged.
async fn write_through(cluster: &Cluster, from: usize, n: usize) -> BTreeMap<String, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(3));
    let endpoints: Vec<String> = (0..2)
        .filter(|&i| cluster.members[i].child.is_some())
        .map(|i| cluster.endpoint(i))
        .collect();
    let mut client = Client::connect(endpoints, Some(opts))
        .await
        .expect("connect");
    let mut acked = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = "x".repeat(1024);
    for i in from..from + n {
        let key = format!("witness/{i:06}");
        loop {
            match client.put(key.clone(), value.clone(), None).await {
                Ok(_) => {
                    acked.insert(key, value.clone());
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "writes did not resume: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    acked
}

fn wal_segments(cluster: &Cluster, i: usize) -> usize {
    std::fs::read_dir(cluster.members[i].data_dir.join("member/wal"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.ends_with(".wal") && !name.contains("tmp")
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_data_members_and_a_witness_survive_any_one_failure() {
    let mut cluster = Cluster::create(3);
    // Small WAL segments and frequent snapshots: the witness's log must be trimmed within a
    // few thousand writes.
    let config = cluster.members[0].data_dir.with_file_name("small-wal.yaml");
    std::fs::write(&config, "raft:\n  wal-segment-size: 1048576\n").expect("config");
    cluster.extra_args = vec![
        "--config-file".into(),
        config.to_string_lossy().into_owned(),
        "--snapshot-count".into(),
        "200".into(),
    ];
    let ic = cluster_initial(&cluster);
    cluster.spawn(0);
    cluster.spawn(1);
    cluster.spawn_with(WITNESS, &ic, &["--witness"]);

    let mut acked = write_through(&cluster, 0, 100).await;

    // The witness serves no clients, and says why.
    let mut w = cluster.client(WITNESS).await;
    let err = w
        .get("witness/000001", None)
        .await
        .expect_err("a witness has no data");
    assert!(
        err.to_string().contains("this member is a witness"),
        "{err}"
    );
    let (ok, out) = cluster.etcdctl(&[0], &["member", "list"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out) = cluster.etcdctl(&[0, 1], &["member", "list"]);
        if out.contains("(witness)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member list never showed the witness: {out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Any one of the three down: writes go on.
    for down in [WITNESS, 0, 1] {
        cluster.kill9(down);
        acked.extend(write_through(&cluster, acked.len(), 200).await);
        if down == WITNESS {
            cluster.spawn_with(WITNESS, &ic, &["--witness"]);
        } else {
            cluster.spawn(down);
        }
        acked.extend(write_through(&cluster, acked.len(), 50).await);
    }

    // Enough writes for several WAL segments: the witness trims its log behind the data
    // members' snapshots.
    acked.extend(write_through(&cluster, acked.len(), 3_000).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    let index_file = cluster.members[WITNESS]
        .data_dir
        .join("member/witness-index");
    loop {
        let trimmed: u64 = std::fs::read_to_string(&index_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        if trimmed > 1_000 && wal_segments(&cluster, WITNESS) <= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the witness's log was not trimmed: index {trimmed}, {} segments\n{}",
            wal_segments(&cluster, WITNESS),
            cluster.log_of(WITNESS)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Nothing acknowledged is lost, and both data members agree.
    let mut c = cluster.client(0).await;
    let stored = c
        .get(
            "witness/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("read back");
    assert_eq!(stored.kvs().len(), acked.len(), "acknowledged writes lost");
    let rev = stored.header().expect("header").revision();
    let hashes = cluster
        .hashes_of(&[0, 1], rev, Duration::from_secs(20))
        .await;
    assert_eq!(hashes[0], hashes[1]);
}

fn cluster_initial(cluster: &Cluster) -> String {
    (0..cluster.members.len())
        .map(|j| format!("{}={}", cluster.members[j].name, cluster.peer_url(j)))
        .collect::<Vec<_>>()
        .join(",")
}

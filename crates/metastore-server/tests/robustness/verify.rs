//! After a run: the history must be linearizable, and every member must end with the same
//! HashKV. A failure keeps its evidence (the history as JSON lines, every member's full log)
//! in a directory the panic message names, since the cluster's own temp dir goes with it.

use crate::cluster_harness::Cluster;
use crate::workload::counts;
use metastore_checker::{check, write_jsonl, CheckResult, Operation};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Generous: the histories here check in well under a second; running out of time means the
/// history grew too large or too ambiguous (too many unknown writes), which the test should
/// report rather than pass.
const CHECK_LIMIT: Duration = Duration::from_secs(60);

/// Checks `history` and the members' convergence; panics with the evidence's location on any
/// failure. `started` is when the test began, for the report line.
pub async fn verify(cluster: &Cluster, name: &str, history: &[Operation], started: Instant) {
    let c = counts(history);
    let check_started = Instant::now();
    let verdict = check(history, CHECK_LIMIT);
    let check_time = check_started.elapsed();
    match verdict {
        Ok(CheckResult::Linearizable) => {}
        Ok(CheckResult::NotLinearizable { key, explanation }) => {
            let dir = keep_evidence(cluster, name, history);
            panic!(
                "{name}: history NOT linearizable on key {key:?} ({} ops, {} unknown); \
                 evidence in {}\n{explanation}",
                c.total,
                c.unknown,
                dir.display()
            );
        }
        Ok(CheckResult::Unknown) => {
            let dir = keep_evidence(cluster, name, history);
            panic!(
                "{name}: the checker found no verdict within {CHECK_LIMIT:?} ({} ops, {} \
                 unknown): shorten the run or cut the unknown writes; history in {}",
                c.total,
                c.unknown,
                dir.display()
            );
        }
        Err(e) => {
            let dir = keep_evidence(cluster, name, history);
            panic!(
                "{name}: the recorded history is malformed: {e}; history in {}",
                dir.display()
            );
        }
    }

    let revision = final_write(cluster).await;
    // Every data member still running: one removed on purpose has stopped, and a witness holds
    // no data.
    let running: Vec<usize> = (0..cluster.members.len())
        .filter(|&i| cluster.members[i].child.is_some() && !cluster.members[i].witness)
        .collect();
    let hashes = cluster
        .hashes_of(&running, revision, Duration::from_secs(30))
        .await;
    if !hashes.iter().all(|h| h.0 == hashes[0].0) {
        let dir = keep_evidence(cluster, name, history);
        panic!(
            "{name}: members differ at revision {revision}: {hashes:?}; evidence in {}",
            dir.display()
        );
    }
    // One line per test that scripts/robustness.sh collects into its report.
    println!(
        "robustness-report name={name} storage={} secs={:.1} ops={} reads={} writes={} \
         unknown={} check_ms={} final_revision={revision}",
        std::env::var("METASTORE_TEST_STORAGE").unwrap_or_else(|_| "memory".into()),
        started.elapsed().as_secs_f64(),
        c.total,
        c.reads,
        c.writes,
        c.unknown,
        check_time.as_millis(),
    );
}

/// A write through the leader after the load stopped: its revision is the last one, which
/// every member must reach. Retried, since a leader elected at the very end may still be
/// settling.
async fn final_write(cluster: &Cluster) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader = cluster.leader(Duration::from_secs(30)).await;
        let put = async {
            let mut c = cluster.client(leader).await;
            c.put("robustness/final", "done", None).await
        };
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), put).await {
            if let Some(h) = resp.header() {
                return h.revision();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no write went through after the faults healed\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies the history and every member's log out of the cluster's temp dir, which is removed
/// when the test unwinds.
pub fn keep_evidence(cluster: &Cluster, name: &str, history: &[Operation]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "metastore-robustness-{name}-{}-{}",
        std::env::var("METASTORE_TEST_STORAGE").unwrap_or_else(|_| "memory".into()),
        std::process::id()
    ));
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(f) = std::fs::File::create(dir.join("history.jsonl")) {
        let _ = write_jsonl(history, std::io::BufWriter::new(f));
    }
    for m in &cluster.members {
        let _ = std::fs::copy(&m.log, dir.join(format!("{}.log", m.name)));
    }
    dir
}

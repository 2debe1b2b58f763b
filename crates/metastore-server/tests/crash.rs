//! Durability tests: a write etcd acknowledged must survive the process
//! dying. Each test drives the real `metastore` binary, kills or stops it,
//! starts it again on the same data dir and ports, and compares what it
//! serves with what was acknowledged before.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestServer;
use etcd_client::{Client, Error, GetOptions, KeyValue, Txn, TxnOp};

const WRITERS: usize = 16;
const WRITE_FOR: Duration = Duration::from_secs(2);

/// One acknowledged put.
#[derive(Debug, Clone)]
struct Ack {
    key: String,
    value: String,
    rev: i64,
}

#[derive(Default)]
struct Ledger {
    acked: Vec<Ack>,
    /// Puts that returned an error: they may or may not have been applied.
    unknown: HashSet<String>,
}

fn key_for(round: u32, writer: usize, i: u64) -> String {
    format!("crash/{round}/{writer:02}/{i:08}")
}

/// The value is derived from the key, so any key found later can be checked
/// even if its put was never acknowledged.
fn value_for(key: &str) -> String {
    format!("value-of:{key}")
}

fn rev_of(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.expect("response has no header").revision()
}

/// Run WRITERS concurrent writers doing puts of distinct keys (each key is
/// written at most once) until `stop` is set; returns the shared ledger.
async fn run_writers(
    srv: &TestServer,
    round: u32,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Ledger>>, Vec<tokio::task::JoinHandle<()>>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        // Short request timeout: once the server is gone, in-flight puts fail
        // quickly instead of hanging the test.
        let mut c = srv.client_with_timeout(Duration::from_secs(5)).await;
        let ledger = ledger.clone();
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            let mut i: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = key_for(round, w, i);
                let value = value_for(&key);
                i += 1;
                // Bound every put on our side too, so a request stuck in the
                // client after the kill cannot keep the writer alive.
                let put = c.put(key.as_str(), value.as_str(), None);
                match tokio::time::timeout(Duration::from_secs(10), put).await {
                    Ok(Ok(resp)) => {
                        let rev = rev_of(resp.header());
                        ledger.lock().unwrap().acked.push(Ack { key, value, rev });
                    }
                    Ok(Err(_)) | Err(_) => {
                        ledger.lock().unwrap().unknown.insert(key);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    (ledger, handles)
}

async fn join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("writer task did not stop within 60 s")
            .expect("writer task panicked");
    }
}

/// Read every key under `crash/{round}/{writer}/` (one range per writer keeps
/// each response small).
async fn read_round(c: &mut Client, round: u32) -> BTreeMap<String, KeyValue> {
    let mut out = BTreeMap::new();
    for w in 0..WRITERS {
        let prefix = format!("crash/{round}/{w:02}/");
        let g = c
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(g.count() as usize, g.kvs().len());
        for kv in g.kvs() {
            out.insert(kv.key_str().unwrap().to_string(), kv.clone());
        }
    }
    out
}

/// Check that everything acknowledged is served exactly as acknowledged, and
/// that nothing appeared that was never attempted.
fn verify_round(ledger: &Ledger, found: &BTreeMap<String, KeyValue>, what: &str) {
    let mut missing = Vec::new();
    for a in &ledger.acked {
        match found.get(&a.key) {
            None => missing.push(a.key.clone()),
            Some(kv) => {
                assert_eq!(
                    kv.value_str().unwrap(),
                    a.value,
                    "{what}: value of {}",
                    a.key
                );
                assert_eq!(
                    kv.mod_revision(),
                    a.rev,
                    "{what}: mod_revision of {} (acknowledged at {})",
                    a.key,
                    a.rev
                );
                assert_eq!(
                    kv.create_revision(),
                    a.rev,
                    "{what}: create_revision of {}",
                    a.key
                );
                assert_eq!(kv.version(), 1, "{what}: version of {}", a.key);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: {} of {} acknowledged puts are lost, e.g. {:?}",
        missing.len(),
        ledger.acked.len(),
        &missing[..missing.len().min(10)]
    );
    let acked: HashSet<&str> = ledger.acked.iter().map(|a| a.key.as_str()).collect();
    for (k, kv) in found {
        assert!(
            acked.contains(k.as_str()) || ledger.unknown.contains(k),
            "{what}: key {k} is served but was never successfully or partially written"
        );
        assert_eq!(
            kv.value_str().unwrap(),
            value_for(k),
            "{what}: value of unacked {k}"
        );
    }
}

/// Every put is its own revision: acknowledged revisions never repeat.
fn assert_distinct_revisions(ledger: &Ledger) {
    let mut seen: HashMap<i64, &str> = HashMap::new();
    for a in &ledger.acked {
        if let Some(other) = seen.insert(a.rev, a.key.as_str()) {
            panic!(
                "revision {} acknowledged for both {other} and {}",
                a.rev, a.key
            );
        }
    }
}

async fn store_rev(c: &mut Client) -> i64 {
    rev_of(c.get("__never_written__", None).await.unwrap().header())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_puts_survive_sigkill() {
    // Entries answered in parts of 3: a put is acknowledged while the rest of its raft entry
    // is still being applied, and must survive the kill like any other. Frequent snapshots
    // (captured between entries, never between parts) make recovery start from one.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "snapshot-count: 50\nbatch:\n  apply-part-len: 3\n",
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap();
    let mut srv = TestServer::start_with_args(&["--config-file", config_path]).await;
    let mut ledgers = Vec::new();

    // Two rounds: the second one writes to a WAL that was itself recovered
    // from a crash, then crashes again; both rounds are checked at the end.
    for round in 0..2u32 {
        let stop = Arc::new(AtomicBool::new(false));
        let (ledger, handles) = run_writers(&srv, round, stop.clone()).await;
        tokio::time::sleep(WRITE_FOR).await;
        let acked_before_kill = ledger.lock().unwrap().acked.len();
        assert!(
            acked_before_kill > 0,
            "round {round}: no put was acknowledged in {WRITE_FOR:?}"
        );
        let errors_before_kill = ledger.lock().unwrap().unknown.len();
        assert_eq!(
            errors_before_kill, 0,
            "round {round}: puts failed while the server was up"
        );
        // SIGKILL while the writers still have puts in flight.
        srv.kill9();
        stop.store(true, Ordering::SeqCst);
        join_all(handles).await;

        let ledger = Arc::try_unwrap(ledger)
            .ok()
            .expect("writers still hold the ledger")
            .into_inner()
            .unwrap();
        eprintln!(
            "round {round}: {} puts acknowledged, {} with unknown outcome at the kill",
            ledger.acked.len(),
            ledger.unknown.len()
        );
        assert_distinct_revisions(&ledger);

        srv.restart().await;
        let mut c = srv.client().await;
        let found = read_round(&mut c, round).await;
        verify_round(&ledger, &found, &format!("after kill -9 #{}", round + 1));

        let max_acked = ledger.acked.iter().map(|a| a.rev).max().unwrap_or(0);
        let max_found = found
            .values()
            .map(|kv| kv.mod_revision())
            .max()
            .unwrap_or(0);
        let rev = store_rev(&mut c).await;
        assert!(
            rev >= max_acked,
            "store revision {rev} < acknowledged {max_acked}"
        );
        assert!(
            rev >= max_found,
            "store revision {rev} < served mod_revision {max_found}"
        );

        // New writes continue after everything that survived.
        let p = c
            .put("after-crash", format!("{round}"), None)
            .await
            .unwrap();
        assert_eq!(rev_of(p.header()), rev + 1);
        ledgers.push(ledger);
    }

    // Everything from both rounds is still there after the second crash.
    let mut c = srv.client().await;
    for (round, ledger) in ledgers.iter().enumerate() {
        let found = read_round(&mut c, round as u32).await;
        verify_round(ledger, &found, &format!("final check of round {round}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_and_restart_keeps_everything() {
    let mut srv = TestServer::start().await;
    let mut c = srv.client().await;

    // A mix of creates, overwrites, deletes, a txn and a compaction.
    for i in 0..100 {
        c.put(format!("g/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in (0..100).step_by(3) {
        c.put(format!("g/{i:03}"), format!("v{i}-b"), None)
            .await
            .unwrap();
    }
    let before_deletes = store_rev(&mut c).await;
    for i in (0..100).step_by(10) {
        c.delete(format!("g/{i:03}"), None).await.unwrap();
    }
    c.txn(Txn::new().and_then([
        TxnOp::put("g/txn-a", "a", None),
        TxnOp::put("g/txn-b", "b", None),
        TxnOp::delete("g/001", None),
    ]))
    .await
    .unwrap();
    let compact_at = before_deletes - 5;
    c.compact(compact_at, None).await.unwrap();
    // Some history above the compaction point, to read back later.
    let hist = c
        .get(
            "g/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(before_deletes),
            ),
        )
        .await
        .unwrap();
    let last = c.put("g/last", "last", None).await.unwrap();
    let last_rev = rev_of(last.header());

    let snapshot = c
        .get("g/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let before: Vec<KeyValue> = snapshot.kvs().to_vec();
    assert_eq!(store_rev(&mut c).await, last_rev);
    drop(c);

    let t0 = Instant::now();
    let status = srv.terminate(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "server did not exit within 20 s of SIGTERM (it was SIGKILLed)"
    );
    eprintln!(
        "server stopped after SIGTERM in {:?} with {:?}",
        t0.elapsed(),
        status
    );

    srv.restart().await;
    let mut c = srv.client().await;

    // Same keys, values and metadata.
    let after = c
        .get("g/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(after.kvs().len(), before.len());
    for (a, b) in after.kvs().iter().zip(before.iter()) {
        assert_eq!(a.key(), b.key());
        assert_eq!(a.value(), b.value(), "{:?}", b.key_str());
        assert_eq!(
            a.create_revision(),
            b.create_revision(),
            "{:?}",
            b.key_str()
        );
        assert_eq!(a.mod_revision(), b.mod_revision(), "{:?}", b.key_str());
        assert_eq!(a.version(), b.version(), "{:?}", b.key_str());
    }

    // The revision is exactly where it was, and new writes continue from it.
    assert_eq!(store_rev(&mut c).await, last_rev);
    let p = c.put("g/next", "n", None).await.unwrap();
    assert_eq!(rev_of(p.header()), last_rev + 1);

    // History above the compaction survives; below it stays compacted.
    let hist2 = c
        .get(
            "g/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(before_deletes),
            ),
        )
        .await
        .unwrap();
    assert_eq!(hist2.kvs().len(), hist.kvs().len());
    for (a, b) in hist2.kvs().iter().zip(hist.kvs().iter()) {
        assert_eq!(a.key(), b.key());
        assert_eq!(a.value(), b.value());
        assert_eq!(a.mod_revision(), b.mod_revision());
    }
    match c
        .get(
            "g/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_revision(compact_at - 1),
            ),
        )
        .await
    {
        Err(Error::GRpcStatus(st)) => {
            assert_eq!(format!("{:?}", st.code()), "OutOfRange");
            assert_eq!(
                st.message(),
                "etcdserver: mvcc: required revision has been compacted"
            );
        }
        other => panic!("compaction was lost across the restart: {other:?}"),
    }

    // A second restart (after a SIGKILL this time) changes nothing either.
    srv.kill9();
    srv.restart().await;
    let mut c = srv.client().await;
    assert_eq!(store_rev(&mut c).await, last_rev + 1);
    let g = c.get("g/next", None).await.unwrap();
    assert_eq!(g.kvs().len(), 1);
    assert_eq!(g.kvs()[0].mod_revision(), last_rev + 1);
}

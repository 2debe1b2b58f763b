//! Admission control, played by a bad client: a flood of writes larger than the server can take
//! in is answered `etcdserver: too many requests` instead of growing a queue, a refused write
//! is never applied, and every acknowledged one survives `kill -9`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{rss_bytes, TestServer};
use etcd_client::{Error, GetOptions};

const CONNECTIONS: usize = 8;
const PUTS_IN_FLIGHT_PER_CONNECTION: usize = 64;
const VALUE_BYTES: usize = 64 * 1024;
/// 16 puts of 64 KiB: far less than 512 in flight, so the queue must refuse some.
const QUEUE_LIMIT_BYTES: usize = 1024 * 1024;
const FLOOD_FOR: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Outcomes {
    acked: HashSet<String>,
    refused: HashSet<String>,
    /// Failed another way (the kill): may or may not have been applied.
    unknown: HashSet<String>,
}

fn is_too_many_requests(e: &Error) -> bool {
    matches!(e, Error::GRpcStatus(s)
        if s.code() == tonic::Code::ResourceExhausted
            && s.message() == "etcdserver: too many requests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_flood_is_refused_with_too_many_requests_and_loses_nothing_acknowledged() {
    let limit = QUEUE_LIMIT_BYTES.to_string();
    let mut srv = TestServer::start_with_args(&["--max-queued-request-bytes", &limit]).await;
    let pid = srv.pid().unwrap();
    let rss_at_start = rss_bytes(pid);
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let next_key = Arc::new(AtomicU64::new(0));
    let value = "v".repeat(VALUE_BYTES);
    let mut writers = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = srv.client_with_timeout(Duration::from_secs(10)).await;
        for _ in 0..PUTS_IN_FLIGHT_PER_CONNECTION {
            let mut kv = client.kv_client();
            let (outcomes, stop, next_key) = (outcomes.clone(), stop.clone(), next_key.clone());
            let value = value.clone();
            writers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("flood/{:08}", next_key.fetch_add(1, Ordering::Relaxed));
                    let answer = kv.put(key.clone(), value.clone(), None).await;
                    let mut o = outcomes.lock().unwrap();
                    match answer {
                        Ok(_) => o.acked.insert(key),
                        Err(e) if is_too_many_requests(&e) => o.refused.insert(key),
                        Err(_) => o.unknown.insert(key),
                    };
                }
            }));
        }
    }
    let started = Instant::now();
    let mut peak_rss = rss_at_start;
    while started.elapsed() < FLOOD_FOR {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak_rss = peak_rss.max(rss_bytes(pid));
    }
    // Killed with puts in flight.
    srv.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let outcomes = Arc::try_unwrap(outcomes)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    eprintln!(
        "flood: {} acknowledged, {} refused, {} unknown at the kill; RSS {} MiB at start, peak {} MiB",
        outcomes.acked.len(),
        outcomes.refused.len(),
        outcomes.unknown.len(),
        rss_at_start >> 20,
        peak_rss >> 20
    );
    assert!(
        !outcomes.refused.is_empty(),
        "no put was refused with 512 puts of 64 KiB in flight and a 1 MiB queue"
    );
    assert!(!outcomes.acked.is_empty(), "no put was acknowledged");
    // What the server holds beyond its data: the queue is 1 MiB, two batches of 4 MiB are
    // in flight, and the acknowledged values are stored (a few copies on their way through
    // the WAL and the engine). Without a bound, 512 queued puts would be 32 MiB more at least.
    let stored = (outcomes.acked.len() * VALUE_BYTES) as u64;
    let bound = rss_at_start + 3 * stored + 256 * 1024 * 1024;
    assert!(
        peak_rss < bound,
        "peak RSS {peak_rss} over {bound} (start {rss_at_start}, stored {stored})"
    );

    srv.restart().await;
    let mut c = srv.client().await;
    let found: HashSet<String> = c
        .get(
            "flood/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = outcomes.acked.difference(&found).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged puts lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let applied_refused: Vec<_> = outcomes.refused.intersection(&found).collect();
    assert!(
        applied_refused.is_empty(),
        "refused puts were applied: {applied_refused:?}"
    );
    assert!(found.is_subset(
        &outcomes
            .acked
            .union(&outcomes.unknown)
            .cloned()
            .collect::<HashSet<_>>()
    ));
}

/// grpc-go's refusal of an answer over the 1 MiB `--max-response-bytes` the test sets.
fn assert_larger_than_1_mib(answer: Result<(), Error>, what: &str) {
    match answer {
        Err(Error::GRpcStatus(s)) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted);
            let message = s.message();
            assert!(
                message.starts_with("grpc: trying to send message larger than max (")
                    && message.ends_with(" vs. 1048576)"),
                "{message}"
            );
        }
        other => panic!("{what} under a 1 MiB limit answered {other:?}"),
    }
}

/// A range whose answer would pass `--max-response-bytes` is refused as soon as it passes it
/// (with grpc-go's text for an over-limit response), not after building all of it; one with a
/// limit, a count or keys only is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_over_the_response_limit_is_refused_and_a_limited_one_served() {
    let srv = TestServer::start_with_args(&["--max-response-bytes", "1048576"]).await;
    let mut c = srv.client().await;
    let value = "v".repeat(1024);
    for chunk in 0..30 {
        let ops: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| {
                etcd_client::TxnOp::put(format!("big/{:05}", chunk * 100 + i), value.clone(), None)
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let prefix = || GetOptions::new().with_prefix();
    let answer = c.get("big/", Some(prefix())).await;
    assert_larger_than_1_mib(answer.map(|_| ()), "a 3 MB range");
    let page = c.get("big/", Some(prefix().with_limit(500))).await.unwrap();
    assert_eq!(page.kvs().len(), 500);
    assert!(page.more());
    assert_eq!(page.count(), 3000);
    let counted = c
        .get("big/", Some(prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!(counted.count(), 3000);
    let keys = c
        .get("big/", Some(prefix().with_keys_only()))
        .await
        .unwrap();
    assert_eq!(keys.kvs().len(), 3000);

    // A Txn that writes answers its ranges in the apply step: bounded the same, and its
    // writes still apply (every member must write the same whatever its own limit), as
    // etcd's txn applies and then fails to send an answer too large.
    let txn = etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::get("big/", Some(prefix())),
        etcd_client::TxnOp::put("written-anyway", "yes", None),
    ]);
    let answer = c.txn(txn).await;
    assert_larger_than_1_mib(answer.map(|_| ()), "a write txn with a 3 MB range");
    let written = c.get("written-anyway", None).await.unwrap();
    assert_eq!(written.kvs()[0].value(), b"yes");
    // Under the limit, a write txn's range answers in full.
    let txn = etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::get("big/", Some(prefix().with_limit(10))),
        etcd_client::TxnOp::put("written-too", "yes", None),
    ]);
    let answered = c.txn(txn).await.unwrap();
    match &answered.op_responses()[0] {
        etcd_client::TxnOpResponse::Get(r) => assert_eq!(r.kvs().len(), 10),
        other => panic!("expected the range's answer, got {other:?}"),
    }
}

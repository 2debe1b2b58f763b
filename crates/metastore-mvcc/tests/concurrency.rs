//! Readers running concurrently with the single writer must always see one consistent revision.
//!
//! The writer's raft entry `i` is one txn that puts the value `i` into every key `k/0`..`k/9`,
//! so it creates revision `i + 1`, and at any revision `r >= 2` all ten keys hold `r - 1`
//! with `mod_revision == r` and `version == r - 1`. Any torn read shows as unequal values.

use bytes::Bytes;
mod support;
use metastore_mvcc::{ApplyResponse, MvccError, Store};
use metastore_proto::etcdserverpb::{
    compare, request_op, response_op, CompactionRequest, Compare, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest,
};
use metastore_proto::internal::{command::Op, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::TestEngine;

const KEYS: usize = 10;

type S = Store<TestEngine>;

fn key(i: usize) -> Bytes {
    Bytes::from(format!("k/{i}"))
}

/// All ten counter keys: [k/, k0).
fn counters(revision: i64) -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(b"k/"),
        range_end: Bytes::from_static(b"k0"),
        revision,
        serializable: true,
        ..Default::default()
    }
}

fn write_all(value: u64) -> Command {
    Command {
        auth: None,
        op: Some(Op::Txn(TxnRequest {
            compare: vec![],
            success: (0..KEYS)
                .map(|i| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key(i),
                        value: Bytes::from(value.to_string()),
                        ..Default::default()
                    })),
                })
                .collect(),
            failure: vec![],
        })),
    }
}

fn compaction(revision: i64) -> Command {
    Command {
        auth: None,
        op: Some(Op::Compaction(CompactionRequest {
            revision,
            physical: false,
        })),
    }
}

/// Checks that a range over the counters at revision `rev` (0 = the header's) is one snapshot.
fn check_snapshot(resp: &RangeResponse, rev: i64) -> Result<(), String> {
    let header = resp.header.as_ref().map(|h| h.revision).unwrap_or(-1);
    let rev = if rev == 0 { header } else { rev };
    if rev > header {
        return Err(format!("read at {rev} answered with header {header}"));
    }
    if rev == 1 {
        return if resp.kvs.is_empty() && resp.count == 0 {
            Ok(())
        } else {
            Err(format!("revision 1 is empty, got {resp:?}"))
        };
    }
    if resp.count != KEYS as i64 || resp.kvs.len() != KEYS {
        return Err(format!(
            "rev {rev}: count {} with {} kvs",
            resp.count,
            resp.kvs.len()
        ));
    }
    let want = (rev - 1).to_string();
    for (i, kv) in resp.kvs.iter().enumerate() {
        if kv.key != key(i)
            || kv.value != want.as_bytes()
            || kv.mod_revision != rev
            || kv.version != rev - 1
            || kv.create_revision != 2
        {
            return Err(format!("rev {rev} (header {header}): torn read {kv:?}"));
        }
    }
    Ok(())
}

/// A tiny deterministic PRNG (xorshift64*), so that readers pick varied past revisions.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: i64) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as i64
    }
}

struct Outcome {
    reads: u64,
    compacted: u64,
    revisions_seen: std::collections::BTreeSet<i64>,
}

/// Runs `writer` while two readers check snapshots; returns what the readers saw.
fn run(
    store: Arc<S>,
    writer: impl FnOnce(&S) + Send + 'static,
    past_reads_may_be_compacted: bool,
) -> Outcome {
    let done = Arc::new(AtomicBool::new(false));
    let compacted = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2u64)
        .map(|id| {
            let store = store.clone();
            let done = done.clone();
            let compacted = compacted.clone();
            thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id + 1));
                let mut reads = 0u64;
                let mut last_header = 0;
                let mut seen = std::collections::BTreeSet::new();
                // Read until the writer is done, and a little after.
                let mut tail = 50;
                while tail > 0 {
                    if done.load(Ordering::Acquire) {
                        tail -= 1;
                    }
                    // At the current revision: never torn, never backwards. It may only be
                    // compacted if compactions overtook this reader between its loading the
                    // current revision and checking it (it was descheduled).
                    let resp = match store.range(&counters(0)) {
                        Ok(resp) => resp,
                        Err(MvccError::Compacted) if past_reads_may_be_compacted => {
                            assert!(store.compact_revision() > last_header);
                            continue;
                        }
                        Err(e) => panic!("read at the current revision: {e:?}"),
                    };
                    check_snapshot(&resp, 0).expect("current read is one snapshot");
                    let header = resp.header.as_ref().expect("header").revision;
                    assert!(header >= last_header, "revision went back");
                    last_header = header;
                    seen.insert(header);
                    reads += 1;

                    // At a past revision (2 ..= header).
                    if header >= 2 {
                        let past = 2 + rng.below(header - 1);
                        match store.range(&counters(past)) {
                            Ok(resp) => {
                                check_snapshot(&resp, past).expect("past read is one snapshot");
                                assert!(resp.header.as_ref().expect("header").revision >= header);
                            }
                            Err(MvccError::Compacted) if past_reads_may_be_compacted => {
                                assert!(
                                    past < store.compact_revision(),
                                    "Compacted for {past}, compact revision {}",
                                    store.compact_revision()
                                );
                                compacted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("read at {past}: {e:?}"),
                        }
                        reads += 1;
                    }

                    // A read-only txn: its ranges share one revision.
                    if id == 1 {
                        let t = TxnRequest {
                            compare: vec![Compare {
                                result: compare::CompareResult::Equal as i32,
                                target: compare::CompareTarget::Version as i32,
                                key: key(0),
                                range_end: Bytes::new(),
                                target_union: Some(compare::TargetUnion::Version(0)),
                            }],
                            success: vec![],
                            failure: vec![
                                RequestOp {
                                    request: Some(request_op::Request::RequestRange(counters(0))),
                                },
                                RequestOp {
                                    request: Some(request_op::Request::RequestRange(
                                        RangeRequest {
                                            key: key(7),
                                            ..Default::default()
                                        },
                                    )),
                                },
                            ],
                        };
                        let r = store.read_txn(&t).expect("read txn");
                        let rev = r.header.as_ref().expect("header").revision;
                        if rev >= 2 {
                            assert!(!r.succeeded, "k/0 exists at {rev}");
                            let ranges: Vec<&RangeResponse> = r
                                .responses
                                .iter()
                                .map(|op| match &op.response {
                                    Some(response_op::Response::ResponseRange(x)) => x,
                                    other => panic!("{other:?}"),
                                })
                                .collect();
                            check_snapshot(ranges[0], rev).expect("txn range is one snapshot");
                            assert_eq!(ranges[1].kvs, ranges[0].kvs[7..8].to_vec());
                        }
                        reads += 1;
                    }
                }
                (reads, seen)
            })
        })
        .collect();

    writer(&store);
    done.store(true, Ordering::Release);
    let mut outcome = Outcome {
        reads: 0,
        compacted: compacted.load(Ordering::Relaxed),
        revisions_seen: Default::default(),
    };
    for r in readers {
        let (reads, seen) = r.join().expect("reader thread");
        outcome.reads += reads;
        outcome.revisions_seen.extend(seen);
    }
    outcome.compacted = compacted.load(Ordering::Relaxed);
    outcome
}

const APPLIES: u64 = 1500;
const COMPACT_LAG: i64 = 100;

#[test]
fn readers_see_whole_txns_while_the_writer_applies() {
    let store = Arc::new(Store::open(Arc::new(TestEngine::from_env())).expect("open"));
    let outcome = run(
        store.clone(),
        |s| {
            for i in 1..=APPLIES {
                let res = s.apply(i, &[write_all(i)]).expect("apply").expect("fresh");
                assert!(matches!(res[0], Ok(ApplyResponse::Txn(_))));
            }
        },
        false,
    );
    assert_eq!(store.current_revision(), APPLIES as i64 + 1);
    // Every revision is still readable and whole afterwards.
    for rev in 1..=store.current_revision() {
        check_snapshot(&store.range(&counters(rev)).expect("range"), rev).expect("snapshot");
    }
    // The readers really ran alongside the writer.
    assert!(outcome.reads > 100, "only {} reads", outcome.reads);
    assert!(
        outcome.revisions_seen.len() > 2,
        "readers saw {:?}",
        outcome.revisions_seen
    );
}

#[test]
fn reads_during_compactions_are_whole_or_compacted() {
    let store = Arc::new(Store::open(Arc::new(TestEngine::from_env())).expect("open"));
    let outcome = run(
        store.clone(),
        |s| {
            let mut index = 0;
            for i in 1..=APPLIES {
                index += 1;
                s.apply(index, &[write_all(i)])
                    .expect("apply")
                    .expect("fresh")[0]
                    .as_ref()
                    .expect("txn");
                if i % 20 == 0 && s.current_revision() > COMPACT_LAG {
                    // Its own raft entry, well below the current revision.
                    index += 1;
                    let rev = s.current_revision() - COMPACT_LAG;
                    let res = s.apply(index, &[compaction(rev)]).expect("apply");
                    res.expect("fresh")[0].as_ref().expect("compaction");
                }
            }
        },
        true,
    );
    let compact = store.compact_revision();
    assert_eq!(compact, APPLIES as i64 + 1 - COMPACT_LAG);
    for rev in 1..compact {
        assert_eq!(store.range(&counters(rev)), Err(MvccError::Compacted));
    }
    for rev in compact..=store.current_revision() {
        check_snapshot(&store.range(&counters(rev)).expect("range"), rev).expect("snapshot");
    }
    assert!(outcome.reads > 100, "only {} reads", outcome.reads);
    assert!(
        outcome.compacted > 0,
        "no past read ever hit a compacted revision; the test did not exercise it"
    );
}

/// A raft entry `[txn writing revision N+1, compaction at N+1]` publishes the compact revision
/// (`Store::compact`, "Publish first") before the new current revision (end of `apply`): in
/// between, a read at the current revision N is below the compact revision and fails. etcd never
/// answers ErrCompacted for a read at its current revision (compaction can only be at or below
/// it, kvstore.go compactMainRev <= currentRev).
#[test]
fn current_revision_reads_never_fail_while_an_entry_compacts_its_own_revision() {
    let store = Arc::new(Store::open(Arc::new(TestEngine::from_env())).expect("open"));
    // Many unrelated keys make the compaction's index walk (the window) longer.
    let filler: Vec<Command> = (0..20_000)
        .map(|i| Command {
            auth: None,
            op: Some(Op::Put(PutRequest {
                key: Bytes::from(format!("filler/{i:05}")),
                value: Bytes::from_static(b"x"),
                ..Default::default()
            })),
        })
        .collect();
    store.apply(1, &[write_all(0)]).expect("apply");
    store.apply(2, &filler).expect("apply");
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, failures, done) = (store.clone(), failures.clone(), done.clone());
        thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                if let Err(MvccError::Compacted) = store.range(&counters(0)) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut index = 2;
    while Instant::now() < deadline && failures.load(Ordering::Relaxed) == 0 {
        index += 1;
        let next = store.current_revision() + 1;
        let res = store
            .apply(index, &[write_all(index), compaction(next)])
            .expect("apply")
            .expect("fresh");
        assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    }
    done.store(true, Ordering::Release);
    reader.join().expect("reader");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "reads at the current revision answered Compacted"
    );
}

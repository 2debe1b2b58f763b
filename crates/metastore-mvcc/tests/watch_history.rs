//! Writes, compactions and watchers created at random past revisions, interleaved; every
//! watcher must see exactly the history from its start revision (in order, once each), or a
//! prefix of it followed by a compaction cancel when a compaction overtook it — as etcd.
//!
//! Streams are not read until the end, so they overflow and most watchers go through the
//! catch-up path (history re-read from the store) rather than live delivery.

mod support;
use metastore_engine::Engine;
use metastore_mvcc::{Store, StreamReceiver, WatchSpec};
use metastore_proto::etcdserverpb::{
    request_op, CompactionRequest, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
    WatchResponse,
};
use metastore_proto::internal::{command::Op, Command};
use metastore_proto::mvccpb::event::EventType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::TestEngine;

#[derive(Clone, Debug, PartialEq)]
struct Ev {
    rev: i64,
    key: Vec<u8>,
    put: bool,
    value: Vec<u8>,
}

const KEYS: &[&str] = &["a", "ab", "b", "ba", "c", "d", "e", "f"];

fn put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

struct Watch {
    stream: usize,
    id: i64,
    spec: WatchSpec,
    start: i64,
    compacted_at_creation: bool,
}

fn in_range(spec: &WatchSpec, key: &[u8]) -> bool {
    if spec.range_end.is_empty() {
        key == &spec.key[..]
    } else if spec.range_end[..] == [0] {
        key >= &spec.key[..]
    } else {
        key >= &spec.key[..] && key < &spec.range_end[..]
    }
}

async fn drain(rx: &mut StreamReceiver, until_quiet: Duration) -> Vec<WatchResponse> {
    let mut out = Vec::new();
    while let Ok(Some((msg, _slot))) = tokio::time::timeout(until_quiet, rx.recv()).await {
        out.push(msg);
    }
    out
}

fn command(op: Op) -> Command {
    Command {
        auth: None,
        op: Some(op),
    }
}

/// Applies the pending writes as one raft entry, published in parts of `part_len`.
/// Creates a watcher with a random key range and start (now, in the past or in the future)
/// on a random stream.
fn add_watch(
    store: &Store<TestEngine>,
    streams: &[(u64, StreamReceiver)],
    rng: &mut StdRng,
    watches: &mut Vec<Watch>,
) {
    // Between the parts of an entry this is the part published last.
    let rev = store.current_revision();
    let (key, range_end) = match rng.random_range(0..3) {
        0 => (
            KEYS[rng.random_range(0..KEYS.len())].to_string(),
            String::new(),
        ),
        1 => ("a".to_string(), "b".to_string()),
        _ => ("\0".to_string(), "\0".to_string()),
    };
    let compact = store.compact_revision();
    let start = match rng.random_range(0..4) {
        0 => 0,
        1 => rev + rng.random_range(1..3),
        _ => rng.random_range(1..=rev.max(1)),
    };
    let spec = WatchSpec {
        key: key.into_bytes().into(),
        range_end: range_end.into_bytes().into(),
        start_revision: start,
        ..Default::default()
    };
    let s = rng.random_range(0..streams.len());
    let id = store
        .watch(streams[s].0, spec.clone())
        .expect("watch created");
    let effective = if start == 0 { rev + 1 } else { start };
    watches.push(Watch {
        stream: s,
        id,
        spec,
        start: effective,
        compacted_at_creation: effective < compact,
    });
}

/// `between_parts` runs after each part but the last, while the rest of the entry waits.
fn apply_entry(
    store: &Store<TestEngine>,
    index: &mut u64,
    pending: &mut Vec<Command>,
    part_len: usize,
    between_parts: &mut dyn FnMut(),
) {
    if pending.is_empty() {
        return;
    }
    *index += 1;
    let (total, mut delivered) = (pending.len(), 0);
    let applied = store
        .apply_in_parts(*index, pending, part_len, &mut |part| {
            delivered += part.len();
            for result in part {
                result.expect("write ok");
            }
            if delivered < total {
                between_parts();
            }
        })
        .expect("apply");
    assert!(applied, "fresh index");
    pending.clear();
}

async fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let store = Arc::new(Store::open(Arc::new(TestEngine::from_env())).expect("open"));
    store.spawn_watch_sync().expect("sync thread");
    let mut streams: Vec<(u64, StreamReceiver)> =
        (0..2).map(|_| store.open_watch_stream()).collect();
    let mut watches: Vec<Watch> = Vec::new();
    let mut history: Vec<Ev> = Vec::new();
    let mut live: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut index = 0u64;
    // Writes gather into entries of several commands, which the memory engine applies and
    // publishes in parts: watchers must see no difference.
    let mut pending: Vec<Command> = Vec::new();
    let mut mid_entry_watches = 0;
    // The revision the store reaches once the pending writes are applied.
    let mut rev = store.current_revision();

    for step in 0..400 {
        if rng.random_bool(0.4) || pending.len() >= 8 {
            let part_len = rng.random_range(1..4);
            // Watchers also start while an entry is half applied.
            let mut between_parts = || {
                if rng.random_bool(0.3) {
                    add_watch(&store, &streams, &mut rng, &mut watches);
                    mid_entry_watches += 1;
                }
            };
            apply_entry(
                &store,
                &mut index,
                &mut pending,
                part_len,
                &mut between_parts,
            );
        }
        match rng.random_range(0..100) {
            0..=44 => {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                let value = format!("v{step}");
                pending.push(command(Op::Put(
                    put(key, &value)
                        .request
                        .map(|r| match r {
                            request_op::Request::RequestPut(p) => p,
                            _ => unreachable!(),
                        })
                        .expect("put"),
                )));
                rev += 1;
                history.push(Ev {
                    rev,
                    key: key.into(),
                    put: true,
                    value: value.clone().into(),
                });
                live.insert(key.into(), value.into());
            }
            45..=59 => {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                pending.push(command(Op::DeleteRange(DeleteRangeRequest {
                    key: key.as_bytes().to_vec().into(),
                    ..Default::default()
                })));
                if live.remove(key.as_bytes()).is_some() {
                    rev += 1;
                    history.push(Ev {
                        rev,
                        key: key.into(),
                        put: false,
                        value: vec![],
                    });
                }
            }
            60..=69 => {
                // One revision, several keys (sub revisions in key order given).
                let mut keys: Vec<&str> = KEYS
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.3))
                    .collect();
                keys.dedup();
                if keys.is_empty() {
                    continue;
                }
                let value = format!("t{step}");
                pending.push(command(Op::Txn(TxnRequest {
                    compare: vec![],
                    success: keys.iter().map(|k| put(k, &value)).collect(),
                    failure: vec![],
                })));
                rev += 1;
                for k in keys {
                    history.push(Ev {
                        rev,
                        key: k.into(),
                        put: true,
                        value: value.clone().into(),
                    });
                    live.insert(k.into(), value.clone().into());
                }
            }
            70..=74 if rev > 2 => {
                apply_entry(&store, &mut index, &mut pending, usize::MAX, &mut || {});
                let at = rng.random_range(store.compact_revision().max(1) + 1..=rev);
                // Compacting at a delete removes its tombstone, so a watcher catching up from
                // exactly that revision would miss the delete without being canceled (etcd
                // does the same: only watchers from below the compact revision are canceled).
                // Keep the expected history unambiguous.
                if history.iter().any(|e| e.rev == at && !e.put) {
                    continue;
                }
                index += 1;
                store
                    .apply(
                        index,
                        &[command(Op::Compaction(CompactionRequest {
                            revision: at,
                            physical: true,
                        }))],
                    )
                    .expect("apply")
                    .expect("fresh index");
            }
            _ => {
                // A watcher's start is relative to what the store has applied.
                let part_len = rng.random_range(1..4);
                apply_entry(&store, &mut index, &mut pending, part_len, &mut || {});
                add_watch(&store, &streams, &mut rng, &mut watches);
            }
        }
    }

    apply_entry(&store, &mut index, &mut pending, 2, &mut || {});
    assert_eq!(
        store.current_revision(),
        rev,
        "seed {seed}: revisions went astray"
    );

    // Read everything now; the catch-up loop delivers as room frees up.
    let mut received: Vec<Vec<WatchResponse>> = Vec::new();
    for (_, rx) in &mut streams {
        received.push(drain(rx, Duration::from_millis(300)).await);
    }
    let current = store.current_revision();
    assert!(!watches.is_empty());
    let mut caught_up = 0;
    for w in &watches {
        let msgs: Vec<&WatchResponse> = received[w.stream]
            .iter()
            .filter(|m| m.watch_id == w.id)
            .collect();
        assert!(
            msgs.first().is_some_and(|m| m.created),
            "seed {seed}: watcher {} has no created response first",
            w.id
        );
        let got: Vec<Ev> = msgs
            .iter()
            .flat_map(|m| m.events.iter())
            .map(|e| {
                let kv = e.kv.clone().expect("kv");
                Ev {
                    rev: kv.mod_revision,
                    key: kv.key.to_vec(),
                    put: e.r#type == EventType::Put as i32,
                    value: kv.value.to_vec(),
                }
            })
            .collect();
        let want: Vec<Ev> = history
            .iter()
            .filter(|e| e.rev >= w.start && in_range(&w.spec, &e.key))
            .cloned()
            .collect();
        let canceled = msgs.iter().find(|m| m.canceled);
        match canceled {
            Some(c) => {
                assert!(
                    c.compact_revision > 0,
                    "seed {seed}: only compaction cancels here"
                );
                assert!(
                    w.start < c.compact_revision,
                    "seed {seed}: canceled although it started at {} >= {}",
                    w.start,
                    c.compact_revision
                );
                assert_eq!(
                    &got[..],
                    &want[..got.len()],
                    "seed {seed}: watcher {} saw something other than a prefix",
                    w.id
                );
                assert!(
                    msgs.last().is_some_and(|m| m.canceled),
                    "seed {seed}: events after cancel"
                );
            }
            None => {
                assert!(!w.compacted_at_creation, "seed {seed}: watcher {} started below the compact revision but was not canceled", w.id);
                assert_eq!(
                    got, want,
                    "seed {seed}: watcher {} (start {}, current {current})",
                    w.id, w.start
                );
                caught_up += 1;
            }
        }
        // Events of one revision never span two responses.
        let mut seen_revs = std::collections::HashSet::new();
        for m in &msgs {
            let revs: std::collections::BTreeSet<i64> = m
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| kv.mod_revision)
                .collect();
            for r in revs {
                assert!(
                    seen_revs.insert(r),
                    "seed {seed}: revision {r} split across responses"
                );
            }
        }
    }
    assert!(caught_up > 0, "seed {seed}: no watcher completed");
    // A persistent engine (RocksDB) never splits an entry.
    assert!(
        mid_entry_watches > 0 || store.engine().is_persistent(),
        "seed {seed}: no watcher started between the parts of an entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_exactly_the_history_from_their_start() {
    for seed in 0..6 {
        run(seed).await;
    }
}

/// Catch-up over revisions of large values: each history read stops between revisions after
/// ~4 MiB, and messages are ~64 KiB; a watcher from the start must still get every revision,
/// in order, once, including a revision of several large puts (a txn) that is never split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_over_large_values_reads_in_bounded_steps_and_misses_nothing() {
    let store = Arc::new(Store::open(Arc::new(TestEngine::from_env())).expect("open"));
    store.spawn_watch_sync().expect("sync thread");
    let big = |i: usize| format!("{i:04}").repeat(64 * 1024); // 256 KiB
    let mut index = 0u64;
    let mut pending = Vec::new();
    let mut expected = Vec::new();
    for i in 0..40 {
        let ops = if i % 10 == 9 {
            // One revision holding three large puts.
            vec![put("a", &big(i)), put("b", &big(i)), put("c", &big(i))]
        } else {
            vec![put("a", &big(i))]
        };
        for op in &ops {
            if let Some(request_op::Request::RequestPut(p)) = &op.request {
                expected.push((p.key.to_vec(), p.value.len()));
            }
        }
        pending.push(command(Op::Txn(TxnRequest {
            success: ops,
            ..Default::default()
        })));
        apply_entry(&store, &mut index, &mut pending, 64, &mut || {});
    }
    // Watch everything from revision 1 only now: all of it comes from history.
    let (stream, mut rx) = store.open_watch_stream();
    store
        .watch(
            stream,
            WatchSpec {
                key: vec![0u8].into(),
                range_end: vec![0u8].into(),
                start_revision: 1,
                ..Default::default()
            },
        )
        .expect("watch created");
    let mut got = Vec::new();
    let mut revisions = Vec::new();
    let mut previous_last = 0;
    while got.len() < expected.len() {
        let msg = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("events within 20 s")
            .expect("stream open")
            .0;
        for ev in &msg.events {
            let kv = ev.kv.as_ref().expect("kv");
            got.push((kv.key.to_vec(), kv.value.len()));
            revisions.push(kv.mod_revision);
        }
        // A revision is never split across messages: each starts past the previous one's last.
        let rev =
            |e: &metastore_proto::mvccpb::Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        if let (Some(first), Some(last)) = (msg.events.first(), msg.events.last()) {
            assert!(rev(first) > previous_last, "revision {} split", rev(first));
            previous_last = rev(last);
        }
    }
    assert_eq!(got, expected);
    let mut sorted = revisions.clone();
    sorted.sort_unstable();
    assert_eq!(revisions, sorted, "in revision order");
}

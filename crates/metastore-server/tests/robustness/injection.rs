//! The harness can fail: a real history from a fault-free run checks as linearizable, and the
//! same history with one stale read, or with an acknowledged write that no read ever sees,
//! does not. Without this a checker that passed everything would make every other test here
//! pass too.

use crate::cluster_harness::Cluster;
use crate::workload::Workload;
use crate::{endpoints, SERIAL};
use metastore_checker::{check, CheckResult, Input, KeyValue, Operation, Outcome, Response};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// An acknowledged write of one key: its revision, what it left (None for a delete), and when
/// its client heard back.
struct Write {
    revision: i64,
    after: Option<KeyValue>,
    ret: u64,
}

/// Per key, every acknowledged write in revision order with the state it left; keys with an
/// unknown write are left out, since their states are not known for sure.
fn replay(history: &[Operation]) -> BTreeMap<String, Vec<Write>> {
    let mut writes: BTreeMap<String, Vec<(i64, Option<String>, u64)>> = BTreeMap::new();
    let mut uncertain = Vec::new();
    for op in history {
        let key = op.key().unwrap_or_default().to_string();
        let effect = match (&op.input, &op.outcome) {
            (Input::Get { .. }, _) => continue,
            (_, Outcome::Unknown) => {
                uncertain.push(key);
                continue;
            }
            (Input::Put { value, .. }, Outcome::Ok(Response::Put { header_revision })) => {
                (*header_revision, Some(value.clone()))
            }
            (
                Input::CasPut { value, .. },
                Outcome::Ok(Response::CasPut {
                    header_revision,
                    succeeded: true,
                    ..
                }),
            ) => (*header_revision, Some(value.clone())),
            (
                Input::Delete { .. },
                Outcome::Ok(Response::Delete {
                    header_revision,
                    deleted: 1,
                }),
            ) => (*header_revision, None),
            _ => continue,
        };
        writes
            .entry(key)
            .or_default()
            .push((effect.0, effect.1, op.ret));
    }
    let mut out = BTreeMap::new();
    for (key, mut ws) in writes {
        if uncertain.contains(&key) {
            continue;
        }
        ws.sort_by_key(|w| w.0);
        let mut state: Option<KeyValue> = None;
        let mut replayed = Vec::new();
        for (revision, value, ret) in ws {
            state = value.map(|value| KeyValue {
                value,
                mod_revision: revision,
                create_revision: state.as_ref().map_or(revision, |s| s.create_revision),
                version: state.as_ref().map_or(1, |s| s.version + 1),
                lease: 0,
            });
            replayed.push(Write {
                revision,
                after: state.clone(),
                ret,
            });
        }
        out.insert(key, replayed);
    }
    out
}

/// A linearizable get whose answer was written by a write that had returned before the get
/// was called: the index of the get and the state before that write.
fn stale_candidates(history: &[Operation]) -> Vec<(usize, Option<KeyValue>)> {
    let writes = replay(history);
    let mut out = Vec::new();
    for (i, op) in history.iter().enumerate() {
        let (
            Input::Get {
                key,
                serializable: false,
            },
            Outcome::Ok(Response::Get { kv: Some(kv), .. }),
        ) = (&op.input, &op.outcome)
        else {
            continue;
        };
        let Some(ws) = writes.get(key) else { continue };
        let Some(p) = ws.iter().position(|w| w.revision == kv.mod_revision) else {
            continue;
        };
        if ws[p].ret < op.call {
            let before = p.checked_sub(1).and_then(|q| ws[q].after.clone());
            out.push((i, before));
        }
    }
    out
}

fn set_read(op: &mut Operation, state: Option<KeyValue>) {
    match &mut op.outcome {
        Outcome::Ok(Response::Get { kv, .. })
        | Outcome::Ok(Response::CasPut {
            succeeded: false,
            kv,
            ..
        }) => *kv = state,
        _ => {}
    }
}

fn read_revision(op: &Operation) -> Option<i64> {
    match &op.outcome {
        Outcome::Ok(Response::Get { kv: Some(kv), .. })
        | Outcome::Ok(Response::CasPut {
            succeeded: false,
            kv: Some(kv),
            ..
        }) => Some(kv.mod_revision),
        _ => None,
    }
}

fn assert_caught(history: &[Operation], what: &str) {
    match check(history, Duration::from_secs(30)) {
        Ok(CheckResult::NotLinearizable { key, explanation }) => {
            println!("{what} caught on key {key:?}:\n{explanation}");
        }
        other => panic!("{what} was not caught: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_stale_read_and_a_lost_write() {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::start(3);
    cluster.leader(Duration::from_secs(30)).await;
    let load = Workload::start(&endpoints(&cluster), 1, Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.stop().await;
    assert_eq!(
        check(&history, Duration::from_secs(30)).expect("a well-formed history"),
        CheckResult::Linearizable,
        "the fault-free history must pass, or the injected faults below prove nothing"
    );

    // A stale read: one get answers the value its key had before a write that had already
    // returned when the get was called.
    let candidates = stale_candidates(&history);
    let (g, before) = candidates
        .first()
        .cloned()
        .expect("the run produced no get after a completed write of the value it read");
    let mut stale = history.clone();
    set_read(&mut stale[g], before);
    assert_caught(&stale, "a stale read");

    // A lost write: an acknowledged write whose value no read ever returns, while a get
    // called after it returned answers the state before it.
    let (g, before) = candidates.last().cloned().expect("a candidate");
    let revision = read_revision(&history[g]).expect("the chosen get read a value");
    let mut lost = history.clone();
    for op in lost.iter_mut() {
        if op.key() == history[g].key() && read_revision(op) == Some(revision) {
            set_read(op, before.clone());
        }
    }
    assert_caught(&lost, "a lost write");
}

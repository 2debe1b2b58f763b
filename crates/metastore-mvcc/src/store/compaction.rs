//! Physical compaction in bounded steps. Applying a `Compaction` only publishes the new compact
//! revision (reads below it are refused from then on) and hands the job over; the records it
//! makes unreachable are dropped from the key index and the engine `COMPACTION_BATCH_KEYS` keys
//! at a time, each step under the writer lock, so the apply loop waits for at most one step,
//! never for a whole compaction of millions of keys (etcd's compaction batches, for the same
//! reason). Reads are not affected either way: a compaction only drops revisions no read at or
//! above the compact revision can see.
//!
//! Before `spawn_compactor` (tools, tests, `Store::open`) the steps run at once, in the caller.

use super::{rev_key, Store};
use crate::MvccError;
use bytes::Bytes;
use metastore_engine::{Engine, Space, WriteBatch};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keys compacted per step (etcd's `--experimental-compaction-batch-limit` default).
const COMPACTION_BATCH_KEYS: usize = 1000;

#[derive(Default)]
struct Job {
    /// The revision records are being compacted to (-1 or 0: none asked yet).
    target: i64,
    /// Keys up to and including this one are compacted to `target`; None: start at the first.
    cursor: Option<Bytes>,
    /// Compaction is physically finished up to this revision.
    done: i64,
    /// When the current job began (for its total duration).
    started: Option<Instant>,
    /// A background thread runs the steps.
    background: bool,
}

#[derive(Default)]
pub(super) struct Compaction {
    job: Mutex<Job>,
    /// Signalled when a job is scheduled or finished.
    changed: Condvar,
}

impl<E: Engine> Store<E> {
    /// Drops what a compaction at `rev` makes unreachable: hands it to the compactor thread, or
    /// does it at once without one. Callers hold the writer lock and have published `rev`.
    pub(super) fn schedule_compaction(&self, rev: i64) -> Result<(), MvccError> {
        let background = {
            let mut job = self.compaction.job.lock();
            if rev <= job.done && job.done >= job.target {
                return Ok(());
            }
            // Keys already walked were compacted to the old target only: start over.
            job.target = job.target.max(rev);
            job.cursor = None;
            job.started.get_or_insert_with(Instant::now);
            job.background
        };
        if background {
            self.compaction.changed.notify_all();
            return Ok(());
        }
        while !self.compaction_step()? {}
        Ok(())
    }

    /// One step of the current job; true once nothing is left to do. Callers hold the writer
    /// lock: the step removes emptied keys from the index, which only the writer may do.
    fn compaction_step(&self) -> Result<bool, MvccError> {
        let (target, cursor) = {
            let job = self.compaction.job.lock();
            if job.done >= job.target {
                return Ok(true);
            }
            (job.target, job.cursor.clone())
        };
        let (dropped, next) =
            self.index
                .compact_step(target, cursor.as_ref(), COMPACTION_BATCH_KEYS);
        let keys: Vec<Bytes> = dropped
            .into_iter()
            .map(|d| rev_key(d.rev, d.tombstone))
            .collect();
        metrics::counter!("etcd_debugging_mvcc_db_compaction_keys_total")
            .increment(keys.len() as u64);
        if self.snapshot_scan.load(Ordering::Acquire) > 0 {
            // A snapshot capture is still reading the records of its state: leave them until
            // it is done (readers never reach them: the index no longer points to them).
            self.deferred_deletes.lock().extend(keys);
        } else {
            self.flush_deferred_deletes()?;
            if !keys.is_empty() {
                let mut batch = WriteBatch::new();
                for k in keys {
                    batch.delete(Space::Kv, k);
                }
                self.engine.write(batch)?;
            }
        }
        let mut job = self.compaction.job.lock();
        match next {
            Some(key) => {
                job.cursor = Some(key);
                Ok(false)
            }
            None => {
                job.done = target;
                job.cursor = None;
                if let Some(started) = job.started.take() {
                    metrics::histogram!(
                        "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds"
                    )
                    .record(started.elapsed().as_secs_f64() * 1000.0);
                }
                self.compaction.changed.notify_all();
                Ok(true)
            }
        }
    }

    /// Runs compaction steps on a thread of their own from now on. A failing step (the engine
    /// refused a delete) stops the process: the state machine can no longer be trusted.
    pub fn spawn_compactor(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        self.compaction.job.lock().background = true;
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("compactor".into())
            .spawn(move || {
                let _abort = AbortOnPanic;
                loop {
                    let Some(store) = weak.upgrade() else { return };
                    {
                        let mut job = store.compaction.job.lock();
                        if job.done >= job.target {
                            // Woken by a new job; the timeout lets the thread end with the store.
                            store
                                .compaction
                                .changed
                                .wait_for(&mut job, Duration::from_millis(500));
                            continue;
                        }
                    }
                    let paused = Instant::now();
                    let step = {
                        let _writer = store.writer.lock();
                        store.compaction_step()
                    };
                    metrics::histogram!(
                        "etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds"
                    )
                    .record(paused.elapsed().as_secs_f64() * 1000.0);
                    if let Err(e) = step {
                        tracing::error!(error = %e, "physical compaction failed");
                        panic!("physical compaction failed: {e}");
                    }
                    drop(store);
                    // Lets the apply loop take the writer lock between steps.
                    std::thread::yield_now();
                }
            })
    }

    /// Forgets the job in progress: the state was replaced (a leader's snapshot installed) and
    /// its records are compacted to `compact` from the first key.
    pub(super) fn restart_compaction(&self, compact: i64) -> Result<(), MvccError> {
        {
            let mut job = self.compaction.job.lock();
            job.target = -1;
            job.done = -1;
            job.cursor = None;
        }
        if compact > 0 {
            self.schedule_compaction(compact)?;
        }
        Ok(())
    }

    /// Whether compaction up to `rev` is physically done.
    pub fn physically_compacted(&self, rev: i64) -> bool {
        self.compaction.job.lock().done >= rev
    }

    /// Waits until compaction up to `rev` is physically done (a `Compaction` with `physical`
    /// set answers only then, as etcd's does), or `timeout` passes; true if it is done.
    pub fn wait_physically_compacted(&self, rev: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut job = self.compaction.job.lock();
        while job.done < rev {
            if self
                .compaction
                .changed
                .wait_until(&mut job, deadline)
                .timed_out()
            {
                return job.done >= rev;
            }
        }
        true
    }
}

/// A panic on the compactor thread would otherwise end only that thread and leave compaction
/// stopped for good while the member goes on: it stops the process, loudly.
struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the compactor thread panicked: stopping the process");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_memory::MemoryEngine;
    use metastore_proto::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest};
    use metastore_proto::internal::{command::Op, Command};
    use std::ops::Bound;

    fn put(key: String, value: &str) -> Command {
        Command {
            auth: None,
            op: Some(Op::Put(PutRequest {
                key: key.into_bytes().into(),
                value: value.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn compact(revision: i64) -> Command {
        Command {
            auth: None,
            op: Some(Op::Compaction(CompactionRequest {
                revision,
                physical: false,
            })),
        }
    }

    fn records(store: &Store<MemoryEngine>) -> usize {
        let mut n = 0;
        store
            .engine()
            .scan(
                Space::Kv,
                (Bound::Unbounded, Bound::Unbounded),
                &mut |_, _| {
                    n += 1;
                    true
                },
            )
            .expect("scan");
        n
    }

    fn value(store: &Store<MemoryEngine>, key: &str) -> Vec<u8> {
        let resp = store
            .range(&RangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .expect("range");
        resp.kvs
            .first()
            .map(|kv| kv.value.to_vec())
            .unwrap_or_default()
    }

    const KEYS: usize = 3500;

    /// Three versions of each of `KEYS` keys; returns the store and the next raft index.
    fn store_with_history() -> (Store<MemoryEngine>, u64) {
        let store = Store::open(Arc::new(MemoryEngine::new())).expect("open");
        let mut index = 0;
        for round in 0..3 {
            let cmds: Vec<Command> = (0..KEYS)
                .map(|i| put(format!("k{i:05}"), &format!("v{round}")))
                .collect();
            index += 1;
            store.apply(index, &cmds).expect("apply");
        }
        (store, index + 1)
    }

    #[test]
    fn applying_a_compaction_leaves_the_records_to_bounded_steps() {
        let (store, mut index) = store_with_history();
        // What spawn_compactor sets, without its thread: the steps are run by hand here.
        store.compaction.job.lock().background = true;
        let rev = store.current_revision();
        store.apply(index, &[compact(rev)]).expect("compact");
        index += 1;
        // The apply loop did not drop anything itself, however many keys there are.
        assert_eq!(records(&store), 3 * KEYS);
        assert!(!store.physically_compacted(rev));
        let mut steps = 0;
        loop {
            let done = {
                let _writer = store.writer.lock();
                store.compaction_step().expect("step")
            };
            steps += 1;
            // Writes between steps, before and after the cursor, are never lost.
            let cmds = vec![
                put("k00000".into(), &format!("after-step-{steps}")),
                put(format!("k{:05}", KEYS - 1), &format!("after-step-{steps}")),
            ];
            store.apply(index, &cmds).expect("apply between steps");
            index += 1;
            if done {
                break;
            }
        }
        assert_eq!(steps, KEYS.div_ceil(COMPACTION_BATCH_KEYS));
        assert!(store.physically_compacted(rev));
        // One record per key survives the compaction, plus the writes made meanwhile.
        assert_eq!(records(&store), KEYS + 2 * steps);
        let last = format!("after-step-{steps}").into_bytes();
        assert_eq!(value(&store, "k00000"), last);
        assert_eq!(value(&store, &format!("k{:05}", KEYS - 1)), last);
        assert_eq!(value(&store, "k01234"), b"v2".to_vec());
    }

    #[test]
    fn a_newer_compaction_mid_way_starts_over_from_the_first_key() {
        let (store, mut index) = store_with_history();
        store.compaction.job.lock().background = true;
        // A compaction at revision 2 (the first put: nothing to drop), then, one step in, one
        // at the last revision.
        store.apply(index, &[compact(2)]).expect("compact");
        index += 1;
        {
            let _writer = store.writer.lock();
            assert!(!store.compaction_step().expect("step"));
        }
        let rev = store.current_revision();
        store.apply(index, &[compact(rev)]).expect("compact again");
        loop {
            let _writer = store.writer.lock();
            if store.compaction_step().expect("step") {
                break;
            }
        }
        // Had the second job resumed at the first one's cursor, the first keys would keep
        // their second version.
        assert_eq!(records(&store), KEYS);
    }

    #[test]
    fn the_compactor_thread_finishes_the_job_and_physical_waits_for_it() {
        let (store, index) = store_with_history();
        let store = Arc::new(store);
        store.spawn_compactor().expect("spawn");
        let rev = store.current_revision();
        store.apply(index, &[compact(rev)]).expect("compact");
        assert!(store.wait_physically_compacted(rev, Duration::from_secs(30)));
        assert_eq!(records(&store), KEYS);
    }
}

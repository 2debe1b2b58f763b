//! The requests kube-apiserver sends etcd, as its storage layer (`k8s.io/apiserver`'s etcd3
//! store) builds them: creates and deletes and updates as txns guarded by a revision, quorum
//! gets, and lists in pages at one pinned revision.

use super::objects::{parse_value, prefix_end, Layout, Live, Owned};
use crate::error_label;
use crate::report::{Outcome, Recorder};
use etcd_client::{Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp};
use std::time::Instant;

/// The operations of the closed-loop clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    Update,
    Create,
    Delete,
}

pub(crate) const OPS: [Op; 4] = [Op::Get, Op::Update, Op::Create, Op::Delete];

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Update => "update",
            Op::Create => "create",
            Op::Delete => "delete",
        }
    }
}

/// One closed-loop client: the objects it owns, what it measured, and the writes the server
/// acknowledged per type (what each type's watch must deliver).
pub(crate) struct K8sClient {
    pub(crate) kv: KvClient,
    pub(crate) owned: Owned,
    pub(crate) recs: [Recorder; 4],
    pub(crate) acked_writes: Vec<u64>,
    /// Writes that failed: the server may or may not have applied them.
    pub(crate) uncertain_writes: u64,
}

impl K8sClient {
    pub(crate) fn new(kv: KvClient, client: usize, clients: usize, types: usize) -> Self {
        Self {
            kv,
            owned: Owned::new(client, clients),
            recs: std::array::from_fn(|_| Recorder::new()),
            acked_writes: vec![0; types],
            uncertain_writes: 0,
        }
    }

    /// Creates this client's share of objects `0..objects`; fails on the first error.
    pub(crate) async fn load(
        &mut self,
        layout: &Layout,
        objects: u64,
        epoch: Instant,
    ) -> anyhow::Result<()> {
        while self.owned.next_id < objects {
            match self.create(layout, epoch).await {
                Outcome::Ok { .. } => {}
                Outcome::Failed(why) | Outcome::CheckFailed(why) => {
                    anyhow::bail!("loading object {}: {why}", self.owned.next_id)
                }
            }
        }
        // The load is not the measured run.
        self.acked_writes.iter_mut().for_each(|n| *n = 0);
        Ok(())
    }

    /// Runs one operation and records it under its kind.
    pub(crate) async fn step(&mut self, op: Op, layout: &Layout, epoch: Instant) {
        // Nothing left to read, update or delete: make something.
        let op = if self.owned.live.is_empty() {
            Op::Create
        } else {
            op
        };
        let started = Instant::now();
        let outcome = match op {
            Op::Get => self.get(layout).await,
            Op::Update => self.update(layout, epoch).await,
            Op::Create => self.create(layout, epoch).await,
            Op::Delete => self.delete(layout).await,
        };
        let slot = OPS.iter().position(|&o| o == op).unwrap_or(0);
        // A get's answer was compared with what this client wrote: a check that passed.
        let checked = op == Op::Get && matches!(outcome, Outcome::Ok { .. });
        self.recs[slot].record(started.elapsed(), outcome);
        if checked {
            self.recs[slot].checks.pass();
        }
    }

    /// A quorum read of one owned object, checked against what this client last wrote.
    async fn get(&mut self, layout: &Layout) -> Outcome {
        let i = self.owned.pick();
        let obj = self.owned.live[i];
        let resp = match self.kv.get(layout.key(obj.id), None).await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(error_label(&e)),
        };
        let Some(kv) = resp.kvs().first() else {
            return Outcome::CheckFailed(format!("object {} is missing", obj.id));
        };
        let header = parse_value(kv.value()).map(|(_, id, gen)| (id, gen));
        if kv.mod_revision() != obj.mod_rev || header != Some((obj.id, obj.gen)) {
            return Outcome::CheckFailed(format!(
                "object {} read at mod_revision {} ({header:?}); written at {} (generation {})",
                obj.id,
                kv.mod_revision(),
                obj.mod_rev,
                obj.gen
            ));
        }
        Outcome::Ok { items: 1 }
    }

    /// kube-apiserver's GuaranteedUpdate: put if the object is still at the revision read,
    /// else read it back.
    async fn update(&mut self, layout: &Layout, epoch: Instant) -> Outcome {
        let i = self.owned.pick();
        let obj = self.owned.live[i];
        let key = layout.key(obj.id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                obj.mod_rev,
            )])
            .and_then([TxnOp::put(
                key.clone(),
                layout.value(obj.id, obj.gen + 1, epoch),
                None,
            )])
            .or_else([TxnOp::get(key, None)]);
        match self.guarded(txn, obj.id, layout).await {
            Ok(rev) => {
                self.owned.live[i] = Live {
                    mod_rev: rev,
                    gen: obj.gen + 1,
                    ..obj
                };
                Outcome::Ok { items: 1 }
            }
            Err(outcome) => {
                self.owned.live.swap_remove(i);
                outcome
            }
        }
    }

    /// kube-apiserver's Create: put only if the key has never been created (or was deleted).
    async fn create(&mut self, layout: &Layout, epoch: Instant) -> Outcome {
        let id = self.owned.take_next_id();
        let key = layout.key(id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), layout.value(id, 0, epoch), None)])
            .or_else([TxnOp::get(key, None)]);
        match self.guarded(txn, id, layout).await {
            Ok(rev) => {
                self.owned.live.push(Live {
                    id,
                    mod_rev: rev,
                    gen: 0,
                });
                Outcome::Ok { items: 1 }
            }
            Err(outcome) => outcome,
        }
    }

    /// kube-apiserver's Delete with its revision precondition.
    async fn delete(&mut self, layout: &Layout) -> Outcome {
        let i = self.owned.pick();
        let obj = self.owned.live.swap_remove(i);
        let key = layout.key(obj.id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                obj.mod_rev,
            )])
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        match self.guarded(txn, obj.id, layout).await {
            Ok(_) => Outcome::Ok { items: 1 },
            Err(outcome) => outcome,
        }
    }

    /// Sends a guarded write; `Ok(revision)` when it applied. A failed guard is the server's
    /// error (nobody else writes this client's objects); a failed request leaves the object's
    /// state unknown, so the caller forgets it.
    async fn guarded(&mut self, txn: Txn, id: u64, layout: &Layout) -> Result<i64, Outcome> {
        let t = layout.type_of(id);
        match self.kv.txn(txn).await {
            Ok(resp) if resp.succeeded() => {
                self.acked_writes[t] += 1;
                Ok(resp.header().map_or(0, |h| h.revision()))
            }
            Ok(_) => Err(Outcome::CheckFailed(format!(
                "the guard on object {id} failed though only this client writes it"
            ))),
            Err(e) => {
                self.uncertain_writes += 1;
                Err(Outcome::Failed(error_label(&e)))
            }
        }
    }
}

/// One whole list of a type across namespaces, as an informer's relist or `kubectl get -A`
/// does it: pages of `page` objects, the first at the current revision and the rest pinned
/// to it; every page must agree with the first page's `count`.
pub(crate) async fn list(kv: &mut KvClient, prefix: &[u8], page: i64) -> (Outcome, u64) {
    let end = prefix_end(prefix);
    let mut key = prefix.to_vec();
    let mut pinned: Option<i64> = None;
    let mut first_count: Option<i64> = None;
    let mut items: u64 = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if let Some(rev) = pinned {
            options = options.with_revision(rev);
        }
        let resp = match kv.get(key.clone(), Some(options)).await {
            Ok(r) => r,
            Err(e) => return (Outcome::Failed(error_label(&e)), items),
        };
        let rev = resp.header().map_or(0, |h| h.revision());
        let pinned_rev = *pinned.get_or_insert(rev);
        let total = *first_count.get_or_insert(resp.count());
        if resp.count() != total - items as i64 {
            return (
                Outcome::CheckFailed(format!(
                    "a page at revision {pinned_rev} counts {} keys left, {} expected",
                    resp.count(),
                    total - items as i64
                )),
                items,
            );
        }
        items += resp.kvs().len() as u64;
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                key = last.key().to_vec();
                key.push(0);
            }
            _ => break,
        }
    }
    let total = first_count.unwrap_or(0);
    if items as i64 != total {
        return (
            Outcome::CheckFailed(format!("a list returned {items} of {total} objects")),
            items,
        );
    }
    (Outcome::Ok { items: 1 }, items)
}

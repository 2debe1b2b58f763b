//! The replicated member table, as etcd keeps it in its `members` and `members_removed`
//! buckets: each member's raft attributes (id, peer URLs, learner flag; changed through raft
//! conf changes and `MemberUpdate`), the attributes each member publishes once it serves
//! (name, client URLs: etcd's `ClusterMemberAttrSet`), and the ids removed for good. It lives
//! in the state machine, so it survives restarts and travels in snapshots.

use super::{Store, WriteCtx};
use crate::MvccError;
use metastore_engine::{Engine, Space};
use metastore_proto::internal::{member_change::Kind, MemberAttrSet, MemberChange, MemberRecord};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

const META_MEMBER_PREFIX: &[u8] = b"member_attr/";
const META_RAFT_MEMBER_PREFIX: &[u8] = b"member_raft/";
const META_REMOVED_PREFIX: &[u8] = b"member_removed/";

fn key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Everything the state machine knows about the members.
pub(super) struct MemberTable {
    attrs: parking_lot::RwLock<BTreeMap<u64, MemberAttrSet>>,
    raft: parking_lot::RwLock<BTreeMap<u64, MemberRecord>>,
    removed: parking_lot::RwLock<BTreeSet<u64>>,
    /// Bumped on every change of the raft attributes or the removed set.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl MemberTable {
    pub(super) fn load(engine: &dyn Engine) -> Result<MemberTable, MvccError> {
        let table = MemberTable {
            attrs: Default::default(),
            raft: Default::default(),
            removed: Default::default(),
            epoch: tokio::sync::watch::channel(0).0,
        };
        table.reload(engine)?;
        Ok(table)
    }

    pub(super) fn reload(&self, engine: &dyn Engine) -> Result<(), MvccError> {
        let attrs = scan_decoded::<MemberAttrSet>(engine, META_MEMBER_PREFIX)?
            .into_iter()
            .map(|a| (a.member_id, a))
            .collect();
        let raft = scan_decoded::<MemberRecord>(engine, META_RAFT_MEMBER_PREFIX)?
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        let mut removed = BTreeSet::new();
        scan(engine, META_REMOVED_PREFIX, &mut |k, _| {
            if let Some(id) = k
                .get(META_REMOVED_PREFIX.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
            {
                removed.insert(u64::from_be_bytes(id));
            }
        })?;
        *self.attrs.write() = attrs;
        *self.raft.write() = raft;
        *self.removed.write() = removed;
        self.epoch.send_modify(|e| *e += 1);
        Ok(())
    }
}

fn scan(
    engine: &dyn Engine,
    prefix: &[u8],
    each: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<(), MvccError> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    engine.scan(
        Space::Meta,
        (Bound::Included(prefix), Bound::Excluded(&end[..])),
        &mut |k, v| {
            each(k, v);
            true
        },
    )?;
    Ok(())
}

fn scan_decoded<M: Message + Default>(
    engine: &dyn Engine,
    prefix: &[u8],
) -> Result<Vec<M>, MvccError> {
    let mut out = Vec::new();
    let mut bad = None;
    scan(engine, prefix, &mut |_, v| match M::decode(v) {
        Ok(m) => out.push(m),
        Err(e) => bad = Some(e.to_string()),
    })?;
    match bad {
        Some(e) => Err(MvccError::Corrupt(0, format!("member table: {e}"))),
        None => Ok(out),
    }
}

impl<E: Engine> Store<E> {
    /// The attributes every member has published, by member id.
    pub fn member_attrs(&self) -> BTreeMap<u64, MemberAttrSet> {
        self.members.attrs.read().clone()
    }

    /// The members of the cluster (raft attributes), by id.
    pub fn members(&self) -> BTreeMap<u64, MemberRecord> {
        self.members.raft.read().clone()
    }

    /// Ids removed from the cluster: they may never come back.
    pub fn removed_members(&self) -> BTreeSet<u64> {
        self.members.removed.read().clone()
    }

    /// Whether `id` was removed from the cluster.
    pub fn is_removed(&self, id: u64) -> bool {
        self.members.removed.read().contains(&id)
    }

    /// Changes whenever the members or the removed ids change.
    pub fn membership_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.members.epoch.subscribe()
    }

    pub(super) fn set_member_attrs(&self, attr: &MemberAttrSet, ctx: &mut WriteCtx) {
        if self.members.removed.read().contains(&attr.member_id) {
            // A removed member's late publication must not bring it back into MemberList.
            return;
        }
        ctx.batch.put(
            Space::Meta,
            key(META_MEMBER_PREFIX, attr.member_id),
            attr.encode_to_vec(),
        );
        self.members
            .attrs
            .write()
            .insert(attr.member_id, attr.clone());
    }

    /// Applies one change of the member table. Whether the change is allowed was decided
    /// before it was proposed (by the leader, one change at a time); here it is only recorded,
    /// identically on every member.
    pub(super) fn apply_member_change(&self, change: &MemberChange, ctx: &mut WriteCtx) {
        let Some(member) = change.member.as_ref() else {
            return;
        };
        let id = member.id;
        let mut raft = self.members.raft.write();
        let updated = match change.kind() {
            Kind::Add | Kind::AddLearner => {
                let mut record = member.clone();
                record.is_learner = change.kind() == Kind::AddLearner;
                Some(record)
            }
            Kind::Promote => raft.get(&id).map(|m| MemberRecord {
                is_learner: false,
                ..m.clone()
            }),
            Kind::Update => raft.get(&id).map(|m| MemberRecord {
                peer_urls: member.peer_urls.clone(),
                ..m.clone()
            }),
            Kind::Remove => {
                raft.remove(&id);
                self.members.attrs.write().remove(&id);
                self.members.removed.write().insert(id);
                ctx.batch
                    .delete(Space::Meta, key(META_RAFT_MEMBER_PREFIX, id));
                ctx.batch.delete(Space::Meta, key(META_MEMBER_PREFIX, id));
                ctx.batch
                    .put(Space::Meta, key(META_REMOVED_PREFIX, id), Vec::new());
                None
            }
        };
        if let Some(record) = updated {
            ctx.batch.put(
                Space::Meta,
                key(META_RAFT_MEMBER_PREFIX, id),
                record.encode_to_vec(),
            );
            raft.insert(id, record);
        }
        drop(raft);
        self.members.epoch.send_modify(|e| *e += 1);
    }

    /// Records the bootstrap members of a data dir written before the member table existed
    /// (0.2 clusters started before this): every member holds the same `--initial-cluster`,
    /// so every member seeds the same table. Does nothing when the table has members.
    pub fn seed_members(&self, members: Vec<MemberRecord>) -> Result<(), MvccError> {
        let _writer = self.writer.lock();
        if !self.members.raft.read().is_empty() {
            return Ok(());
        }
        let mut batch = metastore_engine::WriteBatch::new();
        for m in &members {
            batch.put(
                Space::Meta,
                key(META_RAFT_MEMBER_PREFIX, m.id),
                m.encode_to_vec(),
            );
        }
        self.engine.write(batch)?;
        *self.members.raft.write() = members.into_iter().map(|m| (m.id, m)).collect();
        self.members.epoch.send_modify(|e| *e += 1);
        Ok(())
    }
}

impl<E: Engine> Store<E> {
    /// Applies a raft conf change entry at `raft_index` (its context decoded to `change`):
    /// recorded like any entry, applied index included.
    pub fn apply_conf_change(
        &self,
        raft_index: u64,
        change: MemberChange,
    ) -> Result<(), MvccError> {
        let cmd = metastore_proto::internal::Command {
            auth: None,
            op: Some(metastore_proto::internal::command::Op::MemberChange(change)),
        };
        self.apply_in_parts(
            raft_index,
            std::slice::from_ref(&cmd),
            usize::MAX,
            &mut |_| {},
        )?;
        Ok(())
    }
}

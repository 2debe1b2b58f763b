//! The replicated lease state: which leases exist, their TTLs, their last checkpointed remaining
//! TTL, and the keys attached to each. Expiry *timing* is not here: the leader decides it and
//! revokes through Raft, so every member deletes the same keys at the same revision.

use bytes::Bytes;
use parking_lot::RwLock;
use std::collections::{BTreeSet, HashMap};

/// etcd's upper bound for a lease TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A lease as seen by readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    /// Granted TTL, seconds.
    pub ttl: i64,
    /// Remaining TTL at the last checkpoint, seconds; 0 = never checkpointed since the last
    /// grant or renewal (the full TTL applies).
    pub remaining_ttl: i64,
    pub keys: Vec<Bytes>,
}

struct LeaseState {
    ttl: i64,
    remaining_ttl: i64,
    keys: BTreeSet<Bytes>,
}

#[derive(Default)]
pub(crate) struct Lessor {
    leases: RwLock<HashMap<i64, LeaseState>>,
}

pub(crate) fn lease_meta_key(id: i64) -> Vec<u8> {
    let mut k = b"lease/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(crate) const LEASE_META_PREFIX: &[u8] = b"lease/";

impl Lessor {
    /// Forgets every lease (the state is being replaced by a snapshot).
    pub fn clear(&self) {
        self.leases.write().clear();
    }

    pub fn exists(&self, id: i64) -> bool {
        self.leases.read().contains_key(&id)
    }

    pub fn grant(&self, id: i64, ttl: i64, remaining_ttl: i64) {
        self.leases.write().insert(
            id,
            LeaseState {
                ttl,
                remaining_ttl,
                keys: BTreeSet::new(),
            },
        );
    }

    /// Removes a lease, returning its keys in order.
    pub fn revoke(&self, id: i64) -> Option<Vec<Bytes>> {
        self.leases
            .write()
            .remove(&id)
            .map(|l| l.keys.into_iter().collect())
    }

    pub fn attach(&self, id: i64, key: &Bytes) {
        if let Some(l) = self.leases.write().get_mut(&id) {
            // Copied, not shared: see `KeyIndex::slot`.
            l.keys.insert(Bytes::copy_from_slice(key));
        }
    }

    pub fn detach(&self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.write().get_mut(&id) {
            l.keys.remove(key);
        }
    }

    /// Records a remaining TTL; returns the lease's granted TTL if it exists.
    pub fn checkpoint(&self, id: i64, remaining_ttl: i64) -> Option<i64> {
        let mut leases = self.leases.write();
        let l = leases.get_mut(&id)?;
        l.remaining_ttl = remaining_ttl;
        Some(l.ttl)
    }

    pub fn get(&self, id: i64, with_keys: bool) -> Option<LeaseInfo> {
        self.leases.read().get(&id).map(|l| LeaseInfo {
            id,
            ttl: l.ttl,
            remaining_ttl: l.remaining_ttl,
            keys: if with_keys {
                l.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Every lease, without keys, in id order.
    pub fn list(&self) -> Vec<LeaseInfo> {
        let mut out: Vec<LeaseInfo> = self
            .leases
            .read()
            .iter()
            .map(|(id, l)| LeaseInfo {
                id: *id,
                ttl: l.ttl,
                remaining_ttl: l.remaining_ttl,
                keys: Vec::new(),
            })
            .collect();
        out.sort_by_key(|l| l.id);
        out
    }
}

//! Raft log storage: raft-rs's in-memory `MemStorage` for lookups, backed by the WAL for
//! durability. Everything raft-rs must find after a restart (entries, hard state, membership)
//! is written to the WAL before the Ready that produced it is advanced.

use crate::entry_cache::EntryCache;
use crate::transfer::Transfers;
use crate::{RaftConfig, RaftError};
use metastore_wal::{Wal, WalOptions};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};
use std::path::PathBuf;
use std::sync::Arc;

const REC_ENTRY: u8 = 1;
const REC_HARD_STATE: u8 = 2;
const REC_CONF_STATE: u8 = 3;
/// The log was compacted up to this index (the state machine holds it durably): replay starts
/// after it. Carries the term of that index and the membership then.
const REC_SNAPSHOT: u8 = 4;
/// A snapshot from the leader was installed at this index: the whole log before this record
/// (entries past the index included, which the leader's log replaced) is gone. Carries the
/// snapshot's metadata.
const REC_INSTALLED: u8 = 5;

/// Raft storage whose appends are made durable in a group-commit WAL.
#[derive(Clone)]
pub struct WalStorage {
    mem: MemStorage,
    wal: Arc<Wal>,
    transfers: Arc<Transfers>,
    cache: Arc<parking_lot::Mutex<EntryCache>>,
    /// The membership from each raft index on where it changed (the last entry is the current
    /// one): a snapshot or a compaction point records the membership as of its own index, not
    /// a later one.
    conf_history: Arc<parking_lot::Mutex<std::collections::BTreeMap<u64, ConfState>>>,
}

/// How a member with a new WAL starts.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// A new cluster of these voters, each with the context of the conf change that adds it
    /// (what the state machine records for it). As etcd, the log starts with one committed
    /// `AddNode` entry per member, so that every member, and every member that later catches
    /// up from the log, applies the same membership.
    NewCluster(Vec<(u64, Vec<u8>)>),
    /// A member added to a running cluster: no membership of its own; the leader sends it the
    /// log or a snapshot.
    Join,
}

impl Bootstrap {
    /// A new cluster of these voters, with empty conf change contexts.
    pub fn voters(ids: &[u64]) -> Bootstrap {
        Bootstrap::NewCluster(ids.iter().map(|&id| (id, Vec::new())).collect())
    }
}

impl WalStorage {
    /// Opens the WAL in `dir` and rebuilds the log from it. A new WAL starts with `voters`.
    pub(crate) fn open(
        dir: PathBuf,
        config: &RaftConfig,
        bootstrap: &Bootstrap,
        transfers: Arc<Transfers>,
    ) -> Result<Self, RaftError> {
        let (wal, records) = Wal::open(
            &dir,
            WalOptions {
                segment_size: config.wal_segment_size,
                sync: config.wal_sync,
                preallocate: config.wal_preallocate,
            },
        )?;
        let wal = Arc::new(wal);
        let mem = MemStorage::new();
        let storage = WalStorage {
            mem,
            wal,
            transfers,
            cache: Arc::default(),
            conf_history: Arc::default(),
        };
        if records.is_empty() {
            if let Bootstrap::NewCluster(members) = bootstrap {
                storage.bootstrap(members)?;
            }
            return Ok(storage);
        }
        let mut hard_state: Option<HardState> = None;
        let mut snapshot: Option<SnapshotMetadata> = None;
        let mut history = std::collections::BTreeMap::new();
        let mut pending: Vec<Entry> = Vec::new();
        for rec in records {
            match rec.kind {
                REC_ENTRY => {
                    let mut e = Entry::default();
                    e.merge_from_bytes(&rec.payload)
                        .map_err(|err| corrupt(&dir, "entry", err))?;
                    // A later append at an index already seen replaces the tail from there
                    // (a follower's log was overwritten by a new leader).
                    if let Some(first) = pending.first().map(|f| f.index) {
                        if e.index < first + pending.len() as u64 {
                            pending.truncate(e.index.saturating_sub(first) as usize);
                        }
                    }
                    pending.push(e);
                }
                REC_HARD_STATE => {
                    let mut hs = HardState::default();
                    hs.merge_from_bytes(&rec.payload)
                        .map_err(|err| corrupt(&dir, "hard state", err))?;
                    hard_state = Some(hs);
                }
                REC_CONF_STATE => {
                    let mut cs = ConfState::default();
                    cs.merge_from_bytes(&rec.payload)
                        .map_err(|err| corrupt(&dir, "conf state", err))?;
                    history.insert(rec.index, cs);
                }
                REC_INSTALLED => {
                    let mut meta = SnapshotMetadata::default();
                    meta.merge_from_bytes(&rec.payload)
                        .map_err(|err| corrupt(&dir, "installed snapshot", err))?;
                    // Memberships recorded before it belong to the log it replaced.
                    history.retain(|&index, _| index > meta.index);
                    history.insert(meta.index, meta.get_conf_state().clone());
                    pending.clear();
                    snapshot = Some(meta);
                }
                REC_SNAPSHOT => {
                    let mut meta = SnapshotMetadata::default();
                    meta.merge_from_bytes(&rec.payload)
                        .map_err(|err| corrupt(&dir, "snapshot metadata", err))?;
                    history
                        .entry(meta.index)
                        .or_insert_with(|| meta.get_conf_state().clone());
                    if snapshot.as_ref().is_none_or(|s| s.index <= meta.index) {
                        snapshot = Some(meta);
                    }
                }
                kind => return Err(RaftError::UnknownRecord { kind, dir }),
            }
        }
        {
            let mut core = storage.mem.wl();
            if let Some(meta) = &snapshot {
                // Everything up to the snapshot lives in the state machine; the log resumes
                // right after it.
                let mut snap = Snapshot::default();
                snap.set_metadata(meta.clone());
                core.apply_snapshot(snap)?;
                pending.retain(|e| e.index > meta.index);
                if let Some(first) = pending.first() {
                    if first.index != meta.index + 1 {
                        return Err(RaftError::MissingEntries {
                            dir,
                            first: first.index,
                            snapshot: meta.index,
                        });
                    }
                }
            }
            // The membership with the highest index is the current one (a compaction record
            // is written after changes at higher indexes and names an older membership).
            if let Some((_, cs)) = history.last_key_value() {
                core.set_conf_state(cs.clone());
            }
            if !pending.is_empty() {
                core.append(&pending)?;
                storage.cache.lock().append(&pending);
            }
            if let Some(mut hs) = hard_state {
                if let Some(meta) = &snapshot {
                    hs.commit = hs.commit.max(meta.index);
                }
                core.set_hardstate(hs);
            }
        }
        *storage.conf_history.lock() = history;
        Ok(storage)
    }

    /// The first entries of a new cluster's log: one committed `AddNode` per member.
    fn bootstrap(&self, members: &[(u64, Vec<u8>)]) -> Result<(), RaftError> {
        let mut entries = Vec::with_capacity(members.len());
        for (i, (id, context)) in members.iter().enumerate() {
            let cc = raft::eraftpb::ConfChange {
                change_type: raft::eraftpb::ConfChangeType::AddNode,
                node_id: *id,
                context: context.clone().into(),
                ..Default::default()
            };
            entries.push(Entry {
                entry_type: raft::eraftpb::EntryType::EntryConfChange,
                term: 1,
                index: i as u64 + 1,
                data: cc.write_to_bytes()?.into(),
                ..Default::default()
            });
        }
        let hs = HardState {
            term: 1,
            commit: entries.len() as u64,
            ..Default::default()
        };
        self.persist(&entries, Some(&hs), true)?;
        let cs = ConfState {
            voters: members.iter().map(|(id, _)| *id).collect(),
            ..Default::default()
        };
        self.set_conf_state(0, cs)
    }

    /// The membership as of raft `index`.
    pub(crate) fn conf_state_at(&self, index: u64) -> ConfState {
        let history = self.conf_history.lock();
        match history.range(..=index).next_back() {
            Some((_, cs)) => cs.clone(),
            // Older than anything recorded: the oldest known is the best answer (only a
            // data dir from before the history was kept gets here).
            None => history
                .first_key_value()
                .map(|(_, cs)| cs.clone())
                .unwrap_or_default(),
        }
    }

    /// Writes new entries and hard state; fsyncs when raft says it must.
    pub fn persist(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
        must_sync: bool,
    ) -> Result<(), RaftError> {
        let mut encoded: Vec<(u8, u64, Vec<u8>)> = Vec::with_capacity(entries.len() + 1);
        for e in entries {
            encoded.push((REC_ENTRY, e.index, e.write_to_bytes()?));
        }
        if let Some(hs) = hs {
            encoded.push((REC_HARD_STATE, hs.commit, hs.write_to_bytes()?));
        }
        if !encoded.is_empty() {
            let refs: Vec<(u8, u64, &[u8])> = encoded
                .iter()
                .map(|(k, i, p)| (*k, *i, p.as_slice()))
                .collect();
            let lsn = self.wal.append(&refs)?;
            if must_sync || !entries.is_empty() {
                self.wal.sync_to(lsn)?;
            }
        }
        let mut core = self.mem.wl();
        if !entries.is_empty() {
            core.append(entries)?;
            self.cache.lock().append(entries);
        }
        if let Some(hs) = hs {
            core.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// Drops in-memory entries below `index` (they stay in the WAL, which is what a restart
    /// replays). Only applied entries may be dropped.
    pub fn trim_memory(&self, index: u64) -> Result<(), RaftError> {
        self.mem.wl().compact(index)?;
        self.cache.lock().trim_below(index);
        Ok(())
    }

    /// Bytes of entries held in memory.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.lock().bytes
    }

    /// Where to trim the in-memory log so that about `limit` bytes of it stay, trimming
    /// nothing above `applied`; 0 while it holds less than `limit`.
    pub(crate) fn trim_point_for_bytes(&self, limit: u64, applied: u64) -> u64 {
        let cache = self.cache.lock();
        if cache.bytes <= limit {
            return 0;
        }
        // Down to 90 %, so that a log just over the limit is not trimmed on every Ready.
        cache.keep_from(limit / 10 * 9, applied)
    }

    /// Compacts the log below `index`, which the state machine now holds durably: records the
    /// snapshot point (term and membership) and the hard state in the WAL, then deletes the WAL
    /// segments entirely at or below it.
    /// `term` is the term of `index` when the caller knows it: the in-memory log may have
    /// trimmed that entry already.
    pub fn compact_log(&self, index: u64, term: Option<u64>) -> Result<usize, RaftError> {
        let term = match term {
            Some(t) => t,
            None => self.mem.term(index)?,
        };
        let state = self.mem.initial_state()?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(self.conf_state_at(index));
        let meta_bytes = meta.write_to_bytes()?;
        let hs_bytes = state.hard_state.write_to_bytes()?;
        // Written at the compaction index so that they outlive every segment purged now,
        // whichever old segment held the previous hard state and membership.
        let lsn = self.wal.append(&[
            (REC_SNAPSHOT, index, &meta_bytes[..]),
            (REC_HARD_STATE, index, &hs_bytes[..]),
        ])?;
        self.wal.sync_to(lsn)?;
        {
            // Only the membership in force at `index` and later ones can still be asked for.
            let mut history = self.conf_history.lock();
            if let Some((&start, _)) = history.range(..=index).next_back() {
                *history = history.split_off(&start);
            }
        }
        Ok(self.wal.purge_below(index + 1)?)
    }

    /// Records a snapshot from the leader that the state machine has installed (and holds
    /// durably): the log restarts after it. Then the WAL before it is purged.
    pub(crate) fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError> {
        let meta = snap.get_metadata();
        let meta_bytes = meta.write_to_bytes()?;
        let mut hs = self.mem.initial_state()?.hard_state;
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        let hs_bytes = hs.write_to_bytes()?;
        let lsn = self.wal.append(&[
            (REC_INSTALLED, meta.index, &meta_bytes[..]),
            (REC_HARD_STATE, meta.index, &hs_bytes[..]),
        ])?;
        self.wal.sync_to(lsn)?;
        self.mem.wl().apply_snapshot(snap.clone())?;
        *self.cache.lock() = EntryCache::default();
        {
            let mut history = self.conf_history.lock();
            history.retain(|&index, _| index > meta.index);
            history.insert(meta.index, meta.get_conf_state().clone());
        }
        if let Err(e) = self.wal.purge_below(meta.index + 1) {
            // Only disk space is at stake: replay skips everything before the record.
            tracing::warn!(index = meta.index, error = %e, "cannot purge the WAL below an installed snapshot");
        }
        Ok(())
    }

    pub(crate) fn transfers(&self) -> &Arc<Transfers> {
        &self.transfers
    }

    pub fn set_commit(&self, commit: u64) {
        self.mem.wl().mut_hard_state().commit = commit;
    }

    /// Records the membership in force from raft `index` on.
    pub fn set_conf_state(&self, index: u64, cs: ConfState) -> Result<(), RaftError> {
        let payload = cs.write_to_bytes()?;
        self.wal.append_sync(REC_CONF_STATE, index, &payload)?;
        self.conf_history.lock().insert(index, cs.clone());
        self.mem.wl().set_conf_state(cs);
        Ok(())
    }

    pub fn voters(&self) -> Vec<u64> {
        self.mem
            .initial_state()
            .map(|s| s.conf_state.voters)
            .unwrap_or_default()
    }

    pub fn committed(&self) -> u64 {
        self.mem
            .initial_state()
            .map(|s| s.hard_state.commit)
            .unwrap_or_default()
    }

    pub fn snapshot_index(&self) -> u64 {
        self.mem.first_index().unwrap_or(1).saturating_sub(1)
    }

    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }
}

fn corrupt(dir: &std::path::Path, what: &'static str, err: protobuf::ProtobufError) -> RaftError {
    RaftError::CorruptRecord {
        what,
        dir: dir.to_path_buf(),
        source: std::sync::Arc::new(err),
    }
}

impl Storage for WalStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// A follower needs entries this log no longer holds: offer the newest state-machine
    /// snapshot it can continue from, or have one built and answer "not yet" (raft-rs asks
    /// again on the follower's next heartbeat response).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let first = self.mem.first_index()?;
        match self.transfers.ready_or_request(first, request_index, to) {
            Some(snap) => Ok(snap),
            None => Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term,
                data: vec![index as u8].into(),
                ..Default::default()
            })
            .collect()
    }

    fn open(dir: &std::path::Path) -> WalStorage {
        WalStorage::open(
            dir.to_path_buf(),
            &RaftConfig::default(),
            &Bootstrap::Join,
            Arc::new(Transfers::new(dir)),
        )
        .expect("open")
    }

    #[test]
    fn the_entry_cache_counts_bytes_and_trims_to_a_byte_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        let big = |range: std::ops::RangeInclusive<u64>, term: u64| -> Vec<Entry> {
            range
                .map(|index| Entry {
                    index,
                    term,
                    data: vec![0u8; 968].into(),
                    ..Default::default()
                })
                .collect()
        };
        storage
            .persist(&big(1..=100, 1), None, true)
            .expect("persist");
        assert_eq!(storage.cached_bytes(), 100 * 1000);
        // Under the bound: nothing to trim.
        assert_eq!(storage.trim_point_for_bytes(200_000, 100), 0);
        // Over it: keep about 90 % of the bound, never past what is applied.
        assert_eq!(storage.trim_point_for_bytes(50_000, 100), 56);
        assert_eq!(storage.trim_point_for_bytes(50_000, 20), 21);
        storage.trim_memory(56).expect("trim");
        assert_eq!(storage.cached_bytes(), 45 * 1000);
        assert_eq!(storage.first_index().expect("first"), 56);
        // A new leader's entries replace the tail: the overwritten ones are no longer counted.
        storage
            .persist(&big(91..=92, 2), None, true)
            .expect("persist");
        assert_eq!(storage.cached_bytes(), 37 * 1000);
    }

    /// A follower's own tail past the leader's snapshot belongs to a history the leader
    /// replaced: after a restart it must not come back as if it were the log after the
    /// snapshot.
    #[test]
    fn an_installed_snapshot_drops_the_whole_log_before_it_on_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        storage
            .persist(&entries(1..=10, 1), None, true)
            .expect("persist");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 5;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        storage.apply_snapshot(&snap).expect("install");
        assert_eq!(storage.last_index().expect("last"), 5);
        drop(storage);

        let reopened = open(dir.path());
        assert_eq!(reopened.snapshot_index(), 5);
        assert_eq!(reopened.first_index().expect("first"), 6);
        assert_eq!(
            reopened.last_index().expect("last"),
            5,
            "entries 6..=10 of term 1 came back"
        );
        assert_eq!(reopened.term(5).expect("term"), 2);
        assert_eq!(reopened.committed(), 5);

        // The log then continues after the snapshot, and survives another restart.
        reopened
            .persist(&entries(6..=7, 2), None, true)
            .expect("persist");
        drop(reopened);
        let again = open(dir.path());
        assert_eq!(again.last_index().expect("last"), 7);
        assert_eq!(again.term(7).expect("term"), 2);
    }

    /// A snapshot names the membership as of its own index, and a compaction record (written
    /// after a later change) must not bring an older membership back on restart.
    #[test]
    fn the_membership_at_an_index_survives_compaction_and_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(dir.path());
        storage
            .persist(&entries(1..=10, 1), None, true)
            .expect("persist");
        let cs = |voters: &[u64]| ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        storage.set_conf_state(3, cs(&[1, 2, 3])).expect("conf");
        storage.set_conf_state(8, cs(&[1, 2, 3, 4])).expect("conf");
        assert_eq!(storage.conf_state_at(5).voters, vec![1, 2, 3]);
        assert_eq!(storage.conf_state_at(9).voters, vec![1, 2, 3, 4]);
        storage.compact_log(5, Some(1)).expect("compact");
        drop(storage);

        let reopened = open(dir.path());
        assert_eq!(
            reopened.voters(),
            vec![1, 2, 3, 4],
            "the compaction record's older membership came back"
        );
        assert_eq!(reopened.conf_state_at(5).voters, vec![1, 2, 3]);
        assert_eq!(reopened.conf_state_at(8).voters, vec![1, 2, 3, 4]);
    }
}

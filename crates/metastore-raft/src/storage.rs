//! Raft log storage: raft-rs's in-memory `MemStorage` for lookups, backed by the WAL for
//! durability. Everything raft-rs must find after a restart (entries, hard state, membership)
//! is written to the WAL before the Ready that produced it is advanced.

use crate::{RaftConfig, RaftError};
use metastore_wal::{Wal, WalOptions};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};
use std::path::PathBuf;
use std::sync::Arc;

const REC_ENTRY: u8 = 1;
const REC_HARD_STATE: u8 = 2;
const REC_CONF_STATE: u8 = 3;

/// Raft storage whose appends are made durable in a group-commit WAL.
#[derive(Clone)]
pub struct WalStorage {
    mem: MemStorage,
    wal: Arc<Wal>,
}

fn wal_err(e: impl std::fmt::Display) -> RaftError {
    RaftError::Wal(e.to_string())
}

impl WalStorage {
    /// Opens the WAL in `dir` and rebuilds the log from it. A new WAL starts with `voters`.
    pub fn open(dir: PathBuf, config: &RaftConfig, voters: &[u64]) -> Result<Self, RaftError> {
        let (wal, records) = Wal::open(
            &dir,
            WalOptions {
                segment_size: config.wal_segment_size,
                sync: config.wal_sync,
            },
        )
        .map_err(wal_err)?;
        let wal = Arc::new(wal);
        let mem = MemStorage::new();
        let storage = WalStorage { mem, wal };
        if records.is_empty() {
            let cs = ConfState {
                voters: voters.to_vec(),
                ..Default::default()
            };
            storage.set_conf_state(cs)?;
            return Ok(storage);
        }
        let mut hard_state = None;
        let mut pending: Vec<Entry> = Vec::new();
        {
            let mut core = storage.mem.wl();
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
                        core.set_conf_state(cs);
                    }
                    other => {
                        return Err(RaftError::Wal(format!(
                            "unknown record kind {other} in WAL {}",
                            dir.display()
                        )))
                    }
                }
            }
            if !pending.is_empty() {
                core.append(&pending)
                    .map_err(|e| RaftError::Raft(e.to_string()))?;
            }
            if let Some(hs) = hard_state {
                core.set_hardstate(hs);
            }
        }
        Ok(storage)
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
            encoded.push((REC_ENTRY, e.index, e.write_to_bytes().map_err(wal_err)?));
        }
        if let Some(hs) = hs {
            encoded.push((
                REC_HARD_STATE,
                hs.commit,
                hs.write_to_bytes().map_err(wal_err)?,
            ));
        }
        if !encoded.is_empty() {
            let refs: Vec<(u8, u64, &[u8])> = encoded
                .iter()
                .map(|(k, i, p)| (*k, *i, p.as_slice()))
                .collect();
            let lsn = self.wal.append(&refs).map_err(wal_err)?;
            if must_sync || !entries.is_empty() {
                self.wal.sync_to(lsn).map_err(wal_err)?;
            }
        }
        let mut core = self.mem.wl();
        if !entries.is_empty() {
            core.append(entries)
                .map_err(|e| RaftError::Raft(e.to_string()))?;
        }
        if let Some(hs) = hs {
            core.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// Drops in-memory entries below `index` (they stay in the WAL, which is what a restart
    /// replays). Only applied entries may be dropped.
    pub fn trim_memory(&self, index: u64) -> Result<(), RaftError> {
        self.mem
            .wl()
            .compact(index)
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    pub fn set_commit(&self, commit: u64) {
        self.mem.wl().mut_hard_state().commit = commit;
    }

    pub fn set_conf_state(&self, cs: ConfState) -> Result<(), RaftError> {
        let payload = cs.write_to_bytes().map_err(wal_err)?;
        self.wal
            .append_sync(REC_CONF_STATE, 0, &payload)
            .map_err(wal_err)?;
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

fn corrupt(dir: &std::path::Path, what: &str, err: impl std::fmt::Display) -> RaftError {
    RaftError::Wal(format!(
        "undecodable {what} record in WAL {}: {err}",
        dir.display()
    ))
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

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.mem.snapshot(request_index, to)
    }
}

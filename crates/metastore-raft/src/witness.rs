//! The state machine of a witness member: none. A witness votes and keeps the raft log and
//! hard state so that two data members and a witness survive the loss of any one of the three;
//! it applies nothing, and keeps its log only above the lowest index every data member holds
//! durably in its own state machine (they never need older entries from it), so its disk
//! stays bounded.

use crate::{CommittedEntry, StateMachine, StateMachineError};
use std::path::{Path, PathBuf};

/// The lowest durable index among the data members; None while one of them is not known.
pub type DataDurable = Box<dyn Fn() -> Option<u64> + Send>;

/// Trim in steps, not at every entry.
const TRIM_STEP: u64 = 1_000;

pub struct WitnessLog {
    /// Holds the index the log was last trimmed to: what a restart starts after.
    path: PathBuf,
    applied: u64,
    durable: u64,
    data_durable: DataDurable,
}

impl WitnessLog {
    /// Opens the witness's index file at `path` (a new one starts at 0).
    pub fn open(
        path: impl Into<PathBuf>,
        data_durable: DataDurable,
    ) -> Result<Self, WitnessLogError> {
        let path = path.into();
        let durable = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|source| WitnessLogError::Parse {
                    path: path.clone(),
                    source,
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(WitnessLogError::Io { path, source }),
        };
        Ok(Self {
            path,
            applied: durable,
            durable,
            data_durable,
        })
    }

    fn record(&mut self, index: u64) -> Result<(), WitnessLogError> {
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, format!("{index}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|source| WitnessLogError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.durable = index;
        Ok(())
    }

    /// Moves the trim point up to what every data member holds durably.
    fn advance(&mut self) -> Result<(), WitnessLogError> {
        let Some(data) = (self.data_durable)() else {
            return Ok(());
        };
        let target = data.min(self.applied);
        if target >= self.durable + TRIM_STEP {
            self.record(target)?;
        }
        Ok(())
    }
}

/// The witness's index file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WitnessLogError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not an index: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: std::num::ParseIntError,
    },
}

impl StateMachine for WitnessLog {
    fn apply(&mut self, entries: Vec<CommittedEntry>) -> Result<(), StateMachineError> {
        if let Some(last) = entries.last() {
            self.applied = self.applied.max(last.index);
        }
        Ok(self.advance()?)
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        _change: &crate::eraftpb::ConfChange,
    ) -> Result<(), StateMachineError> {
        self.applied = self.applied.max(index);
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn durable_index(&self) -> u64 {
        self.durable
    }

    /// A witness too far behind gets the leader's snapshot like any member; it only needs to
    /// know where the log goes on.
    fn install_snapshot(&mut self, _path: &Path, index: u64) -> Result<(), StateMachineError> {
        self.applied = index;
        Ok(self.record(index)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn entry(index: u64) -> CommittedEntry {
        CommittedEntry {
            index,
            term: 1,
            data: bytes::Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn the_log_is_trimmed_to_what_every_data_member_holds_and_a_restart_resumes_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("witness-index");
        let data = Arc::new(AtomicU64::new(u64::MAX));
        let known = Arc::new(AtomicU64::new(0));
        let source = |data: Arc<AtomicU64>, known: Arc<AtomicU64>| -> DataDurable {
            Box::new(move || {
                (known.load(Ordering::SeqCst) == 1).then(|| data.load(Ordering::SeqCst))
            })
        };
        let mut w = WitnessLog::open(&path, source(data.clone(), known.clone())).expect("open");
        w.apply((1..=5_000).map(entry).collect()).expect("apply");
        assert_eq!(
            w.durable_index(),
            0,
            "a data member not heard from: nothing trimmed"
        );
        known.store(1, Ordering::SeqCst);
        data.store(1_500, Ordering::SeqCst);
        w.apply(vec![entry(5_001)]).expect("apply");
        assert_eq!(
            w.durable_index(),
            1_500,
            "trimmed to the data members' lowest"
        );
        data.store(9_000, Ordering::SeqCst);
        w.apply(vec![entry(5_002)]).expect("apply");
        assert_eq!(w.durable_index(), 5_002, "never past what it has itself");
        drop(w);
        let w = WitnessLog::open(&path, source(data, known)).expect("reopen");
        assert_eq!(w.applied_index(), 5_002);
    }
}

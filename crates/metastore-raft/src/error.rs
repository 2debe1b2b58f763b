//! The raft member's errors. `RaftError` is cloned to every waiter when the member stops, so
//! the errors it carries from below are shared (`Arc`), keeping their sources.

use std::path::PathBuf;
use std::sync::Arc;

/// What a [`crate::StateMachine`] reports when it cannot go on: any error, with its sources.
pub type StateMachineError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftError {
    #[error("no leader")]
    NoLeader,
    #[error("proposal dropped")]
    ProposalDropped,
    #[error("raft node stopped")]
    Stopped,
    #[error("not leader")]
    NotLeader,
    /// The leader has a membership change not applied yet: raft-rs takes one at a time.
    #[error("a membership change is in progress")]
    ConfChangePending,
    /// Writing, syncing, reading or purging the WAL failed.
    #[error("wal: {0}")]
    Wal(#[source] Arc<metastore_wal::WalError>),
    /// A raft record could not be encoded for the WAL.
    #[error("encoding a raft record: {0}")]
    Encode(#[source] Arc<protobuf::ProtobufError>),
    /// A WAL record passed its checksum but does not decode: written by a newer version, or a
    /// bug. Starting would skip it.
    #[error("undecodable {what} record in WAL {}: {source}", dir.display())]
    CorruptRecord {
        what: &'static str,
        dir: PathBuf,
        #[source]
        source: Arc<protobuf::ProtobufError>,
    },
    #[error("unknown record kind {kind} in WAL {}", dir.display())]
    UnknownRecord { kind: u8, dir: PathBuf },
    #[error("WAL {} resumes at index {first} after a snapshot at {snapshot}: entries are missing", dir.display())]
    MissingEntries {
        dir: PathBuf,
        first: u64,
        snapshot: u64,
    },
    /// The WAL below the state machine's index is gone: starting would skip those entries.
    #[error("the state machine holds index {applied} but the WAL was compacted up to {compacted}: its snapshot or engine data is missing")]
    StateBehindWal { applied: u64, compacted: u64 },
    /// A committed membership change does not decode.
    #[error("committed conf change entry {index} does not decode: {source}")]
    UndecodableConfChange {
        index: u64,
        #[source]
        source: Arc<protobuf::ProtobufError>,
    },
    /// raft-rs refused an operation or its storage failed.
    #[error("raft: {0}")]
    Raft(#[source] Arc<raft::Error>),
    #[error("cannot start the {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("the {0} thread panicked")]
    ThreadPanicked(&'static str),
    /// The state machine failed; the member stops rather than go on from a state it cannot
    /// trust.
    #[error("state machine failed: {0}")]
    StateMachine(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),
}

impl From<metastore_wal::WalError> for RaftError {
    fn from(e: metastore_wal::WalError) -> Self {
        RaftError::Wal(Arc::new(e))
    }
}

impl From<protobuf::ProtobufError> for RaftError {
    fn from(e: protobuf::ProtobufError) -> Self {
        RaftError::Encode(Arc::new(e))
    }
}

impl From<raft::Error> for RaftError {
    fn from(e: raft::Error) -> Self {
        RaftError::Raft(Arc::new(e))
    }
}

impl From<StateMachineError> for RaftError {
    fn from(e: StateMachineError) -> Self {
        RaftError::StateMachine(Arc::from(e))
    }
}

impl RaftError {
    pub(crate) fn spawn(thread: &'static str, source: std::io::Error) -> Self {
        RaftError::Spawn {
            thread,
            source: Arc::new(source),
        }
    }
}

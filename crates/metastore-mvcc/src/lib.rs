//! The MVCC state machine: etcd's revision model over any [`Engine`].
//!
//! - Every write transaction gets the next *main* revision; the changes inside it get increasing
//!   *sub* revisions. Each key carries `create_revision`, `mod_revision` and `version`; a delete
//!   writes a tombstone and resets the version.
//! - The engine stores one record per revision (`Space::Kv`, key = revision); the in-memory
//!   [`keyindex::KeyIndex`] maps user keys to their revisions. On open, the index is rebuilt from
//!   the engine, so persistent engines need no replay of what they already hold.
//! - Reads run without any global lock at the published revision; the single apply loop writes.
//! - One applied raft batch = one engine write batch, carrying the applied raft index.

pub mod auth;
pub mod keyindex;
pub mod lease;
pub mod snapshot;
mod store;
pub mod watch;

pub use keyindex::{IndexRev, Revision};
pub use lease::{LeaseInfo, MAX_LEASE_TTL};
pub use store::{
    adds_data, interrupted_install, is_auth_op, replace_engine_contents, ApplyResponse,
    ClusterVersion, KvHash, Store,
};
pub use watch::{
    QueueSlot, StreamReceiver, StreamRoom, WatchHub, WatchLimits, WatchSpec, ERR_TOO_MANY_WATCHERS,
    INVALID_WATCH_ID,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    #[error("mvcc: database space exceeded")]
    NoSpace,
    #[error("key not found")]
    KeyNotFound,
    #[error("storage engine failed: {0}")]
    Engine(String),
    #[error("corrupt record at revision {0}: {1}")]
    Corrupt(i64, String),
    /// etcd stops a member the same way ("invalid downgrade").
    #[error("invalid downgrade; this member's version {member} is lower than the cluster version {cluster}: upgrade this member")]
    Downgrade { cluster: String, member: String },
    /// A snapshot install from the leader stopped half-way (a crash): the engine holds a mix
    /// of two states until the install is finished from the received file.
    #[error("the install of the leader's snapshot at raft index {0} was interrupted; the engine must be restored from that snapshot")]
    InstallInterrupted(u64),
    #[error("raft entry {0} holds an operation this version cannot read (proposed by a newer member?): upgrade this member")]
    UnknownCommand(u64),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// A range's key-values passed the response limit (`size` counted when it stopped).
    #[error("response of at least {size} bytes is over the limit of {limit}")]
    ResponseTooLarge { size: usize, limit: usize },
    /// The OS refused a thread (the error is kept as text: this enum is compared in tests).
    #[error("starting the {0} thread: {1}")]
    Thread(&'static str, String),
}

impl From<metastore_engine::EngineError> for MvccError {
    fn from(e: metastore_engine::EngineError) -> Self {
        MvccError::Engine(e.to_string())
    }
}

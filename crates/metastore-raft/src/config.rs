//! Raft settings.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Raft settings; defaults follow the performance plans.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RaftConfig {
    /// One raft tick.
    #[serde(with = "millis")]
    pub tick_interval: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub max_inflight_msgs: usize,
    pub max_size_per_msg: u64,
    pub max_uncommitted_size: u64,
    /// Upper bound of committed entry bytes handed over in one Ready.
    pub max_committed_size_per_ready: u64,
    /// Committed entry bytes handed to the apply thread and not applied yet at which the raft
    /// thread stops taking Readies until applying catches up (a slow disk on a follower, a
    /// replay at start): the apply queue holds at most this plus one Ready. Meanwhile the
    /// member answers new requests "etcdserver: too many requests".
    pub max_apply_backlog_bytes: u64,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// fsync the WAL before acknowledging. UNSAFE when false: a crash loses acknowledged
    /// writes, which breaks the durability contract (benchmarks only; the server warns).
    pub wal_sync: bool,
    /// Zero-fill WAL segments in advance (see `metastore_wal::WalOptions::preallocate`).
    pub wal_preallocate: bool,
    /// Applied entries the leader keeps in memory for slow followers (etcd's
    /// `--experimental-snapshot-catchup-entries`); a follower further behind gets a snapshot.
    pub snapshot_catch_up_entries: u64,
    /// Most bytes of entries kept in memory for slow followers, whatever their count: a
    /// follower behind what is kept gets a snapshot.
    pub snapshot_catch_up_bytes: u64,
    /// This member is a witness: it hands leadership to a data member whenever it is
    /// elected (it has no state machine to serve from). Set from `--witness`.
    #[serde(skip)]
    pub witness: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick_interval: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 1,
            pre_vote: true,
            check_quorum: true,
            max_inflight_msgs: 512,
            max_size_per_msg: 4 * 1024 * 1024,
            max_uncommitted_size: 1 << 30,
            max_committed_size_per_ready: 64 * 1024 * 1024,
            max_apply_backlog_bytes: 128 * 1024 * 1024,
            wal_segment_size: 64 * 1024 * 1024,
            wal_sync: true,
            wal_preallocate: true,
            snapshot_catch_up_entries: 10_000,
            snapshot_catch_up_bytes: 256 * 1024 * 1024,
            witness: false,
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

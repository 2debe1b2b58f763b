//! State-machine snapshots in transit between members.
//!
//! A leader that no longer has the entries a follower needs asks raft-rs's storage for a
//! snapshot. The storage answers `SnapshotTemporarilyUnavailable` and asks the apply thread for
//! one; the apply thread captures the state between two entries and a background thread writes
//! it to `send/` under the WAL dir. Once it is there, the next ask gets a raft snapshot whose
//! data is only a [`SnapshotFile`] descriptor (size and CRC-32 of the file): the transport sends
//! the file itself on its own stream. The follower's transport writes it to `recv/`, checks it
//! against the descriptor and steps the message; the raft thread hands it to the state machine
//! to install, then records it in the WAL.

use parking_lot::Mutex;
use raft::eraftpb::Snapshot;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What a raft snapshot's data holds: the file that travels beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub size: u64,
    pub crc32: u32,
}

const DESCRIPTOR_MAGIC: &[u8; 4] = b"MSXF";

impl SnapshotFile {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(DESCRIPTOR_MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.crc32.to_le_bytes());
        out
    }

    pub fn decode(data: &[u8]) -> Option<SnapshotFile> {
        if data.len() != 16 || &data[..4] != DESCRIPTOR_MAGIC {
            return None;
        }
        Some(SnapshotFile {
            size: u64::from_le_bytes(data[4..12].try_into().ok()?),
            crc32: u32::from_le_bytes(data[12..16].try_into().ok()?),
        })
    }

    /// Size and CRC-32 of a file, read in bounded pieces.
    pub fn of(path: &Path) -> std::io::Result<SnapshotFile> {
        let mut file = std::fs::File::open(path)?;
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            size += n as u64;
        }
        Ok(SnapshotFile {
            size,
            crc32: crc.finalize(),
        })
    }
}

/// Where snapshots in transit live: `<wal dir>/snap-transfer/{send,recv}`.
pub fn transfer_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("snap-transfer")
}

fn file_name(index: u64) -> String {
    format!("snap-{index:016x}.snap")
}

/// Where a snapshot received from the leader for raft `index` is kept until it is installed
/// and recorded in the WAL (a persistent engine whose install a crash interrupted finishes it
/// from this file at start).
pub fn received_snapshot_path(wal_dir: &Path, index: u64) -> PathBuf {
    transfer_dir(wal_dir).join("recv").join(file_name(index))
}

#[derive(Default)]
struct SendState {
    /// The newest snapshot written for followers, with its file.
    ready: Option<(Snapshot, PathBuf)>,
    /// A capture was asked of the apply thread and has not finished.
    building: bool,
    /// raft-rs asked for a snapshot: the raft thread passes the ask on to the apply thread.
    wanted: bool,
}

/// The snapshots this member sends and receives.
pub(crate) struct Transfers {
    dir: PathBuf,
    send: Mutex<SendState>,
}

impl Transfers {
    pub(crate) fn new(wal_dir: &Path) -> Self {
        Self {
            dir: transfer_dir(wal_dir),
            send: Mutex::new(SendState::default()),
        }
    }

    pub(crate) fn send_dir(&self) -> PathBuf {
        self.dir.join("send")
    }

    pub(crate) fn recv_dir(&self) -> PathBuf {
        self.dir.join("recv")
    }

    pub(crate) fn send_path(&self, index: u64) -> PathBuf {
        self.send_dir().join(file_name(index))
    }

    pub(crate) fn recv_path(&self, index: u64) -> PathBuf {
        self.recv_dir().join(file_name(index))
    }

    /// The snapshot to send if one is ready that a follower can continue from (the leader's
    /// log still holds the entries after it: `first_index` is the first one it holds);
    /// otherwise asks for a new one and returns None.
    /// A snapshot whose membership does not name `to` is never offered: raft-rs on a member
    /// added after it was taken would refuse it, and ask again, forever.
    pub(crate) fn ready_or_request(
        &self,
        first_index: u64,
        request_index: u64,
        to: u64,
    ) -> Option<Snapshot> {
        let mut st = self.send.lock();
        if let Some((snap, _)) = &st.ready {
            let meta = snap.get_metadata();
            let index = meta.index;
            let cs = meta.get_conf_state();
            let names_to = cs.voters.contains(&to) || cs.learners.contains(&to);
            if index + 1 >= first_index && index >= request_index && names_to {
                return Some(snap.clone());
            }
        }
        if !st.building {
            st.wanted = true;
        }
        None
    }

    /// Whether a snapshot was asked for since the last call; marks it as being built.
    pub(crate) fn take_request(&self) -> bool {
        let mut st = self.send.lock();
        if st.wanted && !st.building {
            st.wanted = false;
            st.building = true;
            return true;
        }
        false
    }

    /// A snapshot for followers is written; older ones are deleted.
    pub(crate) fn built(&self, snap: Snapshot, path: PathBuf) {
        let mut st = self.send.lock();
        if let Some((_, old)) = st.ready.take() {
            if old != path {
                let _ = std::fs::remove_file(&old);
            }
        }
        st.ready = Some((snap, path));
        st.building = false;
    }

    pub(crate) fn build_failed(&self) {
        self.send.lock().building = false;
    }

    /// The file of a snapshot this member sends, checked against its descriptor.
    pub(crate) fn file_to_send(&self, snap: &Snapshot) -> Option<(PathBuf, SnapshotFile)> {
        let file = SnapshotFile::decode(snap.get_data())?;
        let st = self.send.lock();
        let (ready, path) = st.ready.as_ref()?;
        (ready.get_metadata().index == snap.get_metadata().index).then(|| (path.clone(), file))
    }

    /// Removes received snapshots other than `keep` (installed and recorded, or abandoned).
    pub(crate) fn clean_received(&self, keep: Option<&Path>) {
        for entry in std::fs::read_dir(self.recv_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if Some(path.as_path()) != keep {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_reject_garbage() {
        let f = SnapshotFile {
            size: 1 << 40,
            crc32: 0xdead_beef,
        };
        assert_eq!(SnapshotFile::decode(&f.encode()), Some(f));
        assert_eq!(SnapshotFile::decode(b""), None);
        assert_eq!(SnapshotFile::decode(&[0u8; 16]), None);
        assert_eq!(SnapshotFile::decode(&f.encode()[..15]), None);
    }

    #[test]
    fn a_snapshot_is_offered_only_while_the_log_continues_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Transfers::new(dir.path());
        assert!(t.ready_or_request(1, 0, 2).is_none());
        assert!(t.take_request(), "the first ask starts a build");
        assert!(t.ready_or_request(1, 0, 2).is_none());
        assert!(!t.take_request(), "one build at a time");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 100;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        t.built(snap, t.send_path(100));
        assert!(t.ready_or_request(101, 0, 2).is_some());
        assert!(t.ready_or_request(50, 100, 2).is_some());
        assert!(
            t.ready_or_request(102, 0, 2).is_none(),
            "entry 101 is gone from the log: the follower could not continue"
        );
        assert!(t.take_request());
        assert!(
            t.ready_or_request(1, 101, 2).is_none(),
            "asked for a newer one"
        );
    }

    /// raft-rs refuses a snapshot whose membership does not name it: a member added after
    /// the snapshot was taken must get a newer one, or it would be offered the old one for ever.
    #[test]
    fn a_snapshot_is_offered_only_to_a_member_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Transfers::new(dir.path());
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 100;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        snap.mut_metadata().mut_conf_state().learners = vec![3];
        t.built(snap, t.send_path(100));
        assert!(
            t.ready_or_request(101, 0, 3).is_some(),
            "a learner it names"
        );
        assert!(
            t.ready_or_request(101, 0, 4).is_none(),
            "a member added later"
        );
        assert!(t.take_request(), "which asks for a new one");
    }
}

//! WAL recovery over arbitrary damage: whatever bytes a crash, a disk or an attacker leaves in
//! the segment files, `Wal::open` answers (never panics, never hangs), and what it recovers is
//! always a prefix of what was written.
//!
//! The seeds are real logs (one segment, several segments, with and without preallocation);
//! proptest mutates them: bytes overwritten, files cut, garbage appended, files replaced by
//! arbitrary bytes. `PROPTEST_CASES` raises the case count for a longer run.
//!
//! One damage is out of reach of the format: an older segment cut exactly at a record
//! boundary (not to zero) looks like a shorter whole segment, so cuts are made in the last
//! segment, or to nothing; any other damage to an older segment fails its CRC or leaves it
//! empty, and both are refused.
#![allow(clippy::unwrap_used)]

mod common;

use common::{append_all, rec, segment_files};
use metastore_wal::{Record, Wal, WalError, WalOptions};
use proptest::prelude::*;
use std::fs;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Damage {
    /// Overwrite bytes at a position (a fraction of the file's length) with these.
    Overwrite { at: f64, bytes: Vec<u8> },
    /// Cut the file at a fraction of its length.
    Truncate { at: f64 },
    /// Append garbage.
    Append(Vec<u8>),
    /// Replace the whole file.
    Replace(Vec<u8>),
}

fn damage() -> impl Strategy<Value = (usize, Damage)> {
    let bytes = prop::collection::vec(any::<u8>(), 1..64);
    (
        0usize..8,
        prop_oneof![
            (0.0f64..1.0, bytes.clone()).prop_map(|(at, bytes)| Damage::Overwrite { at, bytes }),
            prop_oneof![Just(0.0f64), 0.0f64..1.0].prop_map(|at| Damage::Truncate { at }),
            bytes.clone().prop_map(Damage::Append),
            prop::collection::vec(any::<u8>(), 0..512).prop_map(Damage::Replace),
        ],
    )
}

fn written(n: u64) -> Vec<Record> {
    (1..=n)
        .map(|i| {
            rec(
                (i % 3) as u8,
                i,
                format!("payload {i:04} {}", "x".repeat((i * 7 % 40) as usize)).as_bytes(),
            )
        })
        .collect()
}

fn options(segment_size: u64, preallocate: bool) -> WalOptions {
    WalOptions {
        segment_size,
        preallocate,
        ..WalOptions::default()
    }
}

fn apply(path: &Path, damage: &Damage) {
    let mut data = fs::read(path).unwrap();
    let at = |f: f64, len: usize| ((len as f64) * f) as usize;
    match damage {
        Damage::Overwrite { at: f, bytes } => {
            let start = at(*f, data.len());
            for (i, b) in bytes.iter().enumerate() {
                if let Some(slot) = data.get_mut(start + i) {
                    *slot = *b;
                }
            }
        }
        Damage::Truncate { at: f } => data.truncate(at(*f, data.len())),
        Damage::Append(bytes) => data.extend_from_slice(bytes),
        Damage::Replace(bytes) => data = bytes.clone(),
    }
    fs::write(path, data).unwrap();
}

/// Opens in a thread so that a hang fails the case instead of the whole run.
fn open_within(dir: &Path, opts: WalOptions) -> Result<Vec<Record>, WalError> {
    let (tx, rx) = mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Wal::open(&dir, opts).map(|(_, recovered)| recovered));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("Wal::open answered within 10 s")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn damaged_logs_open_or_fail_cleanly_and_never_invent_records(
        records in 1u64..60,
        segment_size in prop_oneof![Just(256u64), Just(1024), Just(64 * 1024)],
        preallocate in any::<bool>(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let opts = options(segment_size, preallocate);
        let written = written(records);
        {
            let (wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
            append_all(&wal, &written);
            wal.sync_to(u64::MAX).unwrap();
        }
        let files = segment_files(tmp.path());
        for (which, d) in &damages {
            let file = match d {
                Damage::Truncate { at } if *at > 0.0 => files.len() - 1,
                _ => which % files.len(),
            };
            apply(&files[file], d);
        }
        match open_within(tmp.path(), opts.clone()) {
            // Recovered: a prefix of what was written, nothing made up.
            Ok(recovered) => {
                prop_assert!(recovered.len() <= written.len());
                let indexes: Vec<u64> = recovered.iter().map(|r| r.index).collect();
                prop_assert_eq!(
                    &recovered[..],
                    &written[..recovered.len()],
                    "recovered indexes {:?} of {} segments",
                    indexes,
                    files.len()
                );
                // And the log is usable again: what is appended now comes back next time.
                let (wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
                wal.append(&[(9, 1_000_000, b"after".as_slice())]).unwrap();
                wal.sync_to(u64::MAX).unwrap();
                drop(wal);
                let again = open_within(tmp.path(), opts).unwrap();
                prop_assert_eq!(again.len(), recovered.len() + 1, "after appending once more");
                prop_assert_eq!(&again[..recovered.len()], &recovered[..]);
            }
            // Refused: with a reason, and the files are left for an operator to look at.
            Err(WalError::Corrupt { .. }) | Err(WalError::Io { .. }) => {}
            Err(other) => {
                prop_assert!(!other.to_string().is_empty());
            }
        }
    }
}

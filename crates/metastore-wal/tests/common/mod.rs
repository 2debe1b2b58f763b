#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use metastore_wal::{Record, Wal, WalOptions};

pub fn rec(kind: u8, index: u64, payload: &[u8]) -> Record {
    Record {
        kind,
        index,
        payload: payload.to_vec(),
    }
}

/// Segment files of `dir`, oldest first (fixed-width hex names sort numerically).
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// `first_index` encoded in a segment file name.
pub fn first_index_of(path: &Path) -> u64 {
    let name = path.file_stem().unwrap().to_str().unwrap();
    let (_, first) = name.split_once('-').unwrap();
    u64::from_str_radix(first, 16).unwrap()
}

pub fn open(dir: &Path) -> (Wal, Vec<Record>) {
    Wal::open(dir, WalOptions::default()).unwrap()
}

pub fn open_with(dir: &Path, segment_size: u64) -> (Wal, Vec<Record>) {
    Wal::open(
        dir,
        WalOptions {
            segment_size,
            ..WalOptions::default()
        },
    )
    .unwrap()
}

/// A log whose segments grow as they are written (no zero-filled room after the records).
pub fn open_plain(dir: &Path) -> (Wal, Vec<Record>) {
    Wal::open(
        dir,
        WalOptions {
            preallocate: false,
            ..WalOptions::default()
        },
    )
    .unwrap()
}

pub fn append_all(wal: &Wal, records: &[Record]) {
    for r in records {
        wal.append(&[(r.kind, r.index, &r.payload)]).unwrap();
    }
}

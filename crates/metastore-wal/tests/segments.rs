#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use metastore_wal::{Record, Wal, WalOptions};

#[test]
fn preallocated_segments_are_cut_to_their_records_when_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let segment_size = 4096;
    let records: Vec<Record> = (1..=40u64).map(|i| rec(1, i, &[i as u8; 300])).collect();
    {
        let (wal, _) = open_with(tmp.path(), segment_size);
        for r in &records {
            wal.append_sync(r.kind, r.index, &r.payload).unwrap();
        }
    }
    let files = segment_files(tmp.path());
    assert!(files.len() >= 3, "{files:?}");
    let record_len = metastore_wal::encoded_len(300) as u64;
    let (last, closed) = files.split_last().unwrap();
    for f in closed {
        let len = std::fs::metadata(f).unwrap().len();
        assert_eq!(
            len % record_len,
            0,
            "{f:?} holds whole records only: {len} bytes"
        );
        assert!(len > segment_size, "{f:?} was filled before it was closed");
    }
    assert!(
        std::fs::metadata(last).unwrap().len() >= segment_size,
        "the active segment was created at its full size"
    );
    let (_wal, recovered) = open_with(tmp.path(), segment_size);
    assert_eq!(recovered, records);
}

#[test]
fn a_preallocated_segment_is_cut_when_a_smaller_segment_size_closes_it() {
    // Written with large segments, then reopened with small ones: the active segment, still
    // mostly zeros, is closed by the next write and must lose its zeros, or it would be a
    // non-last segment with zeros after its records at the next start.
    let tmp = tempfile::tempdir().unwrap();
    let first: Vec<Record> = (1..=3u64).map(|i| rec(1, i, b"before")).collect();
    {
        let (wal, _) = open_with(tmp.path(), 64 * 1024);
        append_all(&wal, &first);
        wal.sync_to(u64::MAX).unwrap();
    }
    let active = segment_files(tmp.path()).pop().unwrap();
    assert_eq!(std::fs::metadata(&active).unwrap().len(), 64 * 1024);
    let second: Vec<Record> = (4..=8u64).map(|i| rec(1, i, &[i as u8; 100])).collect();
    {
        let (wal, recovered) = open_with(tmp.path(), 200);
        assert_eq!(recovered, first);
        for r in &second {
            wal.append_sync(r.kind, r.index, &r.payload).unwrap();
        }
    }
    // It took two more records before it passed 200 bytes and the next write closed it.
    assert_eq!(
        std::fs::metadata(&active).unwrap().len(),
        (3 * metastore_wal::encoded_len(b"before".len()) + 2 * metastore_wal::encoded_len(100))
            as u64
    );
    let (_wal, recovered) = open_with(tmp.path(), 200);
    let mut all = first;
    all.extend(second);
    assert_eq!(recovered, all);
}

#[test]
fn without_preallocation_segments_grow_with_their_records() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<Record> = (1..=5u64).map(|i| rec(1, i, b"grows")).collect();
    {
        let (wal, _) = open_plain(tmp.path());
        append_all(&wal, &records);
        wal.sync_to(u64::MAX).unwrap();
    }
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 1);
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().len(),
        5 * metastore_wal::encoded_len(5) as u64
    );
    assert!(!tmp.path().join("next-segment.wal.tmp").exists());
}

#[test]
fn rotation_and_purge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let records: Vec<Record> = (1..=200u64)
        .map(|i| rec((i % 3) as u8, i, &[i as u8; 100]))
        .collect();
    {
        let (wal, _) = open_with(dir, 1024);
        for chunk in records.chunks(7) {
            append_all(&wal, chunk);
            wal.sync_to(u64::MAX).unwrap();
        }
        assert!(wal.segment_count() > 5, "{}", wal.segment_count());
        assert_eq!(wal.segment_count(), segment_files(dir).len());
    }
    let files = segment_files(dir);
    // Every closed segment holds just over segment_size bytes; names carry the first index.
    for f in &files[..files.len() - 1] {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len > 1024 && len <= 1024 + 117, "{f:?}: {len}");
    }
    assert_eq!(first_index_of(&files[0]), 1);

    let (wal, recovered) = open_with(dir, 1024);
    assert_eq!(recovered, records);

    // Nothing is below index 1.
    assert_eq!(wal.purge_below(0).unwrap(), 0);
    assert_eq!(wal.purge_below(1).unwrap(), 0);

    let before = files.len();
    let removed = wal.purge_below(50).unwrap();
    let after = segment_files(dir);
    assert_eq!(removed, before - after.len());
    assert!(removed > 0);
    assert_eq!(wal.segment_count(), after.len());
    // The first remaining segment is the one holding index 50: everything removed was below.
    assert!(first_index_of(&after[0]) <= 50);
    assert!(first_index_of(&after[1]) > 50);
    drop(wal);

    let (wal, recovered) = open_with(dir, 1024);
    let first = first_index_of(&after[0]);
    assert_eq!(recovered, records[(first - 1) as usize..]);

    // Purging everything keeps the active segment, and the log keeps working.
    wal.purge_below(u64::MAX).unwrap();
    assert_eq!(wal.segment_count(), 1);
    assert_eq!(segment_files(dir).len(), 1);
    let active_first = first_index_of(&segment_files(dir)[0]);
    wal.append_sync(9, 500, b"after purge").unwrap();
    drop(wal);
    let (wal, recovered) = open_with(dir, 1024);
    let mut expected = records[(active_first - 1) as usize..].to_vec();
    expected.push(rec(9, 500, b"after purge"));
    assert_eq!(recovered, expected);
    assert_eq!(wal.segment_count(), segment_files(dir).len());
}

#[test]
fn purge_stops_at_first_segment_with_a_high_index() {
    // Indexes may go backwards (e.g. a log truncation rewrote them): purge must not delete a
    // later low-index segment while an earlier one survives, or recovery would replay stale data.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (wal, _) = open_with(dir, 1);
    for index in [100u64, 5, 6, 7] {
        wal.append_sync(0, index, b"r").unwrap();
    }
    assert_eq!(wal.segment_count(), 4);
    assert_eq!(wal.purge_below(50).unwrap(), 0);
    assert_eq!(wal.purge_below(101).unwrap(), 3);
    assert_eq!(wal.segment_count(), 1);
    drop(wal);
    let (_wal, recovered) = open_with(dir, 1);
    assert_eq!(recovered, vec![rec(0, 7, b"r")]);
}

#[test]
fn group_commit() {
    const THREADS: u64 = 64;
    const PER_THREAD: u64 = 200;
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    let wal = Arc::new(wal);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                let mut last = 0;
                for i in 0..PER_THREAD {
                    let payload = format!("thread {t} record {i}");
                    let lsn = wal
                        .append_sync(t as u8, t * 1_000_000 + i, payload.as_bytes())
                        .unwrap();
                    assert!(lsn > last);
                    // Returned means synced: no waiter may leave before the fsync covering it.
                    assert!(wal.durable_lsn() >= lsn);
                    last = lsn;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = wal.stats();
    let total = THREADS * PER_THREAD;
    assert_eq!(stats.records, total);
    assert!(
        stats.fsyncs < stats.records,
        "no group commit: {} fsyncs for {} records",
        stats.fsyncs,
        stats.records
    );
    eprintln!(
        "group commit: {} records, {} fsyncs",
        stats.records, stats.fsyncs
    );
    drop(wal);

    let (_wal, recovered) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(recovered.len() as u64, total);
    // Each thread's records are all there and in its own order.
    let mut next = vec![0u64; THREADS as usize];
    for r in &recovered {
        let t = r.kind as u64;
        let i = next[t as usize];
        assert_eq!(r.index, t * 1_000_000 + i);
        assert_eq!(r.payload, format!("thread {t} record {i}").as_bytes());
        next[t as usize] += 1;
    }
    assert!(next.iter().all(|&n| n == PER_THREAD));
}

#[test]
fn concurrent_appends_across_rotations() {
    const THREADS: u64 = 16;
    const PER_THREAD: u64 = 100;
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = open_with(tmp.path(), 2048);
    let wal = Arc::new(wal);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    // Mix buffered batches and synced singles.
                    if i % 3 == 0 {
                        let lsn = wal
                            .append(&[(t as u8, i, &[t as u8; 40][..]), (t as u8, i, &[])])
                            .unwrap();
                        wal.sync_to(lsn).unwrap();
                    } else {
                        wal.append_sync(t as u8, i, &[t as u8; 40]).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(wal.segment_count() > 10);
    drop(wal);
    let (_wal, recovered) = open_with(tmp.path(), 2048);
    let mut next = vec![0u64; THREADS as usize];
    for r in &recovered {
        let t = r.kind as usize;
        if r.payload.is_empty() {
            assert_eq!(r.index + 1, next[t]);
            assert_eq!(r.index % 3, 0);
        } else {
            assert_eq!(r.index, next[t]);
            assert_eq!(r.payload, vec![t as u8; 40]);
            next[t] += 1;
        }
    }
    assert!(next.iter().all(|&n| n == PER_THREAD));
    assert_eq!(
        recovered.len() as u64,
        THREADS * PER_THREAD + THREADS * PER_THREAD.div_ceil(3)
    );
}

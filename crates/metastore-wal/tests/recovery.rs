#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::PathBuf;

use common::*;
use metastore_wal::{encoded_len, Record, Wal, WalError, WalOptions, MAX_PAYLOAD};

fn sample_records() -> Vec<Record> {
    vec![
        rec(0, 0, b""),
        rec(1, 1, b"a"),
        rec(255, u64::MAX, b"max index"),
        rec(7, 42, &[0u8; 1000]),
        rec(2, 3, b""),
        rec(
            3,
            1 << 40,
            &(0..=255u8).cycle().take(100_000).collect::<Vec<_>>(),
        ),
        rec(9, 5, b"last"),
    ]
}

#[test]
fn round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let records = sample_records();
    {
        let (wal, recovered) = open(&dir);
        assert!(recovered.is_empty());
        assert_eq!(wal.segment_count(), 0);
        assert_eq!(wal.dir(), dir.as_path());
        // A batch and single appends; Lsns are 1-based and consecutive.
        let batch: Vec<(u8, u64, &[u8])> = records[..3]
            .iter()
            .map(|r| (r.kind, r.index, r.payload.as_slice()))
            .collect();
        assert_eq!(wal.append(&batch).unwrap(), 3);
        assert_eq!(wal.append(&[]).unwrap(), 3);
        let mut lsn = 3;
        for r in &records[3..] {
            lsn = wal.append_sync(r.kind, r.index, &r.payload).unwrap();
        }
        assert_eq!(lsn, records.len() as u64);
        let stats = wal.stats();
        assert_eq!(stats.records, records.len() as u64);
        let bytes: usize = records.iter().map(|r| encoded_len(r.payload.len())).sum();
        assert_eq!(stats.bytes, bytes as u64);
        assert_eq!(wal.segment_count(), 1);
    }
    let (wal, recovered) = open(&dir);
    assert_eq!(recovered, records);
    // Lsns continue after the recovered count.
    assert_eq!(
        wal.append_sync(4, 100, b"after reopen").unwrap(),
        records.len() as u64 + 1
    );
    drop(wal);
    let (_wal, recovered) = open(&dir);
    assert_eq!(recovered.len(), records.len() + 1);
    assert_eq!(recovered[..records.len()], records[..]);
    assert_eq!(recovered[records.len()], rec(4, 100, b"after reopen"));
}

#[test]
fn unsynced_records_are_flushed_on_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let records = sample_records();
    {
        let (wal, _) = open(tmp.path());
        append_all(&wal, &records);
    }
    let (_wal, recovered) = open(tmp.path());
    assert_eq!(recovered, records);
}

#[test]
fn record_too_large_is_rejected_without_side_effects() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = open(tmp.path());
    let big = vec![0u8; MAX_PAYLOAD + 1];
    match wal.append(&[(1, 1, b"ok"), (1, 2, &big)]) {
        Err(WalError::RecordTooLarge(n)) => assert_eq!(n, MAX_PAYLOAD + 1),
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    // Nothing of the rejected batch was appended and the log is still usable.
    assert_eq!(wal.append_sync(1, 3, b"next").unwrap(), 1);
    drop(wal);
    let (_wal, recovered) = open(tmp.path());
    assert_eq!(recovered, vec![rec(1, 3, b"next")]);
}

/// Writes `records` into a fresh log in `dir` and returns the single segment file's bytes,
/// its name, and the offset at which each record starts.
fn build_single_segment(
    dir: &std::path::Path,
    records: &[Record],
) -> (Vec<u8>, String, Vec<usize>) {
    let (wal, _) = open_plain(dir);
    append_all(&wal, records);
    wal.sync_to(u64::MAX).unwrap();
    drop(wal);
    let files = segment_files(dir);
    assert_eq!(files.len(), 1);
    let bytes = fs::read(&files[0]).unwrap();
    let mut offsets = Vec::new();
    let mut off = 0;
    for r in records {
        offsets.push(off);
        off += encoded_len(r.payload.len());
    }
    assert_eq!(off, bytes.len());
    let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
    (bytes, name, offsets)
}

#[test]
fn torn_tail_at_every_byte_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<Record> = (1..=5u64)
        .map(|i| rec(i as u8, i * 10, format!("payload number {i}").as_bytes()))
        .collect();
    let (orig, name, offsets) = build_single_segment(&tmp.path().join("orig"), &records);
    let last_start = *offsets.last().unwrap();
    let whole = &records[..records.len() - 1];

    for cut in last_start..orig.len() {
        let dir = tmp.path().join(format!("cut-{cut}"));
        fs::create_dir_all(&dir).unwrap();
        let seg = dir.join(&name);
        fs::write(&seg, &orig[..cut]).unwrap();

        let (wal, recovered) = open(&dir);
        assert_eq!(recovered, whole, "cut at {cut}");
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            last_start as u64,
            "file truncated to the last whole record (cut at {cut})"
        );
        let lsn = wal
            .append_sync(77, 1000, b"appended after recovery")
            .unwrap();
        assert_eq!(lsn, whole.len() as u64 + 1);
        drop(wal);

        let (wal, recovered) = open(&dir);
        let mut expected = whole.to_vec();
        expected.push(rec(77, 1000, b"appended after recovery"));
        assert_eq!(recovered, expected, "reopen after append (cut at {cut})");
        // Dropped first: its thread may be filling the next segment in this directory.
        drop(wal);
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn garbage_tail_is_dropped_but_garbage_in_the_middle_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<Record> = (1..=5u64)
        .map(|i| rec(1, i, format!("record {i} with some bytes").as_bytes()))
        .collect();
    let (orig, name, offsets) = build_single_segment(&tmp.path().join("orig"), &records);

    // Damage the payload of the last record (CRC mismatch on a record ending at EOF): torn.
    {
        let dir = tmp.path().join("tail");
        fs::create_dir_all(&dir).unwrap();
        let mut bytes = orig.clone();
        let n = bytes.len();
        bytes[n - 3..].copy_from_slice(b"XYZ");
        fs::write(dir.join(&name), &bytes).unwrap();
        let (wal, recovered) = open(&dir);
        assert_eq!(recovered, records[..4]);
        assert_eq!(
            fs::metadata(dir.join(&name)).unwrap().len(),
            offsets[4] as u64
        );
        wal.append_sync(1, 6, b"six").unwrap();
        drop(wal);
        let (_wal, recovered) = open(&dir);
        assert_eq!(recovered.len(), 5);
        assert_eq!(recovered[4], rec(1, 6, b"six"));
    }

    // The same damage to the third record (records follow it): Corrupt at its offset.
    for (what, pos) in [
        ("payload", offsets[3] - 3),
        ("crc field", offsets[2] + 5),
        ("kind", offsets[2] + 8),
        ("index", offsets[2] + 10),
    ] {
        let dir = tmp
            .path()
            .join(format!("middle-{}", what.replace(' ', "-")));
        fs::create_dir_all(&dir).unwrap();
        let mut bytes = orig.clone();
        bytes[pos] ^= 0x5a;
        let seg = dir.join(&name);
        fs::write(&seg, &bytes).unwrap();
        let (path, offset) = corruption(&dir);
        assert_eq!(path, seg, "{what}");
        assert_eq!(offset, offsets[2] as u64, "{what}");
        // Never silently repaired: the file is untouched.
        assert_eq!(fs::read(&seg).unwrap(), bytes, "{what}");
    }
}

#[test]
fn zeros_after_the_records_are_kept_and_overwritten_but_bad_length_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<Record> = (1..=3u64).map(|i| rec(0, i, b"abc")).collect();
    let (orig, name, _) = build_single_segment(&tmp.path().join("orig"), &records);

    // A preallocated segment: the records, then zeros to its full size. A spare left
    // half-written by the previous process is replaced, never read.
    let dir = tmp.path().join("zeros");
    fs::create_dir_all(&dir).unwrap();
    let mut bytes = orig.clone();
    bytes.extend_from_slice(&[0u8; 4096]);
    let seg = dir.join(&name);
    fs::write(&seg, &bytes).unwrap();
    fs::write(dir.join("next-segment.wal.tmp"), b"half-written garbage").unwrap();
    let (wal, recovered) = open(&dir);
    assert_eq!(recovered, records);
    assert_eq!(fs::metadata(&seg).unwrap().len(), bytes.len() as u64);
    wal.append_sync(0, 4, b"after restart").unwrap();
    drop(wal);
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        bytes.len() as u64,
        "the new record overwrote zeros instead of growing the file"
    );
    let (_wal, recovered) = open(&dir);
    let mut expected = records.clone();
    expected.push(rec(0, 4, b"after restart"));
    assert_eq!(recovered, expected);

    let dir = tmp.path().join("badlen");
    fs::create_dir_all(&dir).unwrap();
    let mut bytes = orig.clone();
    bytes.extend_from_slice(&[3, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    fs::write(dir.join(&name), &bytes).unwrap();
    assert_eq!(corruption(&dir).1, orig.len() as u64);
}

#[test]
fn torn_record_before_preallocated_zeros_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<Record> = (1..=5u64)
        .map(|i| rec(2, i, format!("record {i} before the zeros").as_bytes()))
        .collect();
    let (orig, name, offsets) = build_single_segment(&tmp.path().join("orig"), &records);
    let last_start = *offsets.last().unwrap();
    let whole = &records[..records.len() - 1];
    let file_len = orig.len() + 512;

    // The crash wrote the last record only up to `cut`; the zeros it would have overwritten
    // are still there.
    for cut in last_start + 1..orig.len() {
        let dir = tmp.path().join(format!("cut-{cut}"));
        fs::create_dir_all(&dir).unwrap();
        let seg = dir.join(&name);
        let mut bytes = orig[..cut].to_vec();
        bytes.resize(file_len, 0);
        fs::write(&seg, &bytes).unwrap();

        let (wal, recovered) = open(&dir);
        assert_eq!(recovered, whole, "cut at {cut}");
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            last_start as u64,
            "cut to the last whole record (cut at {cut})"
        );
        wal.append_sync(9, 99, b"after the torn record").unwrap();
        drop(wal);
        let (wal, recovered) = open(&dir);
        let mut expected = whole.to_vec();
        expected.push(rec(9, 99, b"after the torn record"));
        assert_eq!(recovered, expected, "reopen after append (cut at {cut})");
        drop(wal);
        fs::remove_dir_all(&dir).unwrap();
    }

    // The same damage with records after it is corruption, zeros or not.
    let dir = tmp.path().join("middle");
    fs::create_dir_all(&dir).unwrap();
    let mut bytes = orig.clone();
    bytes[offsets[2] + HEADER_AND_KIND] ^= 0x5a;
    bytes.resize(file_len, 0);
    fs::write(dir.join(&name), &bytes).unwrap();
    assert_eq!(corruption(&dir).1, offsets[2] as u64);
}

#[test]
fn sectors_a_power_loss_left_unwritten_make_a_torn_tail_not_corruption() {
    // One group commit wrote these records over a preallocated segment's zeros, and power
    // failed before its fsync ended: the device kept some of its sectors and not others.
    let tmp = tempfile::tempdir().unwrap();
    let acked: Vec<Record> = (1..=3u64).map(|i| rec(1, i, &[7u8; 100])).collect();
    let batch: Vec<Record> = (4..=12u64).map(|i| rec(1, i, &[i as u8; 300])).collect();
    let mut all = acked.clone();
    all.extend(batch.iter().cloned());
    let (orig, name, offsets) = build_single_segment(&tmp.path().join("orig"), &all);
    let batch_start = offsets[3];
    let file_len = orig.len() + 4096;
    let sector = |n: usize| n * 512..(n + 1) * 512;

    let first_batch_sector = batch_start / 512;
    let last_sector = (orig.len() - 1) / 512;
    for lost in first_batch_sector..=last_sector {
        let dir = tmp.path().join(format!("lost-{lost}"));
        fs::create_dir_all(&dir).unwrap();
        let mut bytes = orig.clone();
        bytes.resize(file_len, 0);
        // The sector holding the batch's first bytes also holds acknowledged ones, which an
        // earlier fsync made durable: only the batch's part of it can be missing.
        let range = sector(lost);
        let from = range.start.max(batch_start);
        bytes[from..range.end.min(orig.len())].fill(0);
        let seg = dir.join(&name);
        fs::write(&seg, &bytes).unwrap();

        let (wal, recovered) = open(&dir);
        assert!(
            recovered.len() >= acked.len() && recovered[..] == all[..recovered.len()],
            "sector {lost} lost: the acknowledged records and nothing but a prefix of the batch"
        );
        assert!(
            recovered.len() < all.len(),
            "sector {lost} lost: the damaged record and everything after it are gone"
        );
        wal.append_sync(2, 100, b"after the power loss").unwrap();
        drop(wal);
        let (wal, again) = open(&dir);
        let mut expected = recovered.clone();
        expected.push(rec(2, 100, b"after the power loss"));
        assert_eq!(
            again, expected,
            "sector {lost} lost: reopened after an append"
        );
        drop(wal);
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn zeros_after_the_records_of_a_non_last_segment_are_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let files = twenty_records_in_segments_of(tmp.path(), 300);
    assert!(files.len() >= 2);
    let mut first = fs::read(&files[0]).unwrap();
    let records_len = first.len();
    first.resize(records_len + 1024, 0);
    fs::write(&files[0], &first).unwrap();
    assert_eq!(
        corruption(tmp.path()),
        (files[0].clone(), records_len as u64)
    );
}

/// Writes 20 records of 50 bytes into segments of `segment_size` and lists the segment files.
fn twenty_records_in_segments_of(dir: &std::path::Path, segment_size: u64) -> Vec<PathBuf> {
    let records: Vec<Record> = (1..=20u64).map(|i| rec(0, i, &[i as u8; 50])).collect();
    let (wal, _) = open_with(dir, segment_size);
    append_all(&wal, &records);
    wal.sync_to(u64::MAX).unwrap();
    drop(wal);
    segment_files(dir)
}

/// Where [`Wal::open`] reports corruption; panics if it opens or fails otherwise.
fn corruption(dir: &std::path::Path) -> (PathBuf, u64) {
    match Wal::open(dir, WalOptions::default()) {
        Err(WalError::Corrupt { path, offset, .. }) => (path, offset),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Offset of a record's index field: damage there fails the CRC.
const HEADER_AND_KIND: usize = 9;

#[test]
fn damage_in_a_non_last_segment_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let files = twenty_records_in_segments_of(tmp.path(), 100);
    assert!(files.len() >= 3);
    // Cut the first segment inside its last record: fine for a last segment, not here.
    let first = fs::read(&files[0]).unwrap();
    fs::write(&files[0], &first[..first.len() - 1]).unwrap();
    let (path, offset) = corruption(tmp.path());
    assert_eq!(path, files[0]);
    assert_eq!(offset, (first.len() - encoded_len(50)) as u64);
    fs::write(&files[0], &first).unwrap();

    // A missing segment in the middle is reported, not skipped.
    fs::remove_file(&files[1]).unwrap();
    assert_eq!(corruption(tmp.path()).0, files[2]);
}

#[test]
fn write_failure_poisons_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = open_with(tmp.path(), 1);
    wal.append_sync(0, 5, b"first").unwrap();
    // The next record goes to segment 2 named after its index; occupy that name with a
    // directory so creating the segment fails.
    let blocker = tmp.path().join(format!("{:016x}-{:016x}.wal", 2u64, 6u64));
    fs::create_dir(&blocker).unwrap();
    match wal.append_sync(0, 6, b"second") {
        Err(WalError::Io { path, .. }) => assert_eq!(path, blocker),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(matches!(
        wal.append(&[(0, 7, b"x")]),
        Err(WalError::Poisoned)
    ));
    assert!(matches!(wal.sync_to(1), Err(WalError::Poisoned)));
    assert!(matches!(
        wal.append_sync(0, 7, b"x"),
        Err(WalError::Poisoned)
    ));
    assert!(matches!(wal.purge_below(100), Err(WalError::Poisoned)));
    drop(wal);

    fs::remove_dir(&blocker).unwrap();
    let (_wal, recovered) = open_with(tmp.path(), 1);
    assert_eq!(recovered, vec![rec(0, 5, b"first")]);
}

#[test]
fn an_emptied_segment_before_the_last_is_corrupt_not_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let files = twenty_records_in_segments_of(tmp.path(), 100);
    assert!(files.len() >= 3);
    fs::write(&files[1], b"").unwrap();
    assert_eq!(corruption(tmp.path()), (files[1].clone(), 0));
}

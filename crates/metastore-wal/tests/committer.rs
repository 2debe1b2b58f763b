//! `Committer`: async group commit over a `Wal`.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::sync::Arc;

use common::{open_with, rec, segment_files};
use metastore_wal::{encoded_len, Committer, WalError};

fn on_disk_bytes(dir: &std::path::Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_share_fsyncs_and_every_awaited_record_is_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = open_with(tmp.path(), 64 * 1024);
    let committer = Arc::new(Committer::new(Arc::new(wal)).unwrap());
    let (tasks, per_task) = (64u64, 50u64);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let committer = committer.clone();
        let dir = tmp.path().to_path_buf();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let payload = format!("task {t} record {i}");
                let lsn = committer
                    .append(&[(1, t * per_task + i, payload.as_bytes())])
                    .await
                    .unwrap();
                // The contract: once the future resolves, the record and all before it are
                // written and synced — without dropping (and so flushing) the log.
                assert!(committer.wal().durable_lsn() >= lsn);
                let min_bytes = lsn * encoded_len("task 0 record 0".len()) as u64;
                assert!(on_disk_bytes(&dir) >= min_bytes);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let stats = committer.wal().stats();
    assert_eq!(stats.records, tasks * per_task);
    // 64 tasks wait at once: a broken group commit (one fsync per record) shows here.
    assert!(
        stats.fsyncs < stats.records / 2,
        "{} fsyncs for {} records",
        stats.fsyncs,
        stats.records
    );
    drop(committer);

    let (_wal, recovered) = open_with(tmp.path(), 64 * 1024);
    assert_eq!(recovered.len() as u64, tasks * per_task);
    // Each task's records are all there and in its own order.
    for t in 0..tasks {
        let mine: Vec<_> = recovered
            .iter()
            .filter(|r| r.index / per_task == t)
            .collect();
        assert_eq!(mine.len() as u64, per_task);
        for (i, r) in mine.iter().enumerate() {
            assert_eq!(r.index, t * per_task + i as u64);
            assert_eq!(r.payload, format!("task {t} record {i}").as_bytes());
        }
    }
}

#[tokio::test]
async fn sync_of_durable_records_resolves_at_once_and_drop_stops_the_flusher() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = open_with(tmp.path(), 1 << 20);
    let lsn = wal.append_sync(0, 1, b"synced by the caller").unwrap();
    let wal = Arc::new(wal);
    let committer = Committer::new(wal.clone()).unwrap();
    let fsyncs = wal.stats().fsyncs;
    committer.sync(lsn).await.unwrap();
    committer.sync(0).await.unwrap();
    // Beyond the last appended record is clamped to it, as for `Wal::sync_to`.
    committer.sync(lsn + 100).await.unwrap();
    assert_eq!(wal.stats().fsyncs, fsyncs, "nothing new to sync");

    // A record appended outside the committer is synced when awaited through it.
    let lsn = wal.append(&[(0, 2, b"appended directly")]).unwrap();
    committer.sync(lsn).await.unwrap();
    assert!(wal.durable_lsn() >= lsn);
    drop(committer);
    drop(wal);

    let (_wal, recovered) = open_with(tmp.path(), 1 << 20);
    assert_eq!(
        recovered,
        vec![
            rec(0, 1, b"synced by the caller"),
            rec(0, 2, b"appended directly")
        ]
    );
}

#[tokio::test]
async fn a_failed_flush_fails_the_waiters_and_poisons_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, _) = open_with(tmp.path(), 1);
    let committer = Committer::new(Arc::new(wal)).unwrap();
    committer.append(&[(0, 5, b"first")]).await.unwrap();
    // The next record goes to segment 2 named after its index; occupy that name with a
    // directory so creating the segment fails.
    let blocker = tmp.path().join(format!("{:016x}-{:016x}.wal", 2u64, 6u64));
    fs::create_dir(&blocker).unwrap();
    // The flusher hit the error (and logged it); its waiters learn that the log is poisoned.
    assert!(matches!(
        committer.append(&[(0, 6, b"second")]).await,
        Err(WalError::Poisoned)
    ));
    assert!(matches!(
        committer.append(&[(0, 7, b"x")]).await,
        Err(WalError::Poisoned)
    ));
    drop(committer);

    fs::remove_dir(&blocker).unwrap();
    let (_wal, recovered) = open_with(tmp.path(), 1);
    assert_eq!(recovered, vec![rec(0, 5, b"first")]);
}

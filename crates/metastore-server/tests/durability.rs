//! Durable restarts on both engines (METASTORE_TEST_STORAGE picks one): snapshots / flushes
//! purge the WAL and restarts recover from them; a torn WAL tail is truncated; a damaged record
//! in the middle stops startup with the file and offset; the NOSPACE alarm as etcd has it.

mod common;

use common::TestServer;
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, GetOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn wal_segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("member/wal"))
        .expect("wal dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

fn small_segments_config(dir: &Path) -> PathBuf {
    let path = dir.join("small-wal.yaml");
    std::fs::write(&path, "raft:\n  wal-segment-size: 32768\n").expect("config");
    path
}

async fn put_many(srv: &TestServer, prefix: &str, n: usize) -> Vec<(String, i64)> {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = srv.client().await;
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in (t..n).step_by(8) {
                let k = format!("{prefix}{i:05}");
                let r = c
                    .put(k.clone(), format!("value-{i}"), None)
                    .await
                    .expect("put");
                acked.push((k, r.header().expect("header").revision()));
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    all
}

async fn check_all(srv: &TestServer, acked: &[(String, i64)]) {
    let mut c = srv.client().await;
    for (k, rev) in acked {
        let r = c.get(k.as_str(), None).await.expect("get");
        let kv = r.kvs().first().unwrap_or_else(|| panic!("{k} lost"));
        assert_eq!(kv.mod_revision(), *rev, "{k}");
    }
}

#[tokio::test]
async fn state_is_persisted_the_wal_purged_and_restarts_recover_everything() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let cfg = small_segments_config(scratch.path());
    let mut srv = TestServer::start_with_args(&[
        "--config-file",
        cfg.to_str().expect("utf8"),
        "--snapshot-count",
        "100",
    ])
    .await;
    let acked = put_many(&srv, "p/", 2000).await;
    // 2000 puts in ~32 KiB segments make dozens of segments; persisting every 100 entries lets
    // all but the newest go.
    let segments = wal_segments(srv.data_dir());
    assert!(
        segments.len() < 10,
        "WAL not purged: {} segments",
        segments.len()
    );
    let storage = std::env::var("METASTORE_TEST_STORAGE").unwrap_or_default();
    if storage != "rocksdb" {
        let snaps: Vec<_> = std::fs::read_dir(srv.data_dir().join("member/snap"))
            .expect("snap dir")
            .flatten()
            .collect();
        assert!(
            (1..=3).contains(&snaps.len()),
            "snapshot retention: {} files",
            snaps.len()
        );
    }
    srv.kill9();
    srv.restart().await;
    check_all(&srv, &acked).await;
    // And it goes on from there.
    let more = put_many(&srv, "q/", 200).await;
    assert!(more
        .iter()
        .all(|(_, r)| *r > acked.iter().map(|(_, r)| *r).max().unwrap_or(0)));
    srv.terminate(Duration::from_secs(10));
    srv.restart().await;
    check_all(&srv, &acked).await;
    check_all(&srv, &more).await;
}

/// Offset just past the last record of a WAL segment (`[len: u32][crc: u32][len bytes]`
/// records, then either EOF or preallocated zeros).
fn end_of_records(segment: &[u8]) -> usize {
    let mut off = 0;
    while let Some(len) = segment.get(off..off + 4) {
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len == 0 {
            break;
        }
        off += 8 + len;
    }
    off.min(segment.len())
}

#[tokio::test]
async fn a_torn_wal_tail_is_truncated_on_restart() {
    let mut srv = TestServer::start().await;
    let acked = put_many(&srv, "t/", 300).await;
    srv.kill9();
    // What a crash mid-write leaves: the start of a record whose body never made it, where
    // the next record was going: after the last one, over the zeros of a preallocated segment.
    let last = wal_segments(srv.data_dir()).pop().expect("a segment");
    let write_at = end_of_records(&std::fs::read(&last).expect("read segment"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open segment");
    f.seek(std::io::SeekFrom::Start(write_at as u64))
        .expect("seek");
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9])
        .expect("write");
    drop(f);
    srv.restart().await;
    check_all(&srv, &acked).await;
    let mut c = srv.client().await;
    c.put("after", "ok", None).await.expect("writes go on");
}

#[tokio::test]
async fn a_damaged_record_in_the_middle_stops_startup_naming_file_and_offset() {
    let mut srv = TestServer::start().await;
    let mut c = srv.client().await;
    c.put("early", "CORRUPT-ME-0123456789", None)
        .await
        .expect("put");
    put_many(&srv, "m/", 200).await;
    srv.kill9();
    let segment = wal_segments(srv.data_dir())
        .into_iter()
        .next()
        .expect("segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let at = bytes
        .windows(10)
        .position(|w| w == b"CORRUPT-ME")
        .expect("the value is in the WAL");
    bytes[at + 3] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args(["--data-dir", srv.data_dir().to_str().expect("utf8")])
        .args(["--listen-client-urls", "http://127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success(), "started on a damaged WAL");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("corrupt record"), "{text}");
    assert!(
        text.contains(&*segment.file_name().expect("name").to_string_lossy()),
        "file not named: {text}"
    );
    assert!(text.contains("offset"), "{text}");
}

#[tokio::test]
async fn quota_raises_nospace_refuses_writes_and_serves_reads_until_disarmed() {
    let srv = TestServer::start_with_args(&["--quota-backend-bytes", "300000"]).await;
    let mut c = srv.client().await;
    let big = "x".repeat(50_000);
    let mut refused = None;
    for i in 0..40 {
        match c.put(format!("big/{i}"), big.clone(), None).await {
            Ok(_) => {}
            Err(etcd_client::Error::GRpcStatus(s)) => {
                refused = Some(s);
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let s = refused.expect("the quota was never hit");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert_eq!(s.message(), "etcdserver: mvcc: database space exceeded");
    let alarms = c
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm list");
    assert_eq!(alarms.alarms().len(), 1);
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    let member = alarms.alarms()[0].member_id();
    let status = c.status().await.expect("status");
    assert!(
        status.errors().iter().any(|e| e.contains("NOSPACE")),
        "{:?}",
        status.errors()
    );
    // Reads and deletes still work; small writes are refused while the alarm is up.
    assert!(c.get("big/0", None).await.expect("read").count() == 1);
    let err = c
        .put("small", "1", None)
        .await
        .expect_err("refused while NOSPACE");
    assert!(err.to_string().contains("database space exceeded"), "{err}");
    let deleted = c
        .delete(
            "big/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("delete");
    assert!(deleted.deleted() > 0);
    let rev = deleted.header().expect("header").revision();
    c.compact(rev, None).await.expect("compact");
    c.defragment().await.expect("defragment");
    let mut opts = AlarmOptions::new();
    opts.with_member(member);
    c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts))
        .await
        .expect("disarm");
    assert!(c
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("list")
        .alarms()
        .is_empty());
    c.put("small", "1", None).await.expect("writes work again");
    assert_eq!(
        c.get("small", Some(GetOptions::new()))
            .await
            .expect("get")
            .count(),
        1
    );
}

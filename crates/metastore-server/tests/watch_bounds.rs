//! Watch streams bounded by bytes, played by bad clients: one that sends requests and never
//! reads the answers, one that opens more watchers than a stream allows.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use etcd_client::{WatchOptions, WatchResponse};

/// 64 KiB of queued answers: a few thousand progress responses.
const CONFIG: &str = "watch-stream-queue-bytes: 65536\nmax-watchers-per-stream: 50\n";

async fn start() -> (TestServer, tempfile::NamedTempFile) {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), CONFIG).unwrap();
    let path = config.path().to_str().unwrap().to_string();
    let srv = TestServer::start_with_args(&["--config-file", &path]).await;
    (srv, config)
}

async fn next(stream: &mut etcd_client::WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch response within 10 s")
        .unwrap()
        .expect("the stream is open")
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_watch_requests_without_reading_is_held_back_not_buffered() {
    let (srv, _config) = start().await;
    let pid = srv.pid().unwrap();
    let mut client = srv.client().await;
    let mut stream = client.watch("k", None).await.unwrap();
    assert!(next(&mut stream).await.created());
    let rss_before = rss_bytes(pid);

    // Progress requests as fast as they go, never reading. Once the stream's queue is full the
    // server stops reading the stream: either flow control fills and sending blocks, or the
    // client's tiny frames exhaust h2's budget for unread DATA frames and the connection is
    // cut (ENHANCE_YOUR_CALM). Without the bound, the server would read and queue answers
    // for as long as the client sends.
    let started = Instant::now();
    let mut sent = 0u64;
    let mut cut_off = false;
    let held_back = loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.request_progress()).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => {
                eprintln!("the stream was closed: {e}");
                cut_off = true;
                break false;
            }
            Err(_) => break true,
        }
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    let growth = rss_bytes(pid).saturating_sub(rss_before);
    eprintln!(
        "sent {sent} progress requests in {:?}: held back {held_back}, cut off {cut_off}; \
         server RSS grew {} KiB",
        started.elapsed(),
        growth >> 10
    );
    assert!(
        held_back || cut_off,
        "{sent} requests in 20 s and the server still reads them"
    );
    assert!(growth < 64 << 20, "server RSS grew {growth} bytes");
    // The server answers other clients meanwhile.
    let mut other = srv.client().await;
    other.put("k", "v", None).await.unwrap();
    if cut_off {
        return;
    }

    // Once the client reads, every request it sent is answered, and the event the other
    // client wrote comes through as well.
    let mut progress = 0u64;
    let mut events = 0;
    while progress < sent || events == 0 {
        let resp = next(&mut stream).await;
        if resp.events().is_empty() {
            progress += 1;
        } else {
            events += resp.events().len();
        }
    }
    assert_eq!(events, 1);
    // And it is read again.
    stream.request_progress().await.unwrap();
    assert!(next(&mut stream).await.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_over_the_per_stream_limit_are_refused_with_a_reason() {
    let (srv, _config) = start().await;
    let mut client = srv.client().await;
    let mut stream = client.watch("w/0", None).await.unwrap();
    assert!(next(&mut stream).await.created());
    for i in 1..50 {
        stream.watch(format!("w/{i}"), None).await.unwrap();
        let resp = next(&mut stream).await;
        assert!(resp.created() && !resp.canceled(), "watcher {i}");
    }
    stream
        .watch("w/50", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let refused = next(&mut stream).await;
    assert!(refused.created() && refused.canceled());
    assert_eq!(
        refused.cancel_reason(),
        "mvcc: too many watchers on one watch stream"
    );
    // A watcher canceled frees its place.
    stream.cancel(7).await.unwrap();
    assert!(next(&mut stream).await.canceled());
    stream.watch("w/51", None).await.unwrap();
    let resp = next(&mut stream).await;
    assert!(resp.created() && !resp.canceled());
}

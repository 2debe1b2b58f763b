//! Watch streams bounded by bytes, played by bad clients: one that sends requests and never
//! reads the answers, one that opens more watchers than a stream allows.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{rss_bytes, TestServer};
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

    // Once the client reads, the queued answers come, and the event the other client wrote.
    // Progress requests made while a watcher is behind are answered once, when it has caught
    // up (etcd defers them the same way), so there may be fewer answers than requests.
    let mut progress = 0u64;
    let mut events = 0;
    while events == 0 {
        let resp = next(&mut stream).await;
        if resp.events().is_empty() {
            progress += 1;
        } else {
            events += resp.events().len();
        }
    }
    assert!(progress <= sent, "{progress} answers to {sent} requests");
    // Drain what is left, then the stream is read and answered again.
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_secs(1), stream.message()).await
    {
        assert!(resp.events().is_empty(), "only progress answers are left");
    }
    stream.request_progress().await.unwrap();
    let resp = next(&mut stream).await;
    assert!(resp.events().is_empty() && !resp.canceled());
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

/// Watchers that never read while puts go by (the full size is 1,000 watchers and 100k
/// puts, `scripts/slow_watchers.sh`; the test command runs a smaller one). With every queue
/// bounded, the server holds at most the total limit for them; once they read, each gets
/// every event, in order, from history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_that_never_read_stay_bounded_and_catch_up_event_by_event() {
    let watchers: usize = env_or("METASTORE_SLOW_WATCHERS", 200);
    let puts: usize = env_or("METASTORE_SLOW_WATCHER_PUTS", 2000);
    let connections = 10;
    let config = tempfile::NamedTempFile::new().unwrap();
    // 16 MiB for every stream together; the events are ~100 MiB if queued.
    std::fs::write(config.path(), "watch-total-queue-bytes: 16777216\n").unwrap();
    let path = config.path().to_str().unwrap().to_string();
    let srv = TestServer::start_with_args(&["--config-file", &path]).await;
    let pid = srv.pid().unwrap();
    let mut writer = srv.client().await;
    let start_rev = writer.put("slow-start", "", None).await.unwrap();
    let start_rev = start_rev.header().unwrap().revision();

    let mut streams = Vec::new();
    for c in 0..connections {
        let mut client = srv.client().await;
        for _ in 0..watchers / connections + usize::from(c < watchers % connections) {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(start_rev + 1);
            let mut stream = client.watch("slow/", Some(opts)).await.unwrap();
            assert!(next(&mut stream).await.created());
            streams.push(stream);
        }
    }
    let rss_before = rss_bytes(pid);

    let value = "x".repeat(256);
    let by_revision = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        i64,
        String,
    >::new()));
    let latencies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let next_key = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut kv = writer.kv_client();
        let (by_revision, latencies, next_key) =
            (by_revision.clone(), latencies.clone(), next_key.clone());
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= puts {
                    return;
                }
                let key = format!("slow/{i:07}");
                let t = Instant::now();
                let resp = kv.put(key.clone(), value.clone(), None).await.unwrap();
                latencies.lock().unwrap().push(t.elapsed());
                let rev = resp.header().unwrap().revision();
                by_revision.lock().unwrap().insert(rev, key);
            }
        }));
    }
    let mut peak = rss_before;
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak = peak.max(rss_bytes(pid));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Let dispatch and catch-up settle, still without reading.
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak = peak.max(rss_bytes(pid));
    }
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let p99 = lat[lat.len() * 99 / 100];
    let growth = peak.saturating_sub(rss_before);
    eprintln!(
        "{watchers} watchers not reading, {puts} puts: put p50 {:?} p99 {p99:?}; server RSS grew {} MiB",
        lat[lat.len() / 2],
        growth >> 20
    );
    let unbounded = (watchers * puts * 300) as u64;
    assert!(
        growth < unbounded / 2,
        "server RSS grew {growth} bytes; the events alone are {unbounded}"
    );

    // Now every watcher reads: each must get every put, in revision order, none twice.
    let expected: Vec<(i64, String)> = by_revision.lock().unwrap().clone().into_iter().collect();
    let expected = std::sync::Arc::new(expected);
    let mut readers = Vec::new();
    for (n, mut stream) in streams.into_iter().enumerate() {
        let expected = expected.clone();
        readers.push(tokio::spawn(async move {
            let mut at = 0;
            while at < expected.len() {
                let resp = next(&mut stream).await;
                assert!(!resp.canceled(), "watcher {n} canceled: {resp:?}");
                for ev in resp.events() {
                    let kv = ev.kv().unwrap();
                    let (rev, key) = &expected[at];
                    assert_eq!(
                        (kv.mod_revision(), kv.key_str().unwrap()),
                        (*rev, key.as_str()),
                        "watcher {n}, event {at}"
                    );
                    assert_eq!(kv.value().len(), 256);
                    at += 1;
                }
            }
        }));
    }
    let reading_started = Instant::now();
    let peak_reading = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak_reading.clone();
        async move {
            loop {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for r in readers {
        tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .expect("watchers caught up within 120 s")
            .unwrap();
    }
    sampler.abort();
    eprintln!(
        "caught up in {:?}; server RSS peak while they read {} MiB (before the puts {} MiB)",
        reading_started.elapsed(),
        peak_reading.load(std::sync::atomic::Ordering::Relaxed) >> 20,
        rss_before >> 20
    );
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

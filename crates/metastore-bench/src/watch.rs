//! The watch workloads: watcher creation, and put → event latency.

use crate::report::{Outcome, Recorder, Report};
use crate::{connect, cpu, error_label, Common, WatchArgs, WatchLatencyArgs};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long to wait for events that should arrive before calling them missing.
const EVENT_GRACE: Duration = Duration::from_secs(10);

fn watch_key(i: usize) -> Vec<u8> {
    format!("bench-watch/{i:08}").into_bytes()
}

/// Creates `streams × watch_per_stream` watchers (creation latency is the measured operation,
/// streams create concurrently), then puts `put_total` times to the watched keys and counts
/// every event that reaches a watcher.
pub(crate) async fn watch(args: &WatchArgs, common: &Common) -> Result<Report> {
    if args.streams == 0 || args.watch_per_stream == 0 || args.watched_key_total == 0 {
        bail!("--streams, --watch-per-stream and --watched-key-total must be positive");
    }
    let events = Arc::new(AtomicU64::new(0));
    let cpu_mark = cpu::CpuMark::now(common.server_pid);
    let start = Instant::now();
    let mut creators = Vec::new();
    for s in 0..args.streams {
        let mut client = connect(common).await?;
        let (per, keys, events) = (
            args.watch_per_stream,
            args.watched_key_total,
            events.clone(),
        );
        creators.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            let mut stream: Option<etcd_client::WatchStream> = None;
            for w in 0..per {
                let key = watch_key((s * per + w) % keys);
                let t = Instant::now();
                let sent = match &mut stream {
                    None => client.watch(key, None).await.map(|st| stream = Some(st)),
                    Some(st) => st.watch(key, None).await,
                };
                if let Err(e) = sent {
                    rec.record(t.elapsed(), Outcome::Failed(error_label(&e)));
                    continue;
                }
                let Some(st) = stream.as_mut() else { break };
                loop {
                    match st.message().await {
                        Ok(Some(resp)) if resp.created() => {
                            rec.record(t.elapsed(), Outcome::Ok { items: 1 });
                            break;
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) => {
                            rec.record(t.elapsed(), Outcome::Failed("StreamClosed".into()));
                            return (rec, None);
                        }
                        Err(e) => {
                            rec.record(t.elapsed(), Outcome::Failed(error_label(&e)));
                            return (rec, None);
                        }
                    }
                }
            }
            // Count events from now on, in the background.
            let reader = stream.map(|st| {
                let (sender, mut responses) = st.split();
                tokio::spawn(async move {
                    let _keep = (sender, client);
                    while let Ok(Some(resp)) = responses.message().await {
                        events.fetch_add(resp.events().len() as u64, Ordering::Relaxed);
                    }
                })
            });
            (rec, reader)
        }));
    }
    let mut rec = Recorder::new();
    let mut readers = Vec::new();
    for c in creators {
        let (r, reader) = c.await.context("watch stream task panicked")?;
        rec.merge(r);
        readers.extend(reader);
    }
    let created_in = start.elapsed();
    let cpu_use = cpu_mark.elapsed();

    // Watchers per key, to know how many events each put must produce.
    let mut per_key = vec![0u64; args.watched_key_total];
    for i in 0..args.streams * args.watch_per_stream {
        per_key[i % args.watched_key_total] += 1;
    }
    let mut kv = connect(common).await?.kv_client();
    let value = vec![b'w'; common.val_size];
    let mut expected = 0u64;
    let put_start = Instant::now();
    for p in 0..args.put_total {
        let k = p % args.watched_key_total;
        kv.put(watch_key(k), value.clone(), None).await?;
        expected += per_key[k];
    }
    let deadline = Instant::now() + EVENT_GRACE;
    while events.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered_in = put_start.elapsed();
    for r in readers {
        r.abort();
    }
    let received = events.load(Ordering::Relaxed);
    if received != expected {
        rec.checks.fail(format!(
            "{expected} events expected, {received} arrived within {EVENT_GRACE:?}"
        ));
    } else {
        rec.checks.pass();
    }
    let mut params = serde_json::Map::new();
    params.insert("streams".into(), json!(args.streams));
    params.insert("watch_per_stream".into(), json!(args.watch_per_stream));
    params.insert("watched_key_total".into(), json!(args.watched_key_total));
    params.insert("put_total".into(), json!(args.put_total));
    let mut report = Report::build("watch", params, rec, created_in, cpu_use);
    report
        .extra
        .insert("events_expected".into(), expected as f64);
    report
        .extra
        .insert("events_received".into(), received as f64);
    report.extra.insert(
        "events_per_sec".into(),
        received as f64 / delivered_in.as_secs_f64().max(1e-9),
    );
    Ok(report)
}

/// `streams × watchers_per_stream` watchers on distinct keys; one client puts to random
/// watched keys, one put at a time, and the time from sending the put to the event's arrival
/// is the measured latency.
pub(crate) async fn watch_latency(args: &WatchLatencyArgs, common: &Common) -> Result<Report> {
    if args.streams == 0 || args.watchers_per_stream == 0 {
        bail!("--streams and --watchers-per-stream must be positive");
    }
    let watchers = args.streams * args.watchers_per_stream;
    let sent: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let created = Arc::new(AtomicU64::new(0));
    let setup = Instant::now();
    let mut readers = Vec::new();
    for s in 0..args.streams {
        let mut client = connect(common).await?;
        let first = s * args.watchers_per_stream;
        let mut stream = client.watch(watch_key(first), None).await?;
        for i in first + 1..first + args.watchers_per_stream {
            stream.watch(watch_key(i), None).await?;
        }
        let (sender, mut responses) = stream.split();
        let (sent, lat_tx, created) = (sent.clone(), lat_tx.clone(), created.clone());
        readers.push(tokio::spawn(async move {
            let _keep_open = (sender, client);
            while let Ok(Some(resp)) = responses.message().await {
                if resp.created() {
                    created.fetch_add(1, Ordering::Relaxed);
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let start = sent.lock().ok().and_then(|mut m| m.remove(kv.key()));
                    if let Some(start) = start {
                        let _ = lat_tx.send(start.elapsed());
                    }
                }
            }
        }));
    }
    let setup_deadline = Instant::now() + Duration::from_secs(300);
    while created.load(Ordering::Relaxed) < watchers as u64 {
        if Instant::now() > setup_deadline {
            bail!(
                "only {} of {watchers} watchers were created",
                created.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let setup = setup.elapsed();

    let mut kv = connect(common).await?.kv_client();
    let cpu_mark = cpu::CpuMark::now(common.server_pid);
    let start = Instant::now();
    let mut rec = Recorder::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let value = vec![b'w'; common.val_size];
    for _ in 0..args.put_total {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let k = watch_key(seed as usize % watchers);
        if let Ok(mut m) = sent.lock() {
            m.insert(k.clone(), Instant::now());
        }
        if let Err(e) = kv.put(k, value.clone(), None).await {
            rec.record(Duration::ZERO, Outcome::Failed(error_label(&e)));
            continue;
        }
        match tokio::time::timeout(EVENT_GRACE, lat_rx.recv()).await {
            Ok(Some(d)) => {
                rec.record(d, Outcome::Ok { items: 1 });
                rec.checks.pass();
            }
            _ => {
                rec.record(Duration::ZERO, Outcome::Failed("EventMissing".into()));
                rec.checks.fail("an event never arrived".into());
            }
        }
    }
    let elapsed = start.elapsed();
    let cpu_use = cpu_mark.elapsed();
    for r in readers {
        r.abort();
    }
    let mut params = serde_json::Map::new();
    params.insert("streams".into(), json!(args.streams));
    params.insert(
        "watchers_per_stream".into(),
        json!(args.watchers_per_stream),
    );
    params.insert("put_total".into(), json!(args.put_total));
    let mut report = Report::build("watch-latency", params, rec, elapsed, cpu_use);
    report
        .extra
        .insert("watchers_created_s".into(), setup.as_secs_f64());
    Ok(report)
}

//! One watch per resource type, as kube-apiserver's watch cache keeps: from the revision the
//! run starts at, with previous values. Each measures the delay from a write being sent to its
//! event arriving, and at the end must hold exactly the writes the server acknowledged.

use super::objects::{parse_value, prefix_end, Layout};
use super::MAX_MESSAGE;
use crate::connect;
use crate::report::{Checks, Latency, Recorder};
use crate::Common;
use anyhow::{bail, Context, Result};
use etcd_client::{EventType, KvClient, WatchOptions};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Written to each type after the run: once a watch has its sentinel's event, it has every
/// event before it.
const SENTINEL: &str = "~end-of-run";
/// How long the watches get to deliver everything after the run.
const DELIVERY_GRACE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Seen {
    events: u64,
    last_rev: i64,
    sentinel: bool,
    delays: Recorder,
    failure: Option<String>,
}

pub(crate) struct Watches {
    seen: Vec<Arc<Mutex<Seen>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// What the watches delivered.
pub(crate) struct Delivered {
    per_type: Vec<u64>,
    failures: Vec<String>,
    pub(crate) events: u64,
    pub(crate) delay: Latency,
}

impl Watches {
    /// Opens one watch per type from `from_rev` and waits until each is created.
    pub(crate) async fn start(
        common: &Common,
        layout: &Layout,
        from_rev: i64,
        epoch: Instant,
    ) -> Result<Self> {
        let client = connect(common).await?;
        let mut seen = Vec::new();
        let mut readers = Vec::new();
        for t in 0..layout.types {
            let prefix = layout.type_prefix(t);
            let options = WatchOptions::new()
                .with_range(prefix_end(prefix.as_bytes()))
                .with_start_revision(from_rev)
                .with_prev_key();
            let mut stream = client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE)
                .watch(prefix.clone(), Some(options))
                .await
                .with_context(|| format!("watching {prefix}"))?;
            loop {
                match stream.message().await? {
                    Some(r) if r.created() => break,
                    Some(_) => continue,
                    None => bail!("the watch on {prefix} ended before it was created"),
                }
            }
            let state = Arc::new(Mutex::new(Seen::default()));
            seen.push(state.clone());
            let keep = client.clone();
            readers.push(tokio::spawn(async move {
                let _client = keep;
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => return note(&state, format!("the watch on {prefix} ended")),
                        Err(e) => return note(&state, format!("the watch on {prefix}: {e}")),
                    };
                    if resp.canceled() {
                        return note(
                            &state,
                            format!(
                                "the watch on {prefix} was cancelled (compacted at {}): {}",
                                resp.compact_revision(),
                                resp.cancel_reason()
                            ),
                        );
                    }
                    let now = epoch.elapsed().as_nanos() as u64;
                    let Ok(mut s) = state.lock() else { return };
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if kv.mod_revision() <= s.last_rev {
                            let why = format!(
                                "the watch on {prefix} went from revision {} to {}",
                                s.last_rev,
                                kv.mod_revision()
                            );
                            s.failure.get_or_insert(why);
                        }
                        s.last_rev = kv.mod_revision();
                        if kv.key().ends_with(SENTINEL.as_bytes()) {
                            s.sentinel = true;
                            continue;
                        }
                        s.events += 1;
                        if ev.event_type() == EventType::Put {
                            if let Some((sent, _, _)) = parse_value(kv.value()) {
                                let delay = Duration::from_nanos(now.saturating_sub(sent));
                                s.delays.record_latency(delay);
                            }
                        }
                    }
                }
            }));
        }
        Ok(Self { seen, readers })
    }

    /// Writes each type's sentinel, waits for every watch to deliver it, and stops the watches.
    pub(crate) async fn finish(self, kv: &mut KvClient, layout: &Layout) -> Result<Delivered> {
        for t in 0..layout.types {
            let key = format!("{}{SENTINEL}", layout.type_prefix(t));
            kv.put(key, "", None).await.context("writing a sentinel")?;
        }
        let deadline = Instant::now() + DELIVERY_GRACE;
        let all_in = |seen: &[Arc<Mutex<Seen>>]| {
            seen.iter().all(|s| {
                s.lock()
                    .map(|s| s.sentinel || s.failure.is_some())
                    .unwrap_or(true)
            })
        };
        while !all_in(&self.seen) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for r in &self.readers {
            r.abort();
        }
        let mut delivered = Delivered {
            per_type: Vec::new(),
            failures: Vec::new(),
            events: 0,
            delay: Latency::default(),
        };
        let mut delays = Recorder::new();
        for (t, s) in self.seen.iter().enumerate() {
            let mut s = match s.lock() {
                Ok(s) => s,
                Err(_) => bail!("a watch reader panicked"),
            };
            if let Some(f) = s.failure.take() {
                delivered.failures.push(f);
            } else if !s.sentinel {
                delivered.failures.push(format!(
                    "the watch on {} missed its end-of-run event for {DELIVERY_GRACE:?}",
                    layout.type_prefix(t)
                ));
            }
            delivered.per_type.push(s.events);
            delivered.events += s.events;
            delays.merge(std::mem::take(&mut s.delays));
        }
        delivered.delay = Latency::from_histogram(&delays.hist);
        Ok(delivered)
    }
}

fn note(state: &Mutex<Seen>, why: String) {
    if let Ok(mut s) = state.lock() {
        s.failure.get_or_insert(why);
    }
}

impl Delivered {
    /// Each type's watch must hold exactly the writes acknowledged to that type (at least them
    /// when some writes failed and may still have been applied).
    pub(crate) fn check(&self, acked: &[u64], uncertain: u64, checks: &mut Checks) {
        for f in &self.failures {
            checks.fail(f.clone());
        }
        for (t, (&got, &want)) in self.per_type.iter().zip(acked).enumerate() {
            let ok = if uncertain == 0 {
                got == want
            } else {
                (want..=want + uncertain).contains(&got)
            };
            if ok {
                checks.pass();
            } else {
                checks.fail(format!(
                    "type {t}'s watch delivered {got} events for {want} acknowledged writes \
                     ({uncertain} writes of unknown outcome)"
                ));
            }
        }
    }
}

//! Latency histograms, error counts, checks and the report a run prints.

use crate::Common;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Highest latency the histogram holds, in µs (larger ones are clamped to it).
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one request came to.
pub enum Outcome {
    /// Succeeded; `items` is what it carried (keys for batch requests, 1 otherwise).
    Ok { items: u64 },
    /// Failed with this label (a gRPC code name, `Transport`, …).
    Failed(String),
    /// Succeeded but returned something other than what was written.
    CheckFailed(String),
}

/// Per-client accumulator; merged at the end so clients never share a lock.
pub struct Recorder {
    pub(crate) hist: Histogram<u64>,
    pub(crate) ok: u64,
    pub(crate) items: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) checks: Checks,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Checks {
    /// Answers (or written keys read back) that were checked.
    pub sampled: u64,
    pub failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
}

impl Checks {
    pub(crate) fn pass(&mut self) {
        self.sampled += 1;
    }
    pub(crate) fn fail(&mut self, why: String) {
        self.sampled += 1;
        self.failed += 1;
        self.first_failure.get_or_insert(why);
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            hist: new_histogram(),
            ok: 0,
            items: 0,
            errors: BTreeMap::new(),
            checks: Checks::default(),
        }
    }

    pub fn record(&mut self, latency: Duration, outcome: Outcome) {
        match outcome {
            Outcome::Ok { items } => {
                self.ok += 1;
                self.items += items;
                self.record_latency(latency);
            }
            Outcome::Failed(label) => *self.errors.entry(label).or_default() += 1,
            Outcome::CheckFailed(why) => {
                self.ok += 1;
                self.items += 1;
                self.record_latency(latency);
                self.checks.fail(why);
            }
        }
    }

    pub fn record_latency(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        // Cannot fail: the value is clamped into the histogram's range.
        let _ = self.hist.record(us);
    }

    pub fn merge(&mut self, other: Recorder) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.items += other.items;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.checks.sampled += other.checks.sampled;
        self.checks.failed += other.checks.failed;
        if self.checks.first_failure.is_none() {
            self.checks.first_failure = other.checks.first_failure;
        }
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: a few hundred KiB, fixed.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub workload: String,
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Requests that succeeded.
    pub ok: u64,
    /// Failed requests by gRPC code (or `Transport` / `Client`).
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    /// Successful requests per second.
    pub ops_per_sec: f64,
    /// Keys per second (differs from ops for batch requests).
    pub items_per_sec: f64,
    pub latency_ms: Latency,
    /// This load generator's CPU time per successful request, µs.
    pub client_cpu_us_per_op: Option<f64>,
    /// The server's CPU time per successful request, µs (`--server-pid`).
    pub server_cpu_us_per_op: Option<f64>,
    /// Share of the whole machine's CPU time left idle during the run (0–1).
    #[serde(default)]
    pub machine_idle_share: Option<f64>,
    pub checks: Checks,
    /// Workload-specific figures (watch events, setup time, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

impl Report {
    pub fn build(
        workload: &str,
        params: serde_json::Map<String, serde_json::Value>,
        rec: Recorder,
        elapsed: Duration,
        cpu: crate::cpu::CpuUse,
    ) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let per_op = |cpu: Option<Duration>| {
            cpu.filter(|_| rec.ok > 0)
                .map(|c| c.as_secs_f64() * 1e6 / rec.ok as f64)
        };
        Report {
            workload: workload.to_string(),
            params,
            ok: rec.ok,
            errors: rec.errors.clone(),
            seconds: secs,
            ops_per_sec: rec.ok as f64 / secs,
            items_per_sec: rec.items as f64 / secs,
            latency_ms: Latency::from_histogram(&rec.hist),
            client_cpu_us_per_op: per_op(cpu.own),
            server_cpu_us_per_op: per_op(cpu.server),
            machine_idle_share: cpu.machine_idle_share,
            checks: rec.checks.clone(),
            extra: BTreeMap::new(),
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// One human-readable block.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} {}\n  {} ok, {} errors in {:.2}s: {:.0} ops/s",
            self.workload,
            serde_json::Value::Object(self.params.clone()),
            self.ok,
            self.error_count(),
            self.seconds,
            self.ops_per_sec
        );
        if (self.items_per_sec - self.ops_per_sec).abs() > 0.5 {
            s += &format!(" ({:.0} keys/s)", self.items_per_sec);
        }
        let l = &self.latency_ms;
        s += &format!(
            "\n  latency ms: mean {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            l.mean, l.p50, l.p90, l.p99, l.p999, l.max
        );
        if let Some(c) = self.client_cpu_us_per_op {
            s += &format!("\n  cpu per op: client {c:.1} µs");
            if let Some(sv) = self.server_cpu_us_per_op {
                s += &format!(", server {sv:.1} µs");
            }
        }
        if let Some(idle) = self.machine_idle_share {
            s += &format!("\n  machine idle: {:.1} %", idle * 100.0);
        }
        if !self.errors.is_empty() {
            s += &format!("\n  errors: {:?}", self.errors);
        }
        s += &format!(
            "\n  checks: {} sampled, {} failed",
            self.checks.sampled, self.checks.failed
        );
        if let Some(f) = &self.checks.first_failure {
            s += &format!(" (first: {f})");
        }
        for (k, v) in &self.extra {
            s += &format!("\n  {k}: {v:.3}");
        }
        s
    }
}

/// A progress bar on stderr while a run goes (only on a terminal).
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn start(common: &Common, done: Arc<AtomicU64>) -> Self {
        if common.json || common.no_progress {
            return Self {
                bar: None,
                ticker: None,
            };
        }
        let (len, by_time) = match common.duration {
            Some(d) => (d.as_millis() as u64, true),
            None => (common.total, false),
        };
        let bar = indicatif::ProgressBar::new(len);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        let ticking = bar.clone();
        let started = std::time::Instant::now();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let n = done.load(Ordering::Relaxed);
                if by_time {
                    ticking.set_position(started.elapsed().as_millis() as u64);
                    ticking.set_message(format!("{n} requests"));
                } else {
                    ticking.set_position(n);
                }
            }
        });
        Self {
            bar: Some(bar),
            ticker: Some(ticker),
        }
    }

    pub(crate) fn finish(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

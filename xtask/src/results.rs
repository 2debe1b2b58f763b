//! Benchmark result files: `bench-results/<date>-<commit>.json` plus a markdown rendering, and
//! the comparison of a run against `bench-results/baseline.json`.
//!
//! Metric names carry their direction: names ending in `_ms`, `_us`, `_s`, `_mb`, `_bytes`,
//! `errors` or `check_failures` are better lower; names starting with `n_` are context and
//! never compared; every other metric is better higher.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub layer: String,
    pub name: String,
    /// The command line that produced it.
    pub command: String,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunFile {
    pub date: String,
    pub commit: String,
    /// The working tree had uncommitted changes to tracked files.
    pub dirty: bool,
    /// Unix seconds of the last write: the newest file is "the latest run".
    pub timestamp: u64,
    pub machine: Machine,
    pub entries: Vec<Entry>,
}

/// Collects entries during a run and writes them out at the end.
pub struct Recorder {
    out_dir: PathBuf,
    command: String,
    entries: Vec<Entry>,
}

impl Recorder {
    pub fn new(out_dir: PathBuf) -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Self {
            out_dir,
            command: format!("cargo xtask {}", args.join(" ")),
            entries: Vec::new(),
        }
    }

    pub fn add(&mut self, layer: &str, name: &str, metrics: &[(&str, f64)]) {
        let metrics = metrics
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k.to_string(), round(*v)))
            .collect();
        self.entries.push(Entry {
            layer: layer.into(),
            name: name.into(),
            command: self.command.clone(),
            metrics,
        });
    }

    /// Merges this run's entries into today's file for this commit (same layer + name are
    /// replaced) and rewrites its markdown. Returns the JSON path.
    pub fn save(self) -> Result<PathBuf> {
        if self.entries.is_empty() {
            bail!("nothing was measured");
        }
        std::fs::create_dir_all(&self.out_dir)
            .with_context(|| format!("creating {}", self.out_dir.display()))?;
        let (commit, dirty) = git_commit();
        let date = today();
        let path = self.out_dir.join(format!("{date}-{commit}.json"));
        let mut file = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<RunFile>(&text)
                .with_context(|| format!("reading {}", path.display()))?,
            Err(_) => RunFile {
                date: date.clone(),
                commit: commit.clone(),
                dirty,
                timestamp: 0,
                machine: machine(),
                entries: Vec::new(),
            },
        };
        file.dirty |= dirty;
        file.timestamp = unix_now();
        for e in self.entries {
            file.entries
                .retain(|old| !(old.layer == e.layer && old.name == e.name));
            file.entries.push(e);
        }
        std::fs::write(&path, serde_json::to_string_pretty(&file)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        let md = path.with_extension("md");
        std::fs::write(&md, render_markdown(&file))
            .with_context(|| format!("writing {}", md.display()))?;
        println!("results: {} and {}", path.display(), md.display());
        Ok(path)
    }
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        v.round()
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Today's UTC date as `YYYY-MM-DD` (civil-from-days, so no date crate is needed).
pub fn today() -> String {
    let days = (unix_now() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn git_commit() -> (String, bool) {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "nocommit".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    (commit, dirty)
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn lower_is_better(metric: &str) -> bool {
    [
        "_ms",
        "_us",
        "_ns",
        "_s",
        "_mb",
        "_bytes",
        "errors",
        "check_failures",
    ]
    .iter()
    .any(|s| metric.ends_with(s))
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn render_markdown(file: &RunFile) -> String {
    let mut s = format!(
        "# Benchmark run {} at {}{}\n\nMachine: {} ({} cores, {} GiB), Linux {}. Written by `cargo xtask bench`; the JSON beside this file holds the same numbers.\n",
        file.date,
        file.commit,
        if file.dirty { " (with uncommitted changes)" } else { "" },
        file.machine.cpu,
        file.machine.cores,
        file.machine.memory_gib,
        file.machine.kernel
    );
    let targets = crate::targets::table(file);
    if !targets.is_empty() {
        s += "\n## Targets\n\n";
        s += &targets;
    }
    let mut layers: Vec<&str> = file.entries.iter().map(|e| e.layer.as_str()).collect();
    layers.dedup();
    let mut seen = std::collections::BTreeSet::new();
    layers.retain(|l| seen.insert(*l));
    for layer in layers {
        let entries: Vec<&Entry> = file.entries.iter().filter(|e| e.layer == layer).collect();
        let mut columns: Vec<&str> = Vec::new();
        for e in &entries {
            for k in e.metrics.keys() {
                if !columns.contains(&k.as_str()) {
                    columns.push(k);
                }
            }
        }
        s += &format!("\n## {layer}\n\n| name | {} |\n|---|", columns.join(" | "));
        s += &"---|".repeat(columns.len());
        s += "\n";
        for e in &entries {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| e.metrics.get(*c).map(|v| fmt_value(*v)).unwrap_or_default())
                .collect();
            s += &format!("| {} | {} |\n", e.name, cells.join(" | "));
        }
        let mut commands: Vec<&str> = entries.iter().map(|e| e.command.as_str()).collect();
        commands.dedup();
        for c in commands {
            s += &format!("\n`{c}`\n");
        }
    }
    s
}

/// Markers around the README's generated performance tables.
pub const README_START: &str =
    "<!-- bench-results:start (generated by `cargo xtask bench readme`) -->";
pub const README_END: &str = "<!-- bench-results:end -->";

/// The README's performance tables for one run: the targets, then MetaStore beside etcd and
/// the no-op ceiling for every e2e case.
pub fn render_readme(file: &RunFile, path: &Path) -> String {
    let mut s = format!(
        "From [{}]({}) ({}, {} cores; load generator on the same machine), reproduced with\n`cargo xtask bench e2e --vs-etcd` plus `cargo xtask bench codec|wal|raft` and\n`cargo xtask bench restart --keys 1000000`:\n\n",
        path.file_name().and_then(|n| n.to_str()).unwrap_or_default(),
        path.display(),
        file.machine.cpu,
        file.machine.cores
    );
    s += &crate::targets::table(file);
    let get = |name: &str, m: &str| {
        file.entries
            .iter()
            .find(|e| e.layer == "e2e" && e.name == name)
            .and_then(|e| e.metrics.get(m).copied())
    };
    let mut cases: Vec<&str> = file
        .entries
        .iter()
        .filter(|e| e.layer == "e2e")
        .filter_map(|e| e.name.strip_prefix("metastore/"))
        .collect();
    cases.dedup();
    if cases.is_empty() {
        return s;
    }
    s += "\n| workload | MetaStore ops/s (p99 ms) | etcd ops/s (p99 ms) | MetaStore ÷ etcd | no-op ceiling ops/s | server CPU µs/op MetaStore / etcd |\n|---|---|---|---|---|---|\n";
    let cell = |who: &str, case: &str| match (
        get(&format!("{who}/{case}"), "ops_per_sec"),
        get(&format!("{who}/{case}"), "p99_ms"),
    ) {
        (Some(o), Some(p)) => format!("{o:.0} ({p:.2})"),
        _ => "—".into(),
    };
    for case in cases {
        let ratio = match (
            get(&format!("metastore/{case}"), "ops_per_sec"),
            get(&format!("etcd/{case}"), "ops_per_sec"),
        ) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "—".into(),
        };
        let noop = get(&format!("noop/{case}"), "ops_per_sec")
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "—".into());
        let cpu = |who: &str| {
            get(&format!("{who}/{case}"), "server_cpu_us")
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "—".into())
        };
        s += &format!(
            "| {case} | {} | {} | {ratio} | {noop} | {} / {} |\n",
            cell("metastore", case),
            cell("etcd", case),
            cpu("metastore"),
            cpu("etcd")
        );
    }
    if let (Some(deferred), Some(ratio)) = (
        get("noop-deferred/put-c256", "ops_per_sec"),
        get("metastore-vs-noop-deferred/put-c256", "throughput_ratio"),
    ) {
        s += &format!(
            "\nput-c256 against the no-op answering each Put from another thread (the hand-off of a server that answers after a commit, without its work): {deferred:.0} ops/s; MetaStore ÷ it: {ratio:.2}.\n"
        );
    }
    s
}

/// Replaces the generated part of `readme` with the tables of `run`.
pub fn update_readme(readme: &Path, run: &Path) -> Result<()> {
    let file = load(run)?;
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(a), Some(b)) = (text.find(README_START), text.find(README_END)) else {
        bail!(
            "{} has no {README_START} … {README_END} markers",
            readme.display()
        );
    };
    let generated = render_readme(&file, run);
    let updated = format!("{}{README_START}\n{generated}{}", &text[..a], &text[b..]);
    std::fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))?;
    println!("{} updated from {}", readme.display(), run.display());
    Ok(())
}

pub fn load(path: &Path) -> Result<RunFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The newest run file in `dir` (by the timestamp inside), baseline excluded.
pub fn latest(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json")
            || path.file_name().and_then(|n| n.to_str()) == Some("baseline.json")
        {
            continue;
        }
        let Ok(file) = load(&path) else { continue };
        if best.as_ref().is_none_or(|(t, _)| file.timestamp > *t) {
            best = Some((file.timestamp, path));
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no run files in {}", dir.display()))
}

/// Prints every metric the two runs share and returns how many got worse by more than
/// `threshold_pct`.
pub fn compare(baseline: &RunFile, run: &RunFile, threshold_pct: f64) -> usize {
    let mut regressions = 0;
    println!(
        "comparing {} ({}) against baseline {} ({}), threshold {threshold_pct}%",
        run.commit, run.date, baseline.commit, baseline.date
    );
    println!(
        "| layer | name | metric | baseline | run | change | |\n|---|---|---|---|---|---|---|"
    );
    for b in &baseline.entries {
        let Some(r) = run
            .entries
            .iter()
            .find(|r| r.layer == b.layer && r.name == b.name)
        else {
            continue;
        };
        for (metric, &base) in &b.metrics {
            if metric.starts_with("n_") {
                continue;
            }
            let Some(&now) = r.metrics.get(metric) else {
                continue;
            };
            let lower = lower_is_better(metric);
            let worse_pct = if base == 0.0 {
                if (lower && now > 0.0) || (!lower && now < 0.0) {
                    f64::INFINITY
                } else {
                    0.0
                }
            } else if lower {
                (now - base) / base.abs() * 100.0
            } else {
                (base - now) / base.abs() * 100.0
            };
            let flag = worse_pct > threshold_pct;
            if flag {
                regressions += 1;
            }
            let change = if base == 0.0 {
                "n/a".to_string()
            } else {
                format!("{:+.1}%", (now - base) / base.abs() * 100.0)
            };
            println!(
                "| {} | {} | {metric} | {} | {} | {change} | {} |",
                b.layer,
                b.name,
                fmt_value(base),
                fmt_value(now),
                if flag { "REGRESSION" } else { "" }
            );
        }
    }
    if let Some(drift) = machine_drift(baseline, run) {
        println!(
            "the no-op server (code that never changes) moved {drift:+.1}% at put-c256 between these runs: \
             end-to-end changes of that size are the machine's, not the code's"
        );
    }
    regressions
}

/// How far the no-op server's put throughput at 256 clients moved from `baseline` to `run`, in
/// percent. Its code does not change, so this is the VM's own drift between the two runs.
pub fn machine_drift(baseline: &RunFile, run: &RunFile) -> Option<f64> {
    let noop = |f: &RunFile| {
        f.entries
            .iter()
            .find(|e| e.layer == "e2e" && e.name == "noop/put-c256")
            .and_then(|e| e.metrics.get("ops_per_sec").copied())
            .filter(|v| *v > 0.0)
    };
    let (base, now) = (noop(baseline)?, noop(run)?);
    Some((now - base) / base * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(metrics: &[(&str, f64)]) -> RunFile {
        RunFile {
            date: "2026-01-01".into(),
            commit: "abc".into(),
            dirty: false,
            timestamp: 1,
            machine: machine(),
            entries: vec![Entry {
                layer: "wal".into(),
                name: "w1".into(),
                command: String::new(),
                metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            }],
        }
    }

    #[test]
    fn flags_only_changes_for_the_worse_beyond_the_threshold() {
        let base = file(&[
            ("ops_per_sec", 1000.0),
            ("p99_ms", 1.0),
            ("n_avg_batch", 5.0),
        ]);
        // 5% slower and 5% higher latency: within 10%.
        assert_eq!(
            compare(
                &base,
                &file(&[("ops_per_sec", 950.0), ("p99_ms", 1.05)]),
                10.0
            ),
            0
        );
        // Faster and lower latency are never regressions.
        assert_eq!(
            compare(
                &base,
                &file(&[("ops_per_sec", 5000.0), ("p99_ms", 0.1)]),
                10.0
            ),
            0
        );
        // 20% slower: one; latency up 50%: another; context metrics are ignored.
        let worse = file(&[
            ("ops_per_sec", 800.0),
            ("p99_ms", 1.5),
            ("n_avg_batch", 1.0),
        ]);
        assert_eq!(compare(&base, &worse, 10.0), 2);
    }

    #[test]
    fn drift_is_the_noop_servers_change_and_needs_it_in_both_runs() {
        let noop = |ops: f64| {
            let mut f = file(&[]);
            f.entries.push(Entry {
                layer: "e2e".into(),
                name: "noop/put-c256".into(),
                command: String::new(),
                metrics: [("ops_per_sec".to_string(), ops)].into_iter().collect(),
            });
            f
        };
        assert_eq!(machine_drift(&noop(100.0), &noop(75.0)), Some(-25.0));
        assert_eq!(machine_drift(&noop(100.0), &file(&[])), None);
        assert_eq!(machine_drift(&file(&[]), &noop(75.0)), None);
    }

    #[test]
    fn durations_in_every_unit_are_better_lower() {
        for metric in [
            "p99_ms",
            "p50_us",
            "encode_decode_ns",
            "restart_ready_s",
            "rss_mb",
        ] {
            assert!(lower_is_better(metric), "{metric}");
        }
        for metric in ["ops_per_sec", "appends_per_sec", "speedup"] {
            assert!(!lower_is_better(metric), "{metric}");
        }
    }

    #[test]
    fn dates_are_civil() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }
}

//! CI's smoke run of `cargo xtask bench`: every layer bench and the e2e matrix against the
//! real binaries, cut down to seconds, so the harness cannot rot. It checks the result files
//! and the regression check, never how fast anything was.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>`, where cargo put the `metastore` and `metastore-bench` binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn xtask(args: &[&str], scratch: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("METASTORE_BENCH_DIR", scratch)
        .output()
        .expect("run xtask")
}

#[test]
fn smoke_bench_writes_results_and_compare_flags_regressions() {
    let bins = bin_dir();
    for bin in ["metastore", "metastore-bench"] {
        assert!(
            bins.join(bin).exists(),
            "{} missing: build the workspace first",
            bins.join(bin).display()
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("results");
    let scratch = tmp.path().join("scratch");
    let run = xtask(
        &[
            "bench",
            "--out",
            out.to_str().expect("utf8"),
            "smoke",
            "--bin-dir",
            bins.to_str().expect("utf8"),
        ],
        &scratch,
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "smoke bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let json: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("results dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(json.len(), 1, "one run file: {json:?}");
    let text = std::fs::read_to_string(&json[0]).expect("read run file");
    let file: serde_json::Value = serde_json::from_str(&text).expect("run file is JSON");
    let entries = file["entries"].as_array().expect("entries");
    for layer in [
        "codec", "batch", "wal", "raft", "engine", "e2e", "cluster", "secure", "large", "scale",
        "k8s",
    ] {
        assert!(
            entries.iter().any(|e| e["layer"] == layer),
            "no {layer} entry in {text}"
        );
    }
    for name in [
        "metastore/put-c256",
        "metastore/range-l-c256",
        "metastore/batch-put",
        "metastore/watch-latency",
        "metastore-rocksdb/put-c256",
        "noop/put-c256",
        "noop-deferred/put-c256",
        "put-64k-c32/metastore",
        "put-1m-c8/metastore",
        "5000/metastore-memory/get",
        "5000/metastore-memory/range100",
        "5000/metastore-memory/put",
        "5000/metastore-rocksdb/range100",
        "k8s/metastore-memory",
        "k8s/metastore-rocksdb",
    ] {
        let entry = entries
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name} entry in {text}"));
        assert!(entry["metrics"]["ops_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
        assert_eq!(entry["metrics"]["errors"].as_f64(), Some(0.0), "{name}");
        assert_eq!(
            entry["metrics"]["check_failures"].as_f64(),
            Some(0.0),
            "{name}"
        );
    }
    // The scale case loaded its keys and came back from a kill -9 with all of them (it fails
    // otherwise), and says what they cost.
    let loaded = entries
        .iter()
        .find(|e| e["name"] == "5000/metastore-memory")
        .unwrap_or_else(|| panic!("no scale entry in {text}"));
    for metric in [
        "load_keys_per_sec",
        "rss_per_key_bytes",
        "disk_per_key_bytes",
    ] {
        assert!(
            loaded["metrics"][metric].as_f64().unwrap_or(0.0) > 0.0,
            "{metric} in {loaded}"
        );
    }
    // The k8s case ran every kind of request, and each type's watch delivered exactly the
    // writes acknowledged (a check failure otherwise, asserted above).
    let k8s = entries
        .iter()
        .find(|e| e["name"] == "k8s/metastore-memory")
        .unwrap_or_else(|| panic!("no k8s entry in {text}"));
    for metric in [
        "update_per_sec",
        "get_per_sec",
        "create_per_sec",
        "delete_per_sec",
        "list_per_sec",
        "n_watch_events",
        "n_compactions",
        "watch_delay_p99_ms",
    ] {
        assert!(
            k8s["metrics"][metric].as_f64().unwrap_or(0.0) > 0.0,
            "{metric} in {k8s}"
        );
    }
    let md = std::fs::read_to_string(json[0].with_extension("md")).expect("markdown beside");
    assert!(md.contains("## Targets") && md.contains("## e2e"), "{md}");

    // A run compared with itself has no regressions …
    let run_path = json[0].to_str().expect("utf8");
    let same = xtask(
        &[
            "bench",
            "compare",
            "--baseline",
            run_path,
            "--run",
            run_path,
        ],
        &scratch,
    );
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );

    // … and against a baseline twice as fast, every throughput regresses.
    let mut faster = file.clone();
    for e in faster["entries"].as_array_mut().expect("entries") {
        if let Some(ops) = e["metrics"]["ops_per_sec"].as_f64() {
            e["metrics"]["ops_per_sec"] = serde_json::json!(ops * 2.0);
        }
    }
    let baseline = tmp.path().join("baseline.json");
    std::fs::write(&baseline, serde_json::to_string(&faster).expect("json")).expect("write");
    let worse = xtask(
        &[
            "bench",
            "compare",
            "--baseline",
            baseline.to_str().expect("utf8"),
            "--run",
            run_path,
        ],
        &scratch,
    );
    assert!(!worse.status.success(), "regressions must fail the check");
    assert!(String::from_utf8_lossy(&worse.stdout).contains("REGRESSION"));
}

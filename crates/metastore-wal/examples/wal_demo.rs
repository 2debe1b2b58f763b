//! Group-commit demo / micro benchmark.
//!
//! ```text
//! cargo run --release -p metastore-wal --example wal_demo -- DIR [RECORDS] [THREADS] [PAYLOAD_BYTES]
//! ```
//!
//! Appends RECORDS records (default 100000) from THREADS threads (default 16), each with
//! `append_sync`, then prints throughput and how many fsyncs group commit needed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use metastore_wal::{Wal, WalOptions};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Result<T, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("bad argument {i}: {s:?}")),
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        return Err("usage: wal_demo DIR [RECORDS] [THREADS] [PAYLOAD_BYTES]".into());
    };
    let records: u64 = arg(&args, 2, 100_000)?;
    let threads: u64 = arg(&args, 3, 16)?.max(1);
    let payload_len: usize = arg(&args, 4, 128)?;

    let (wal, recovered) = Wal::open(dir, WalOptions::default())?;
    println!(
        "opened {dir}: {} records recovered in {} segment(s)",
        recovered.len(),
        wal.segment_count()
    );
    let wal = Arc::new(wal);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let wal = Arc::clone(&wal);
            let n = records / threads + u64::from(t < records % threads);
            std::thread::spawn(move || -> Result<(), metastore_wal::WalError> {
                let payload = vec![t as u8; payload_len];
                for i in 0..n {
                    wal.append_sync(0, i, &payload)?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "writer thread panicked")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = wal.stats();
    println!(
        "{} records ({} bytes) from {threads} threads in {elapsed:.3}s: {:.0} records/s, {} fsyncs ({:.1} records/fsync), {} segment(s)",
        stats.records,
        stats.bytes,
        stats.records as f64 / elapsed,
        stats.fsyncs,
        stats.records as f64 / stats.fsyncs.max(1) as f64,
        wal.segment_count(),
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wal_demo: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The `metastore snapshot ...` tools: what `etcdutl` / `etcdctl snapshot` do with etcd's
//! backup files.

use metastore_mvcc::snapshot::{etcd_backend_status, EtcdBackendStatus};
use std::path::Path;

/// `metastore snapshot status FILE -w FORMAT`, printed as etcdctl prints it.
pub fn snapshot_status(file: &Path, write_out: &str) -> Result<String, String> {
    let status = etcd_backend_status(file).map_err(|e| e.to_string())?;
    render_status(&status, write_out)
}

fn render_status(s: &EtcdBackendStatus, write_out: &str) -> Result<String, String> {
    let size = human_bytes(s.total_size);
    match write_out {
        "simple" => Ok(format!(
            "{:x}, {}, {}, {}\n",
            s.hash, s.revision, s.total_key, size
        )),
        "json" => serde_json::to_string(s)
            .map(|j| j + "\n")
            .map_err(|e| e.to_string()),
        "table" => {
            let cells = [
                format!("{:x}", s.hash),
                s.revision.to_string(),
                s.total_key.to_string(),
                size,
            ];
            let heads = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
            let widths: Vec<usize> = heads
                .iter()
                .zip(&cells)
                .map(|(h, c)| h.len().max(c.len()))
                .collect();
            let rule = widths
                .iter()
                .map(|w| "-".repeat(w + 2))
                .collect::<Vec<_>>()
                .join("+");
            let head = heads
                .iter()
                .zip(&widths)
                .map(|(h, w)| format!(" {h:^w$} "))
                .collect::<Vec<_>>()
                .join("|");
            let row = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!(" {c:>w$} "))
                .collect::<Vec<_>>()
                .join("|");
            Ok(format!("+{rule}+\n|{head}|\n+{rule}+\n|{row}|\n+{rule}+\n"))
        }
        other => Err(format!(
            "unsupported output format {other:?} (simple, json or table)"
        )),
    }
}

/// go-humanize's `Bytes` (SI units), which etcdctl prints sizes with.
fn human_bytes(n: u64) -> String {
    if n < 10 {
        return format!("{n} B");
    }
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let e = ((n as f64).ln() / 1000f64.ln()).floor() as usize;
    let e = e.min(UNITS.len() - 1);
    let value = (n as f64 / 1000f64.powi(e as i32) * 10.0 + 0.5).floor() / 10.0;
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[e])
    } else {
        format!("{value:.0} {}", UNITS[e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_go_humanize() {
        assert_eq!(human_bytes(5), "5 B");
        assert_eq!(human_bytes(20480), "20 kB");
        assert_eq!(human_bytes(1_536_000), "1.5 MB");
        assert_eq!(human_bytes(999), "999 B");
    }
}

//! CPU time of this process and of the server, from `/proc` (Linux; `None` elsewhere).

use std::time::Duration;

/// Linux reports utime/stime in USER_HZ ticks, which is 100 on every mainstream platform.
const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU time of process `pid` (all its threads) so far.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// User + system CPU time of this process so far.
pub fn own_cpu() -> Option<Duration> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// CPU readings taken at the start of a measured span.
pub struct CpuMark {
    own: Option<Duration>,
    server: Option<(u32, Duration)>,
}

impl CpuMark {
    /// Notes this process's CPU time and, with `server_pid`, the server's.
    pub fn now(server_pid: Option<u32>) -> Self {
        Self {
            own: own_cpu(),
            server: server_pid.and_then(|pid| process_cpu(pid).map(|c| (pid, c))),
        }
    }

    /// CPU used since the mark: (this process, the server).
    pub fn elapsed(&self) -> (Option<Duration>, Option<Duration>) {
        let own = own_cpu().zip(self.own).map(|(now, then)| now - then);
        let server = self
            .server
            .and_then(|(pid, then)| process_cpu(pid).map(|now| now - then));
        (own, server)
    }
}

fn parse_stat(stat: &str) -> Option<Duration> {
    // The command name (field 2) may contain spaces; fields after its closing ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / TICKS_PER_SEC,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some(Duration::from_secs(3)));
    }

    #[test]
    fn own_cpu_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(own_cpu().is_some());
        }
    }
}

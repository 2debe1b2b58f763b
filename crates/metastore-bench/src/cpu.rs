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

/// Idle and total time of the whole machine so far, in ticks, from `/proc/stat`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MachineTicks {
    idle: u64,
    total: u64,
}

/// The whole machine's idle and total CPU ticks so far (all cores).
fn machine_ticks() -> Option<MachineTicks> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    let total = ticks.iter().take(8).sum();
    Some(MachineTicks { idle, total })
}

/// CPU used over a measured span.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// This process (the load generator).
    pub own: Option<Duration>,
    /// The server (`--server-pid`).
    pub server: Option<Duration>,
    /// Share of the whole machine's CPU time (all cores, waiting for I/O included) that no
    /// thread used. Load generator and server share the machine, so this is what neither
    /// turned into throughput.
    pub machine_idle_share: Option<f64>,
}

/// CPU readings taken at the start of a measured span.
pub struct CpuMark {
    own: Option<Duration>,
    server: Option<(u32, Duration)>,
    machine: Option<MachineTicks>,
}

impl CpuMark {
    /// Notes this process's CPU time and, with `server_pid`, the server's.
    pub fn now(server_pid: Option<u32>) -> Self {
        Self {
            own: own_cpu(),
            server: server_pid.and_then(|pid| process_cpu(pid).map(|c| (pid, c))),
            machine: machine_ticks(),
        }
    }

    fn machine_idle_share(&self) -> Option<f64> {
        let (now, then) = machine_ticks().zip(self.machine)?;
        let total = now.total.checked_sub(then.total).filter(|&t| t > 0)?;
        Some(now.idle.saturating_sub(then.idle) as f64 / total as f64)
    }

    /// CPU used since the mark.
    pub fn elapsed(&self) -> CpuUse {
        let own = own_cpu().zip(self.own).map(|(now, then)| now - then);
        let server = self
            .server
            .and_then(|(pid, then)| process_cpu(pid).map(|now| now - then));
        CpuUse {
            own,
            server,
            machine_idle_share: self.machine_idle_share(),
        }
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
    fn parses_the_machine_line_and_counts_iowait_as_idle() {
        let stat = "cpu  100 5 50 800 40 1 2 2 0 0\ncpu0 50 2 25 400 20 0 1 1 0 0\n";
        assert_eq!(
            parse_machine(stat),
            Some(MachineTicks {
                idle: 840,
                total: 1000
            })
        );
        assert_eq!(parse_machine("intr 1 2 3\n"), None);
    }

    #[test]
    fn own_cpu_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(own_cpu().is_some());
        }
    }
}

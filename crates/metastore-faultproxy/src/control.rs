//! The line-based control protocol of the `metastore-faultproxy` binary.
//!
//! One command per line, one reply line per command, so a shell script can drive the proxy
//! with `nc` or bash's `/dev/tcp`:
//!
//! ```text
//! pass            -> ok pass
//! blackhole       -> ok blackhole
//! delay 200ms     -> ok delay 200ms     (units: us, ms, s)
//! reset           -> ok reset
//! stats           -> fault=pass delay_ms=0 c2u_forwarded=.. c2u_dropped=.. u2c_forwarded=..
//!                    u2c_dropped=.. accepted=.. active=.. reset=..
//! anything else   -> err <why>
//! ```

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::{Fault, FaultControl, Stats};

/// Longest command line accepted; anything longer is not a command of this protocol.
const MAX_LINE: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Set(Fault),
    Stats,
}

/// Parses one command line (surrounding whitespace and case are ignored).
pub fn parse_command(line: &str) -> Result<Command, String> {
    let line = line.trim().to_ascii_lowercase();
    let mut words = line.split_whitespace();
    let cmd = words.next().ok_or("empty command")?;
    let arg = words.next();
    if words.next().is_some() {
        return Err(format!("too many arguments to {cmd:?}"));
    }
    let no_arg = |command: Command| match arg {
        None => Ok(command),
        Some(_) => Err(format!("{cmd:?} takes no argument")),
    };
    match cmd {
        "pass" => no_arg(Command::Set(Fault::Pass)),
        "blackhole" => no_arg(Command::Set(Fault::Blackhole)),
        "reset" => no_arg(Command::Set(Fault::Reset)),
        "stats" => no_arg(Command::Stats),
        "delay" => {
            let arg = arg.ok_or("delay needs a duration, e.g. \"delay 200ms\"")?;
            let d = parse_duration(arg).ok_or_else(|| format!("bad duration {arg:?}"))?;
            Ok(Command::Set(Fault::Delay(d)))
        }
        _ => Err(format!("unknown command {cmd:?}")),
    }
}

/// Parses `<integer><unit>` with unit `us`, `ms` or `s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "us" => Some(Duration::from_micros(n)),
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        _ => None,
    }
}

/// Key=value pairs with no spaces inside a value, so `stats` stays one `read`-able line.
pub fn format_stats(s: &Stats) -> String {
    let (name, delay) = match s.fault {
        Fault::Pass => ("pass", Duration::ZERO),
        Fault::Blackhole => ("blackhole", Duration::ZERO),
        Fault::Delay(d) => ("delay", d),
        Fault::Reset => ("reset", Duration::ZERO),
    };
    format!(
        "fault={name} delay_ms={} c2u_forwarded={} c2u_dropped={} u2c_forwarded={} u2c_dropped={} accepted={} active={} reset={}",
        delay.as_millis(),
        s.client_to_upstream.forwarded,
        s.client_to_upstream.dropped,
        s.upstream_to_client.forwarded,
        s.upstream_to_client.dropped,
        s.accepted,
        s.active,
        s.reset,
    )
}

/// Runs a command against `control` and returns the reply line, without its newline.
pub fn execute(control: &FaultControl, line: &str) -> String {
    match parse_command(line) {
        Ok(Command::Set(fault)) => {
            control.set(fault);
            format!("ok {fault}")
        }
        Ok(Command::Stats) => format_stats(&control.stats()),
        Err(e) => format!("err {e}"),
    }
}

/// Serves the control protocol on `listener` until accepting fails.
///
/// The protocol has no authentication, which is why the binary binds it to loopback only.
pub async fn serve(listener: TcpListener, control: FaultControl) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(stream, &control).await {
                tracing::debug!(error = %e, "control connection ended with an error");
            }
        });
    }
}

async fn serve_conn(stream: TcpStream, control: &FaultControl) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 == MAX_LINE {
            w.write_all(b"err line too long\n").await?;
            return Ok(());
        }
        let mut reply = execute(control, &line);
        reply.push('\n');
        w.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse_command("pass\n"), Ok(Command::Set(Fault::Pass)));
        assert_eq!(
            parse_command(" BlackHole "),
            Ok(Command::Set(Fault::Blackhole))
        );
        assert_eq!(parse_command("reset"), Ok(Command::Set(Fault::Reset)));
        assert_eq!(parse_command("stats"), Ok(Command::Stats));
        assert_eq!(
            parse_command("delay 200ms"),
            Ok(Command::Set(Fault::Delay(Duration::from_millis(200))))
        );
        assert_eq!(
            parse_command("delay 2s"),
            Ok(Command::Set(Fault::Delay(Duration::from_secs(2))))
        );
        assert_eq!(
            parse_command("delay 50us"),
            Ok(Command::Set(Fault::Delay(Duration::from_micros(50))))
        );
        for bad in [
            "",
            "   ",
            "delay",
            "delay 200",
            "delay ms",
            "delay -5ms",
            "delay 1.5s",
            "delay 5m",
            "pass now",
            "delay 1s 2s",
            "partition",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn fault_display_round_trips_through_the_parser() {
        for fault in [
            Fault::Pass,
            Fault::Blackhole,
            Fault::Reset,
            Fault::Delay(Duration::from_millis(250)),
        ] {
            assert_eq!(parse_command(&fault.to_string()), Ok(Command::Set(fault)));
        }
    }

    #[test]
    fn stats_line_has_no_spaces_in_values() {
        let stats = Stats {
            fault: Fault::Delay(Duration::from_millis(200)),
            ..Stats::default()
        };
        let line = format_stats(&stats);
        assert!(line.starts_with("fault=delay delay_ms=200 "), "{line}");
        assert!(line.split(' ').all(|kv| kv.contains('=')), "{line}");
    }
}

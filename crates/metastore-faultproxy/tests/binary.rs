//! Drives the `metastore-faultproxy` binary through its control port the way a shell script
//! would: blocking sockets, one line out, one line back.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_metastore-faultproxy");

/// Kills the child when the test ends, passing or not, so no proxy outlives the suite.
struct Proxy {
    child: Child,
    listen: SocketAddr,
    control: BufReader<TcpStream>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn spawn(upstream: SocketAddr) -> Proxy {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args(["--upstream", &upstream.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn proxy binary");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ready line");
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .parse()
                .expect("address")
        };
        let listen = field("listen=");
        assert_eq!(field("upstream="), upstream);
        let control = TcpStream::connect(field("control=")).expect("connect control");
        control
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Proxy {
            child,
            listen,
            control: BufReader::new(control),
        }
    }

    fn command(&mut self, cmd: &str) -> String {
        self.control
            .get_mut()
            .write_all(format!("{cmd}\n").as_bytes())
            .expect("send command");
        let mut reply = String::new();
        self.control.read_line(&mut reply).expect("reply");
        reply.trim_end().to_string()
    }

    fn stat(&mut self, key: &str) -> String {
        let line = self.command("stats");
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    }
}

fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect through proxy");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    s.write_all(msg).expect("write");
    let mut got = vec![0; msg.len()];
    s.read_exact(&mut got).expect("echo");
    assert_eq!(got, msg);
    start.elapsed()
}

#[test]
fn control_protocol_drives_every_fault() {
    let mut proxy = Proxy::spawn(echo_server());
    assert_eq!(proxy.stat("fault"), "pass");
    let mut client = connect(proxy.listen);
    round_trip(&mut client, b"hi");

    assert_eq!(proxy.command("blackhole"), "ok blackhole");
    client.write_all(b"lost").expect("write");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("blackhole let something through: {other:?}"),
    }
    assert_eq!(proxy.stat("c2u_dropped"), "4");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");

    assert_eq!(proxy.command("PASS"), "ok pass");
    round_trip(&mut client, b"back");

    assert_eq!(proxy.command("delay 150ms"), "ok delay 150ms");
    assert_eq!(proxy.stat("delay_ms"), "150");
    let rtt = round_trip(&mut client, b"slow");
    assert!(rtt >= Duration::from_millis(300), "{rtt:?}");
    assert_eq!(proxy.command("pass"), "ok pass");

    assert_eq!(proxy.command("reset"), "ok reset");
    let err = client.read(&mut buf).expect_err("reset connection");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert_eq!(proxy.stat("reset"), "1");
    assert_eq!(proxy.stat("c2u_forwarded"), "10");

    for bad in ["bogus", "delay", "delay 5", "pass please"] {
        let reply = proxy.command(bad);
        assert!(reply.starts_with("err "), "{bad:?} -> {reply:?}");
    }
    // Errors leave the control connection usable and the fault unchanged.
    assert_eq!(proxy.stat("fault"), "reset");
}

#[test]
fn refuses_a_control_port_off_loopback() {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
        .args(["--control", "0.0.0.0:0"])
        .output()
        .expect("run proxy binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}

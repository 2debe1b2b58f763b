//! Each fault against real loopback sockets. Every test checks the observable effect a peer
//! would see, so a fault that silently degrades to `pass` (or kills connections it should
//! keep) fails here.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use metastore_faultproxy::{Error, Fault, FaultControl, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

/// How long "nothing arrives" is watched for; long enough that a forwarding proxy on a
/// loaded machine would have delivered, short enough to keep the suite quick.
const SILENCE: Duration = Duration::from_millis(300);
/// Upper bound for things that should happen "promptly".
const PROMPT: Duration = Duration::from_secs(5);

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(any_port()).await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A proxied connection where the test holds both ends, to see each direction separately.
async fn pair() -> (FaultProxy, TcpStream, TcpStream, TcpListener) {
    let upstream = TcpListener::bind(any_port()).await.expect("bind upstream");
    let proxy = FaultProxy::start(any_port(), upstream.local_addr().expect("addr")).expect("start");
    let client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    let (server, _) = timeout(PROMPT, upstream.accept())
        .await
        .expect("proxy dialed upstream")
        .expect("accept");
    (proxy, client, server, upstream)
}

async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(PROMPT, stream.read_exact(&mut buf))
        .await
        .expect("bytes arrive in time")
        .expect("read");
    buf
}

/// Fails if anything arrives, or if the connection closes or breaks: a blackhole keeps it open.
async fn assert_silent(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match timeout(SILENCE, stream.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("{what}: connection closed during blackhole"),
        Ok(Ok(n)) => panic!("{what}: {n} bytes got through: {:?}", &buf[..n]),
        Ok(Err(e)) => panic!("{what}: connection broke during blackhole: {e}"),
    }
}

/// Reads until the connection is reset; the bytes before it do not matter.
async fn assert_reset(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + PROMPT;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!("{what}: no reset within {PROMPT:?}"),
            Ok(Ok(0)) => panic!("{what}: clean EOF, expected a reset (SO_LINGER 0)"),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{what}: {e}");
                return;
            }
        }
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PROMPT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    stream.write_all(msg).await.expect("write");
    assert_eq!(read_n(stream, msg.len()).await, msg);
    start.elapsed()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Sends `payload` through an echo and reads it back concurrently (the sockets could not
/// buffer all of it), checking it returns intact and in order.
async fn bulk_echo(client: &mut TcpStream, payload: &[u8]) -> Duration {
    let start = Instant::now();
    let (mut r, mut w) = client.split();
    let write = async {
        w.write_all(payload).await.expect("write");
    };
    let read = async {
        let mut got = vec![0; payload.len()];
        timeout(4 * PROMPT, r.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        got
    };
    let ((), got) = tokio::join!(write, read);
    assert!(got == payload, "echo differs from what was sent");
    start.elapsed()
}

#[tokio::test]
async fn pass_forwards_both_ways_and_counts_bytes() {
    let proxy = FaultProxy::start(any_port(), echo_server().await).expect("start");
    let control = proxy.control();
    assert_eq!(control.fault(), Fault::Pass);
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");

    // Large enough to take many chunks, so order across chunks is checked too.
    let payload = pattern(200_000);
    bulk_echo(&mut client, &payload).await;

    let n = payload.len() as u64;
    eventually("counters", || {
        let s = control.stats();
        s.client_to_upstream.forwarded == n && s.upstream_to_client.forwarded == n
    })
    .await;
    let s = control.stats();
    assert_eq!(
        s.client_to_upstream.dropped + s.upstream_to_client.dropped,
        0
    );
    assert_eq!((s.accepted, s.active, s.reset), (1, 1, 0));
}

#[tokio::test]
async fn blackhole_drops_both_ways_keeps_connection_and_pass_resumes() {
    let (proxy, mut client, mut server, _upstream) = pair().await;
    let control = proxy.control();
    client.write_all(b"hello").await.expect("write");
    assert_eq!(read_n(&mut server, 5).await, b"hello");

    control.blackhole();
    client.write_all(b"lost-c2u").await.expect("write");
    server.write_all(b"lost-u2c!").await.expect("write");
    assert_silent(&mut server, "client to upstream").await;
    assert_silent(&mut client, "upstream to client").await;
    eventually("dropped counters", || {
        let s = control.stats();
        s.client_to_upstream.dropped == 8 && s.upstream_to_client.dropped == 9
    })
    .await;

    // The same connections carry new bytes again, and only the new ones: what the partition
    // swallowed must not reappear in front of them.
    control.pass();
    client.write_all(b"after").await.expect("write");
    assert_eq!(read_n(&mut server, 5).await, b"after");
    server.write_all(b"back").await.expect("write");
    assert_eq!(read_n(&mut client, 4).await, b"back");
    let s = control.stats();
    assert_eq!((s.active, s.reset), (1, 0));
}

#[tokio::test]
async fn blackhole_applies_to_new_connections() {
    let proxy = FaultProxy::start(any_port(), echo_server().await).expect("start");
    proxy.control().blackhole();
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("a partition still accepts locally");
    client.write_all(b"ping").await.expect("write");
    assert_silent(&mut client, "new connection").await;
    proxy.control().pass();
    assert!(round_trip(&mut client, b"pong").await < PROMPT);
}

#[tokio::test]
async fn blackhole_holds_back_bytes_queued_by_a_delay() {
    let (proxy, mut client, mut server, _upstream) = pair().await;
    let control = proxy.control();
    control.delay(Duration::from_millis(400));
    client.write_all(b"in-flight").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    control.blackhole();
    assert_silent(&mut server, "delayed bytes").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    control.pass();
    client.write_all(b"new").await.expect("write");
    assert_eq!(read_n(&mut server, 3).await, b"new");
}

#[tokio::test]
async fn delay_adds_latency_each_way_and_keeps_order() {
    let delay = Duration::from_millis(200);
    let proxy = FaultProxy::start(any_port(), echo_server().await).expect("start");
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    round_trip(&mut client, b"warm").await;

    proxy.control().delay(delay);
    let rtt = round_trip(&mut client, b"slow").await;
    assert!(rtt >= 2 * delay, "round trip {rtt:?} under 2 x {delay:?}");

    // A delay is latency, not a toll per chunk: 1 MiB is 64+ chunks, which at one delay each
    // way per chunk would take over 25 s.
    let took = bulk_echo(&mut client, &pattern(1 << 20)).await;
    assert!(took >= 2 * delay, "{took:?}");
    assert!(
        took < Duration::from_secs(5),
        "delay serialised chunks: {took:?}"
    );

    proxy.control().pass();
    round_trip(&mut client, b"fast").await;
}

#[tokio::test]
async fn reset_resets_existing_and_new_connections() {
    let (proxy, mut client, mut server, upstream) = pair().await;
    let control = proxy.control();
    client.write_all(b"x").await.expect("write");
    assert_eq!(read_n(&mut server, 1).await, b"x");

    control.reset();
    assert_reset(&mut client, "existing client side").await;
    assert_reset(&mut server, "existing upstream side").await;

    // The kernel completes the handshake before the proxy sees the connection, so a new
    // client may connect and then gets the reset on its first read.
    match TcpStream::connect(proxy.local_addr()).await {
        Ok(mut late) => assert_reset(&mut late, "new connection").await,
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
            ),
            "{e}"
        ),
    }
    // A reset network does not let the new connection reach the upstream at all.
    if let Ok(accepted) = timeout(SILENCE, upstream.accept()).await {
        panic!("upstream was dialed while in reset: {accepted:?}");
    }
    eventually("reset counter", || control.stats().reset == 2).await;
    eventually("no live connections", || control.stats().active == 0).await;
}

#[tokio::test]
async fn pass_after_reset_accepts_again() {
    let proxy = FaultProxy::start(any_port(), echo_server().await).expect("start");
    proxy.control().reset();
    if let Ok(mut c) = TcpStream::connect(proxy.local_addr()).await {
        assert_reset(&mut c, "during reset").await;
    }
    proxy.control().pass();
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    round_trip(&mut client, b"alive").await;
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client() {
    let dead = {
        let l = TcpListener::bind(any_port()).await.expect("bind");
        l.local_addr().expect("addr")
    };
    let proxy = FaultProxy::start(any_port(), dead).expect("start");
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    assert_reset(&mut client, "dial failure").await;
}

#[tokio::test]
async fn half_close_is_passed_on_and_the_connection_ends() {
    let proxy = FaultProxy::start(any_port(), echo_server().await).expect("start");
    let control = proxy.control();
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    client.write_all(b"request").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    timeout(PROMPT, client.read_to_end(&mut got))
        .await
        .expect("EOF in time")
        .expect("read");
    assert_eq!(got, b"request");
    eventually("connection task ends", || control.stats().active == 0).await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let (proxy, mut client, mut server, _upstream) = pair().await;
    let control: FaultControl = proxy.control();
    let addr = proxy.local_addr();
    drop(proxy);

    let mut buf = [0u8; 8];
    for (side, stream) in [("client", &mut client), ("upstream", &mut server)] {
        let n = timeout(PROMPT, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{side} still open after drop"));
        assert!(matches!(n, Ok(0) | Err(_)), "{side}: {n:?}");
    }
    eventually("listener closed", || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
    })
    .await;
    // The handle outlives the proxy without effect.
    control.blackhole();
    assert_eq!(control.stats().active, 0);
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let err = FaultProxy::start(any_port(), any_port()).err();
    assert!(matches!(err, Some(Error::NoRuntime)), "{err:?}");
}

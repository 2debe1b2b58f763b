//! A fault-injecting TCP proxy for robustness tests.
//!
//! One [`FaultProxy`] sits in front of one cluster member's peer port; the harness points the
//! other members at the proxy instead of the member and then flips faults through a
//! [`FaultControl`]. A fault applies to both directions and to existing and new connections
//! alike, which is what a network partition or a slow link does to a real peer.
//!
//! See `README.md` for the control protocol of the `metastore-faultproxy` binary.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

pub mod control;

/// Bytes read from one socket at a time; a chunk is the unit that is delayed or dropped.
const CHUNK_BYTES: usize = 16 * 1024;

/// Chunks a direction may hold while they wait out a delay. Bounded so that a fast sender
/// behind a long delay is slowed by TCP backpressure instead of growing the proxy's memory.
const QUEUE_CHUNKS: usize = 1024;

/// Pause after a failed accept (EMFILE and the like), so the loop does not spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// What the proxy does to the traffic it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything as it comes.
    #[default]
    Pass,
    /// Keep connections open but discard every byte both ways, as a partition does: the peer
    /// sees silence, not an error. Discarded bytes stay lost after the fault is lifted.
    Blackhole,
    /// Forward each chunk this long after it was read, keeping order.
    Delay(Duration),
    /// Close every connection with a TCP reset and reset new ones as soon as they are accepted.
    Reset,
}

impl fmt::Display for Fault {
    /// Same spelling as the control protocol's commands, so replies can be fed back as input.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Pass => f.write_str("pass"),
            Fault::Blackhole => f.write_str("blackhole"),
            Fault::Delay(d) => write!(f, "delay {}ms", d.as_millis()),
            Fault::Reset => f.write_str("reset"),
        }
    }
}

/// Errors from [`FaultProxy::start`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("FaultProxy::start must be called from within a tokio runtime")]
    NoRuntime,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Byte counts for one direction of traffic, summed over every connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Bytes written to the far side.
    pub forwarded: u64,
    /// Bytes read and then discarded by a blackhole.
    pub dropped: u64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub fault: Fault,
    pub client_to_upstream: DirectionStats,
    pub upstream_to_client: DirectionStats,
    /// Connections accepted since start, including ones reset on arrival.
    pub accepted: u64,
    /// Connections open right now.
    pub active: u64,
    /// Connections closed with a reset because of [`Fault::Reset`].
    pub reset: u64,
}

#[derive(Default)]
struct DirCounters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl DirCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    // A watch channel rather than a plain lock: connections must wake up the moment the fault
    // becomes `Reset` (to kill themselves) or stops being `Blackhole` (to deliver a held FIN).
    fault: watch::Sender<Fault>,
    c2u: DirCounters,
    u2c: DirCounters,
    accepted: AtomicU64,
    active: AtomicU64,
    reset: AtomicU64,
}

/// Cloneable handle that switches the fault of one proxy and reads its counters.
///
/// Outliving the proxy is harmless: the settings then affect nothing.
#[derive(Clone)]
pub struct FaultControl {
    shared: Arc<Shared>,
}

impl FaultControl {
    /// Sets `fault` for every existing and future connection.
    pub fn set(&self, fault: Fault) {
        let old = self.shared.fault.send_replace(fault);
        if old != fault {
            tracing::debug!(upstream = %self.shared.upstream, %old, new = %fault, "fault changed");
        }
    }

    pub fn pass(&self) {
        self.set(Fault::Pass);
    }

    pub fn blackhole(&self) {
        self.set(Fault::Blackhole);
    }

    pub fn delay(&self, delay: Duration) {
        self.set(Fault::Delay(delay));
    }

    pub fn reset(&self) {
        self.set(Fault::Reset);
    }

    /// The fault in force now.
    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            fault: self.fault(),
            client_to_upstream: s.c2u.snapshot(),
            upstream_to_client: s.u2c.snapshot(),
            accepted: s.accepted.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
            reset: s.reset.load(Ordering::Relaxed),
        }
    }
}

/// A running proxy. Dropping it closes its listener and every connection it carries.
pub struct FaultProxy {
    local_addr: SocketAddr,
    control: FaultControl,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks a free port) and forwards every accepted connection to
    /// `upstream`, the only address the proxy ever dials. Tasks run on the current tokio runtime;
    /// the proxy starts in [`Fault::Pass`].
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<FaultProxy, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        // A std bind keeps `start` synchronous, so harness code that builds a cluster
        // description outside an async block can still start proxies.
        let std_listener = std::net::TcpListener::bind(listen).map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let local_addr = listener.local_addr()?;
        let (fault, _) = watch::channel(Fault::Pass);
        let shared = Arc::new(Shared {
            upstream,
            fault,
            c2u: DirCounters::default(),
            u2c: DirCounters::default(),
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            reset: AtomicU64::new(0),
        });
        let task = runtime.spawn(accept_loop(listener, shared.clone()));
        tracing::debug!(%local_addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            local_addr,
            control: FaultControl { shared },
            task,
        })
    }

    /// The address clients should dial instead of the upstream.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.control.shared.upstream
    }

    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks, so aborting it drops the
        // listener and aborts every connection with it.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fault proxy accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reaps finished connections so the set does not grow with every one ever seen.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Counts a connection as active for as long as its task lives, aborted or not.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

enum End {
    Closed,
    Failed(io::Error),
    Reset,
}

/// Drops `stream` with SO_LINGER 0, which makes the kernel send RST instead of FIN.
fn abort(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(error = %e, "set_zero_linger failed; closing normally");
    }
}

async fn wait_for_reset(fault: &mut watch::Receiver<Fault>) {
    if fault.wait_for(|f| *f == Fault::Reset).await.is_err() {
        // The sender lives in `Shared`, which this connection holds, so this cannot happen.
        std::future::pending::<()>().await;
    }
}

async fn serve_conn(mut client: TcpStream, shared: Arc<Shared>) {
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    shared.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(shared.clone());
    let mut fault = shared.fault.subscribe();

    // Reset is checked first (`biased`, and `wait_for` looks at the current value), so a
    // connection arriving while in `Reset` never makes the upstream see a dial.
    let dialed = tokio::select! {
        biased;
        () = wait_for_reset(&mut fault) => {
            shared.reset.fetch_add(1, Ordering::Relaxed);
            abort(client);
            return;
        }
        dialed = TcpStream::connect(shared.upstream) => dialed,
    };
    let mut upstream = match dialed {
        Ok(s) => s,
        Err(e) => {
            // A reset is the nearest a client can get to seeing the upstream's refusal.
            tracing::debug!(upstream = %shared.upstream, error = %e, "upstream dial failed");
            abort(client);
            return;
        }
    };
    // Raft messages are small and latency-bound; Nagle in the proxy would add delay that no
    // fault asked for.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let end = {
        let (client_r, client_w) = client.split();
        let (upstream_r, upstream_w) = upstream.split();
        let c2u = pump(client_r, upstream_w, &shared.c2u, fault.clone());
        let u2c = pump(upstream_r, client_w, &shared.u2c, fault.clone());
        tokio::select! {
            res = async { tokio::try_join!(c2u, u2c) } => match res {
                Ok(_) => End::Closed,
                Err(e) => End::Failed(e),
            },
            () = wait_for_reset(&mut fault) => End::Reset,
        }
    };
    match end {
        End::Closed => {}
        End::Failed(e) => {
            // One side broke (usually a reset); resetting the other passes that on instead
            // of pretending the stream ended cleanly.
            tracing::debug!(error = %e, "proxied connection failed");
            abort(client);
            abort(upstream);
        }
        End::Reset => {
            shared.reset.fetch_add(1, Ordering::Relaxed);
            abort(client);
            abort(upstream);
        }
    }
}

struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

/// Copies one direction. Reading and writing are separate halves joined by a queue so that a
/// delay is added latency rather than one delay per chunk of throughput.
///
/// EOF is passed on as a half-close once the queue is drained, so request/response peers that
/// shut down their write side still get their answer.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counters: &DirCounters,
    fault: watch::Receiver<Fault>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let read_fault = fault.clone();
    let mut write_fault = fault;

    let read = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let now = Instant::now();
            let current = *read_fault.borrow();
            let due = match current {
                Fault::Blackhole => {
                    counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                Fault::Delay(d) => now + d,
                // Under `Reset` the connection is about to be killed; what slips through in the
                // meantime is irrelevant.
                Fault::Pass | Fault::Reset => now,
            };
            let chunk = Chunk {
                due,
                bytes: buf[..n].to_vec(),
            };
            if tx.send(chunk).await.is_err() {
                // The writer is gone only when it failed, and try_join reports that failure.
                return Ok(());
            }
        }
    };

    let write = async move {
        while let Some(chunk) = rx.recv().await {
            if chunk.due > Instant::now() {
                tokio::time::sleep_until(chunk.due).await;
            }
            // Bytes still in flight when a partition starts are lost with it.
            if *write_fault.borrow() == Fault::Blackhole {
                counters
                    .dropped
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                continue;
            }
            to.write_all(&chunk.bytes).await?;
            counters
                .forwarded
                .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        }
        // A partition holds the FIN back too; sending it once the partition heals stands in
        // for TCP retransmitting it, and keeps the connection from hanging half-open forever.
        let _ = write_fault.wait_for(|f| *f != Fault::Blackhole).await;
        to.shutdown().await
    };

    tokio::try_join!(read, write).map(|_| ())
}

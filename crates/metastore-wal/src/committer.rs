//! Group commit for async callers.
//!
//! [`Wal::sync_to`] blocks the calling thread, which is right for a dedicated thread (the raft
//! driver) but wrong inside an async runtime, and makes every concurrent writer an OS thread
//! that must sleep and be woken per commit. [`Committer`] owns one flusher thread that makes
//! the log durable on behalf of any number of futures: a writer task appends, awaits
//! [`Committer::sync`], and is woken through its `Waker` once the flusher's fsync covers its
//! record. Every record appended while one fsync runs is covered by the next one, so
//! concurrent writers share fsyncs without anybody waiting on a timer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::{Lsn, Wal, WalError};

/// Async group commit over a shared [`Wal`]: see the module docs. Dropping it stops the
/// flusher after it has synced what was already awaited.
pub struct Committer {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

struct Shared {
    wal: Arc<Wal>,
    state: Mutex<State>,
    /// Signalled when a waiter needs a flush (only while the flusher sleeps) or on shutdown.
    work: Condvar,
}

struct State {
    /// Highest Lsn a future waits for.
    requested: Lsn,
    /// Every record up to this Lsn is durable.
    durable: Lsn,
    /// Futures to wake, with the Lsn each one waits for.
    waiters: Vec<(Lsn, Waker)>,
    /// The flusher is waiting on `work`; only then does a new waiter signal it.
    flusher_idle: bool,
    /// Set by a failed flush: the log is poisoned and every waiter gets an error.
    failed: bool,
    shutdown: bool,
}

impl Committer {
    /// Starts the flusher thread. `Wal::sync_to` may still be called directly beside it.
    pub fn new(wal: Arc<Wal>) -> Result<Committer, WalError> {
        let durable = wal.durable_lsn();
        let shared = Arc::new(Shared {
            wal,
            state: Mutex::new(State {
                requested: durable,
                durable,
                waiters: Vec::new(),
                flusher_idle: false,
                failed: false,
                shutdown: false,
            }),
            work: Condvar::new(),
        });
        let flusher_shared = Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("wal-committer".into())
            .spawn(move || flusher_shared.run())
            .map_err(|source| WalError::Io {
                path: shared.wal.dir().to_path_buf(),
                source,
            })?;
        Ok(Committer {
            shared,
            flusher: Some(flusher),
        })
    }

    /// The log this committer syncs.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.shared.wal
    }

    /// Resolves once every record up to `lsn` is written and fsynced; fails if a flush
    /// failed (the log is then poisoned).
    pub fn sync(&self, lsn: Lsn) -> Durable<'_> {
        Durable {
            shared: &self.shared,
            lsn,
        }
    }

    /// Appends `records` (see [`Wal::append`]) and resolves with the Lsn of the last one once
    /// it is durable.
    pub async fn append(&self, records: &[(u8, u64, &[u8])]) -> Result<Lsn, WalError> {
        let lsn = self.shared.wal.append(records)?;
        self.sync(lsn).await?;
        Ok(lsn)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.work.notify_one();
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                tracing::warn!(dir = %self.shared.wal.dir().display(), "wal committer thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("wal", &self.shared.wal)
            .finish_non_exhaustive()
    }
}

/// Future of [`Committer::sync`].
#[must_use = "a future does nothing unless awaited"]
pub struct Durable<'a> {
    shared: &'a Shared,
    lsn: Lsn,
}

impl Future for Durable<'_> {
    type Output = Result<(), WalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lsn = self.lsn.min(self.shared.wal.last_appended_lsn());
        let mut st = self.shared.state.lock();
        if st.durable >= lsn {
            return Poll::Ready(Ok(()));
        }
        if st.failed {
            return Poll::Ready(Err(WalError::Poisoned));
        }
        // A future polled again registers again; the stale entry only causes one spurious
        // wake, and every entry is drained by the flush that covers it.
        st.waiters.push((lsn, cx.waker().clone()));
        if lsn > st.requested {
            st.requested = lsn;
        }
        let wake_flusher = std::mem::take(&mut st.flusher_idle);
        drop(st);
        if wake_flusher {
            self.shared.work.notify_one();
        }
        Poll::Pending
    }
}

impl Shared {
    fn run(&self) {
        // Reused across rounds so steady state allocates nothing.
        let mut ready: Vec<Waker> = Vec::new();
        let mut still_waiting: Vec<(Lsn, Waker)> = Vec::new();
        loop {
            {
                let mut st = self.state.lock();
                while st.requested <= st.durable && !st.shutdown {
                    st.flusher_idle = true;
                    self.work.wait(&mut st);
                }
                st.flusher_idle = false;
                if st.requested <= st.durable {
                    return; // shut down with nothing awaited
                }
            }
            // Everything appended so far rides on this fsync, not only what was requested.
            let target = self.wal.last_appended_lsn();
            let res = self.wal.sync_to(target);
            let mut st = self.state.lock();
            match res {
                Ok(()) => st.durable = st.durable.max(target),
                Err(e) => {
                    tracing::error!(error = %e, dir = %self.wal.dir().display(), "wal committer: flush failed");
                    st.failed = true;
                }
            }
            let (durable, failed) = (st.durable, st.failed);
            for (lsn, waker) in st.waiters.drain(..) {
                if failed || lsn <= durable {
                    ready.push(waker);
                } else {
                    still_waiting.push((lsn, waker));
                }
            }
            std::mem::swap(&mut st.waiters, &mut still_waiting);
            drop(st);
            for waker in ready.drain(..) {
                waker.wake();
            }
            if failed {
                return;
            }
        }
    }
}

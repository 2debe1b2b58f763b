//! The next segment file, zero-filled ahead of time by a background thread.
//!
//! An `fdatasync` after an append that grew a file must also write the file's new size: on ext4
//! that is a second, synchronous write of the inode (measured on the project's VM: 51 µs per
//! `fdatasync` of a growing file, 30 µs in a file whose blocks were written beforehand). A
//! segment that starts at its full size, filled with zeros, never grows while records overwrite
//! the zeros, so each group commit's fsync flushes the data alone. Filling 64 MiB takes tens of
//! milliseconds, so it happens on this thread, while the active segment fills.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

/// Name of the file being prepared; `Wal::open` only reads names ending in `.wal`.
pub(crate) const SPARE_NAME: &str = "next-segment.wal.tmp";

#[derive(Default)]
struct State {
    ready: Option<PathBuf>,
    /// The thread is filling a file now.
    preparing: bool,
    failed: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// Keeps one zero-filled segment file ready in the log's directory.
pub(crate) struct SparePreparer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SparePreparer {
    /// Removes a spare a previous process may have left half-written and starts preparing a
    /// new one of `size` bytes.
    pub(crate) fn start(dir: &Path, size: u64, sync: bool) -> io::Result<Self> {
        let path = dir.join(SPARE_NAME);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                preparing: true,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wal-prealloc".into())
                .spawn(move || prepare_loop(&shared, &path, size, sync))?
        };
        Ok(SparePreparer {
            shared,
            thread: Some(thread),
        })
    }

    /// Moves the prepared file to `dest`, waiting for it if it is being filled now, and
    /// starts the next one. `Ok(false)` if there is none because preparing failed.
    pub(crate) fn take_as(&self, dest: &Path) -> io::Result<bool> {
        let mut state = self.shared.state.lock();
        while state.ready.is_none() && state.preparing && !state.failed {
            self.shared.changed.wait(&mut state);
        }
        let Some(prepared) = state.ready.take() else {
            return Ok(false);
        };
        // Moved before the thread is told to go on: it reuses the name, and must never write
        // into the file that has just become a segment. A link, unlike a rename, fails instead
        // of replacing a segment that already has that name.
        fs::hard_link(&prepared, dest)?;
        fs::remove_file(&prepared)?;
        if !state.stop {
            state.preparing = true;
            self.shared.changed.notify_all();
        }
        Ok(true)
    }
}

impl Drop for SparePreparer {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Marks preparing as failed if the thread unwinds, so that a rotation waiting for the file
/// goes on with a plain one instead of waiting forever.
struct FailOnUnwind<'a>(&'a Shared);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock();
            state.preparing = false;
            state.failed = true;
            self.0.changed.notify_all();
        }
    }
}

fn prepare_loop(shared: &Shared, path: &Path, size: u64, sync: bool) {
    let _unwind = FailOnUnwind(shared);
    loop {
        {
            let mut state = shared.state.lock();
            while !state.stop && !state.preparing {
                shared.changed.wait(&mut state);
            }
            if state.stop {
                return;
            }
        }
        let result = fill_with_zeros(path, size, sync, || shared.state.lock().stop);
        let mut state = shared.state.lock();
        state.preparing = false;
        match result {
            Ok(()) => state.ready = Some(path.to_path_buf()),
            Err(_) if state.stop => return,
            Err(e) => {
                // Rotation falls back to files that grow as they are written; the partial
                // file would only take space the active segment may need.
                tracing::warn!(path = %path.display(), error = %e, "cannot preallocate the next wal segment");
                let _ = fs::remove_file(path);
                state.failed = true;
            }
        }
        shared.changed.notify_all();
        if state.failed {
            return;
        }
    }
}

/// Writes `size` zeros to `path`. Gives up with `Interrupted` once `stopped` says the log is
/// being closed, leaving a partial file that the next `start` removes.
fn fill_with_zeros(
    path: &Path,
    size: u64,
    sync: bool,
    stopped: impl Fn() -> bool,
) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        if stopped() {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    if sync {
        // Otherwise the first group commit in the segment would flush all of these pages.
        file.sync_data()?;
    }
    Ok(())
}

/// Opens a segment file for writing at `offset` (not in append mode: records overwrite the
/// zeros of a preallocated file).
pub(crate) fn open_at(path: &Path, offset: u64) -> io::Result<File> {
    use std::io::{Seek, SeekFrom};
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    Ok(file)
}

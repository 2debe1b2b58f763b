//! A segmented, group-commit write-ahead log.
//!
//! The log knows nothing about its callers: a record is an opaque `(kind, index, payload)`
//! triple. `kind` and `index` belong to the caller; the log only uses `index` to decide which
//! closed segments [`Wal::purge_below`] may delete.
//!
//! On-disk format (all integers little endian), one directory of segment files named
//! `{seq:016x}-{first_index:016x}.wal`, each a plain sequence of records (the last segment may
//! end in zeros: preallocated room, see `spare.rs`):
//!
//! ```text
//! [len: u32][crc32: u32][kind: u8][index: u64][payload: len - 9 bytes]
//! ```
//!
//! `len` counts `kind + index + payload`; `crc32` (crc32fast / IEEE) covers the 4 `len` bytes
//! followed by the `len` bytes of the body.
//!
//! Durability contract: [`Wal::append`] only buffers; a record is durable once
//! [`Wal::sync_to`] (or [`Wal::append_sync`]) returned `Ok` for its [`Lsn`] or a later one.
//! After any write or fsync failure the log is poisoned and every later call fails.
//!
//! Async callers use [`Committer`]: a flusher thread syncs for any number of awaiting tasks.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

mod committer;
mod spare;
pub use committer::{Committer, Durable};
use spare::SparePreparer;

/// Log sequence number: 1 for the first record appended through this process's `Wal` (or
/// recovered count + 1 after a restart), increasing by 1 per record.
pub type Lsn = u64;

/// Largest accepted payload (64 MiB).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// `[len: u32][crc: u32]`.
const HEADER_LEN: usize = 8;
/// `[kind: u8][index: u64]`.
const BODY_PREFIX_LEN: usize = 9;
const MAX_BODY_LEN: usize = BODY_PREFIX_LEN + MAX_PAYLOAD;
const SEGMENT_EXT: &str = ".wal";
/// How often a writer waiting for another's fsync yields its core before it sleeps.
const YIELDS_BEFORE_SLEEP: u32 = 4;
/// A swap buffer that grew beyond this is dropped instead of kept for reuse.
const MAX_RETAINED_BUF: usize = 8 * 1024 * 1024;

/// Encoded size of a record with a payload of `payload_len` bytes.
pub const fn encoded_len(payload_len: usize) -> usize {
    HEADER_LEN + BODY_PREFIX_LEN + payload_len
}

/// Options for [`Wal::open`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Rotate to a new segment file once the active one exceeds this many bytes.
    pub segment_size: u64,
    /// Issue `fsync` (`File::sync_data`, and directory fsyncs) when syncing. `false` is only
    /// meant for benchmarks and tests: nothing is then durable across a machine crash.
    pub sync: bool,
    /// Start every segment at its full size, zero-filled ahead of time by a background thread,
    /// so that an fsync never has to write a grown file size (see `spare.rs`). Turn it off on
    /// file systems where writing zeros in advance buys nothing (copy-on-write ones).
    pub preallocate: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 * 1024 * 1024,
            sync: true,
            preallocate: true,
        }
    }
}

/// One log record as recovered by [`Wal::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub index: u64,
    pub payload: Vec<u8>,
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wal corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("wal record too large: {0} bytes")]
    RecordTooLarge(usize),
    #[error("wal is closed after an earlier write failure")]
    Poisoned,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters since [`Wal::open`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WalStats {
    /// fsyncs issued: data-file `sync_data` calls plus directory fsyncs.
    pub fsyncs: u64,
    /// Records appended.
    pub records: u64,
    /// Encoded bytes appended (headers included).
    pub bytes: u64,
}

/// Metadata of one segment file.
#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Bytes in the file (for the active segment: including bytes of the batch being written).
    size: u64,
    /// Largest record index in the segment, `None` when it holds no record.
    max_index: Option<u64>,
}

/// Boundary of one buffered record: its index and the end offset of its bytes in the buffer.
#[derive(Clone, Copy, Debug)]
struct PendingMeta {
    index: u64,
    end: usize,
}

/// Appended but not yet written records.
struct Pending {
    bytes: Vec<u8>,
    metas: Vec<PendingMeta>,
    /// Lsn the next appended record gets.
    next_lsn: Lsn,
}

/// State owned by whoever writes to the files (the sync leader, `purge_below`, `Drop`).
struct Writer {
    /// Oldest first; the last one is the active segment.
    segments: VecDeque<Segment>,
    /// Open handle of `segments.back()`, `Some` iff `segments` is non-empty (until poisoned).
    active: Option<File>,
    /// The active file is longer than its records (zeros follow them): it is cut to its records
    /// when it is closed, so only the last segment ever ends in zeros.
    active_preallocated: bool,
    /// Buffers swapped with `Pending` on each flush, so steady state allocates nothing.
    spare_bytes: Vec<u8>,
    spare_metas: Vec<PendingMeta>,
}

/// A segmented, group-commit write-ahead log. `Send + Sync`; every method takes `&self`.
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    pending: Mutex<Pending>,
    /// Lsn of the last appended record (`Pending::next_lsn - 1`, stored under that lock), so
    /// readers of it need not take the append lock.
    appended: AtomicU64,
    writer: Mutex<Writer>,
    /// The next segment file, zero-filled in advance (with [`WalOptions::preallocate`]).
    next_segment: Option<SparePreparer>,
    /// Every record with an Lsn up to this one is written and fsynced.
    durable: AtomicU64,
    /// A thread is currently writing + fsyncing on behalf of everybody.
    leader: AtomicBool,
    /// Bumped after every sync. Waiters whose sync did not end while they yielded sleep on it
    /// as a futex, and the leader wakes them all with one broadcast; no lock is held while
    /// waiting, so a woken writer goes straight back to appending.
    sync_epoch: AtomicU32,
    poisoned: AtomicBool,
    fsyncs: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("opts", &self.opts)
            .field("poisoned", &self.poisoned.load(Ordering::SeqCst))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Resets the leader flag and wakes every waiter, also if the leader panicked.
struct LeaderGuard<'a>(&'a Wal);

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::SeqCst);
        }
        self.0.leader.store(false, Ordering::SeqCst);
        self.0.sync_epoch.fetch_add(1, Ordering::SeqCst);
        atomic_wait::wake_all(&self.0.sync_epoch);
    }
}

impl Wal {
    /// Opens (creating the directory if needed) and recovers the log; returns every whole
    /// record of every segment in append order.
    ///
    /// A torn tail of the last segment (partial header, a length reaching past EOF, a zero
    /// length with data after it, a bad header or CRC mismatch followed only by zeros or
    /// overlapping a whole sector of zeros) is truncated away with a warning.
    /// Zeros after the last record are a preallocated segment's unused room: they are kept and
    /// overwritten by the next records. Any other damage, or any damage (zeros included) in a
    /// non-last segment, or a missing segment in the sequence, is [`WalError::Corrupt`].
    pub fn open(dir: impl AsRef<Path>, opts: WalOptions) -> Result<(Wal, Vec<Record>), WalError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let fsyncs = AtomicU64::new(0);

        let mut files = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(SEGMENT_EXT) {
                continue;
            }
            let path = entry.path();
            match parse_segment_name(name) {
                Some((seq, _first_index)) => files.push((seq, path)),
                None => {
                    return Err(WalError::Corrupt {
                        path,
                        offset: 0,
                        reason: "unrecognized segment file name".into(),
                    })
                }
            }
        }
        files.sort_by_key(|(seq, _)| *seq);
        for pair in files.windows(2) {
            if pair[1].0 != pair[0].0.wrapping_add(1) {
                return Err(WalError::Corrupt {
                    path: pair[1].1.clone(),
                    offset: 0,
                    reason: format!(
                        "segment sequence gap: {:016x} follows {:016x}",
                        pair[1].0, pair[0].0
                    ),
                });
            }
        }

        let mut records = Vec::new();
        let mut segments = VecDeque::with_capacity(files.len());
        let mut active_preallocated = false;
        let nfiles = files.len();
        for (i, (seq, path)) in files.into_iter().enumerate() {
            let is_last = i + 1 == nfiles;
            let data = fs::read(&path).map_err(io_err(&path))?;
            let parsed = parse_segment(&path, &data, is_last)?;
            if !is_last && parsed.records.is_empty() {
                // A segment is only left for the next one once it is full: an empty one
                // before the last means its records are gone, and replaying around the hole
                // would skip them silently.
                return Err(WalError::Corrupt {
                    path,
                    offset: 0,
                    reason: "a segment before the last holds no records (the log has a hole)"
                        .into(),
                });
            }
            let mut size = data.len() as u64;
            if parsed.zero_tail {
                size = parsed.valid_len;
                active_preallocated = true;
            }
            if let Some(reason) = parsed.torn {
                tracing::warn!(
                    path = %path.display(),
                    offset = parsed.valid_len,
                    dropped_bytes = size - parsed.valid_len,
                    reason = %reason,
                    "truncating torn tail of the last wal segment"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(parsed.valid_len).map_err(io_err(&path))?;
                if opts.sync {
                    f.sync_data().map_err(io_err(&path))?;
                    fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                size = parsed.valid_len;
            }
            let max_index = parsed.records.iter().map(|r| r.index).max();
            records.extend(parsed.records);
            segments.push_back(Segment {
                seq,
                path,
                size,
                max_index,
            });
        }

        let active = match segments.back() {
            Some(seg) => {
                let f = spare::open_at(&seg.path, seg.size).map_err(io_err(&seg.path))?;
                if opts.sync {
                    // What we recovered may still sit only in the page cache of a crashed
                    // process: make it durable before anybody acts on it.
                    f.sync_data().map_err(io_err(&seg.path))?;
                    sync_dir(&dir)?;
                    fsyncs.fetch_add(2, Ordering::Relaxed);
                }
                Some(f)
            }
            None => None,
        };

        let next_segment = if opts.preallocate {
            Some(SparePreparer::start(&dir, opts.segment_size, opts.sync).map_err(io_err(&dir))?)
        } else {
            None
        };
        let recovered = records.len() as u64;
        let wal = Wal {
            dir,
            opts,
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                metas: Vec::new(),
                next_lsn: recovered + 1,
            }),
            appended: AtomicU64::new(recovered),
            writer: Mutex::new(Writer {
                segments,
                active,
                active_preallocated,
                spare_bytes: Vec::new(),
                spare_metas: Vec::new(),
            }),
            next_segment,
            durable: AtomicU64::new(recovered),
            leader: AtomicBool::new(false),
            sync_epoch: AtomicU32::new(0),
            poisoned: AtomicBool::new(false),
            fsyncs,
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        Ok((wal, records))
    }

    /// Buffers `(kind, index, payload)` records (not yet durable) and returns the Lsn of the
    /// last one (for an empty slice: the Lsn of the last record appended so far). The batch is
    /// all-or-nothing: if any payload exceeds [`MAX_PAYLOAD`] nothing is appended.
    pub fn append(&self, records: &[(u8, u64, &[u8])]) -> Result<Lsn, WalError> {
        self.check_poisoned()?;
        let mut total = 0usize;
        for (_, _, payload) in records {
            if payload.len() > MAX_PAYLOAD {
                return Err(WalError::RecordTooLarge(payload.len()));
            }
            total += encoded_len(payload.len());
        }
        // Checksums are computed outside the lock; under it we only copy bytes.
        let crcs: Vec<(u32, u32)> = records
            .iter()
            .map(|(kind, index, payload)| {
                let len = (BODY_PREFIX_LEN + payload.len()) as u32;
                (len, record_crc(len, *kind, *index, payload))
            })
            .collect();

        let mut p = self.pending.lock();
        // Checked again under the lock: after a failed flush nothing may be buffered anew.
        self.check_poisoned()?;
        p.bytes.reserve(total);
        for ((kind, index, payload), (len, crc)) in records.iter().zip(crcs) {
            p.bytes.extend_from_slice(&len.to_le_bytes());
            p.bytes.extend_from_slice(&crc.to_le_bytes());
            p.bytes.push(*kind);
            p.bytes.extend_from_slice(&index.to_le_bytes());
            p.bytes.extend_from_slice(payload);
            let end = p.bytes.len();
            p.metas.push(PendingMeta { index: *index, end });
        }
        p.next_lsn += records.len() as u64;
        let last = p.next_lsn - 1;
        self.appended.store(last, Ordering::Release);
        drop(p);

        self.records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(total as u64, Ordering::Relaxed);
        Ok(last)
    }

    /// Returns once every record up to `lsn` is written and fsynced (an `lsn` beyond the last
    /// appended record is clamped to it).
    ///
    /// Group commit: one waiting thread becomes the leader, writes everything buffered so far
    /// and issues one fsync for all; the others sleep on a futex and return when
    /// the durable Lsn covers theirs.
    pub fn sync_to(&self, lsn: Lsn) -> Result<(), WalError> {
        self.check_poisoned()?;
        let target = lsn.min(self.last_appended_lsn());
        loop {
            self.check_poisoned()?;
            if self.durable.load(Ordering::SeqCst) >= target {
                return Ok(());
            }
            if self
                .leader
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let guard = LeaderGuard(self);
                let res = {
                    let mut w = self.writer.lock();
                    self.flush(&mut w)
                };
                match res {
                    Ok(flushed) => {
                        self.durable.fetch_max(flushed, Ordering::SeqCst);
                    }
                    Err(e) => {
                        self.poisoned.store(true, Ordering::SeqCst);
                        drop(guard);
                        return Err(e);
                    }
                }
                drop(guard);
                // Loop: normally `flushed >= target` and the check above returns Ok.
                continue;
            }
            // The epoch is read before the state it guards: a sync that ends after this
            // load changes the epoch, so the wait below returns at once instead of missing it.
            let epoch = self.sync_epoch.load(Ordering::SeqCst);
            if self.durable.load(Ordering::SeqCst) >= target {
                return Ok(());
            }
            if self.leader.load(Ordering::SeqCst) {
                // A few yields before sleeping: with many writers on few cores the leader's
                // fsync (tens of µs) often ends while they give way, and then they return
                // without a futex sleep and wake. Measured with 256 writer threads on 2
                // cores: 250k appends/s without the yields, 530k with 3; more than ~30
                // yields steal the leader's CPU and it drops again (340k at 300).
                for _ in 0..YIELDS_BEFORE_SLEEP {
                    if self.sync_epoch.load(Ordering::SeqCst) != epoch {
                        break;
                    }
                    std::thread::yield_now();
                }
                atomic_wait::wait(&self.sync_epoch, epoch);
            }
        }
    }

    /// [`append`](Self::append) of one record followed by [`sync_to`](Self::sync_to) its Lsn.
    pub fn append_sync(&self, kind: u8, index: u64, payload: &[u8]) -> Result<Lsn, WalError> {
        let lsn = self.append(&[(kind, index, payload)])?;
        self.sync_to(lsn)?;
        Ok(lsn)
    }

    /// Deletes closed (non-active) segments whose records all have index < `index`, oldest
    /// first, stopping at the first segment that does not qualify (so the remaining log is
    /// always a contiguous suffix, also if indexes went backwards, e.g. after a log
    /// truncation). Returns how many files were removed. Never deletes the active segment.
    pub fn purge_below(&self, index: u64) -> Result<usize, WalError> {
        self.check_poisoned()?;
        let mut w = self.writer.lock();
        let mut removed = 0;
        while w.segments.len() > 1 {
            let Some(front) = w.segments.front() else {
                break;
            };
            if front.max_index.is_some_and(|m| m >= index) {
                break;
            }
            fs::remove_file(&front.path).map_err(io_err(&front.path))?;
            w.segments.pop_front();
            removed += 1;
            if self.opts.sync {
                // One directory fsync per removal keeps the on-disk set a contiguous suffix
                // whatever order the filesystem persists unlinks in.
                sync_dir(&self.dir).inspect_err(|_| self.poisoned.store(true, Ordering::SeqCst))?;
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(removed)
    }

    /// Number of segment files currently on disk (a segment is created lazily by the first
    /// write, so a fresh log has none).
    pub fn segment_count(&self) -> usize {
        self.writer.lock().segments.len()
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lsn of the last record appended (recovered records count), 0 if none.
    pub fn last_appended_lsn(&self) -> Lsn {
        self.appended.load(Ordering::Acquire)
    }

    /// Every record up to this Lsn is written and fsynced.
    pub fn durable_lsn(&self) -> Lsn {
        self.durable.load(Ordering::SeqCst)
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        WalStats {
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    fn check_poisoned(&self) -> Result<(), WalError> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(WalError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Writes everything buffered and fsyncs it; returns the Lsn of the last record covered.
    /// Any error leaves the caller responsible for poisoning the log.
    fn flush(&self, w: &mut Writer) -> Result<Lsn, WalError> {
        let last_lsn = {
            let mut p = self.pending.lock();
            std::mem::swap(&mut p.bytes, &mut w.spare_bytes);
            std::mem::swap(&mut p.metas, &mut w.spare_metas);
            p.next_lsn - 1
        };
        let mut bytes = std::mem::take(&mut w.spare_bytes);
        let mut metas = std::mem::take(&mut w.spare_metas);
        let res = if metas.is_empty() {
            Ok(())
        } else {
            self.write_batch(w, &bytes, &metas)
        };
        bytes.clear();
        metas.clear();
        if bytes.capacity() <= MAX_RETAINED_BUF {
            w.spare_bytes = bytes;
            w.spare_metas = metas;
        }
        res.map(|()| last_lsn)
    }

    fn write_batch(
        &self,
        w: &mut Writer,
        bytes: &[u8],
        metas: &[PendingMeta],
    ) -> Result<(), WalError> {
        let mut run_start = 0usize;
        let mut prev_end = 0usize;
        for m in metas {
            let rotate = match w.segments.back() {
                None => true,
                Some(seg) => seg.size > self.opts.segment_size,
            };
            if rotate {
                if prev_end > run_start {
                    write_active(w, &bytes[run_start..prev_end])?;
                }
                self.rotate(w, m.index)?;
                run_start = prev_end;
            }
            let seg = w.segments.back_mut().ok_or(WalError::Poisoned)?;
            seg.size += (m.end - prev_end) as u64;
            seg.max_index = Some(seg.max_index.map_or(m.index, |x| x.max(m.index)));
            prev_end = m.end;
        }
        if prev_end > run_start {
            write_active(w, &bytes[run_start..prev_end])?;
        }
        if self.opts.sync {
            let path = active_path(w);
            let f = w.active.as_ref().ok_or(WalError::Poisoned)?;
            let started = std::time::Instant::now();
            f.sync_data().map_err(io_err(&path))?;
            let took = started.elapsed().as_secs_f64();
            // etcd's name for dashboards and alerts written for etcd, and the plans' own.
            metrics::histogram!("etcd_disk_wal_fsync_duration_seconds").record(took);
            metrics::histogram!("metastore_wal_fsync_duration_seconds").record(took);
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Closes the active segment (fsynced first) and starts a new one whose first record
    /// will have `first_index`.
    fn rotate(&self, w: &mut Writer, first_index: u64) -> Result<(), WalError> {
        if let Some(f) = w.active.take() {
            let path = active_path(w);
            if w.active_preallocated {
                let records_len = w.segments.back().map_or(0, |s| s.size);
                f.set_len(records_len).map_err(io_err(&path))?;
            }
            if self.opts.sync {
                f.sync_data().map_err(io_err(&path))?;
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        let seq = w.segments.back().map_or(1, |s| s.seq + 1);
        let path = self.dir.join(segment_name(seq, first_index));
        // Waits only if the file is still being filled: at the first write of a new log (tens
        // of milliseconds for 64 MiB), or if a whole segment filled up faster than that.
        let preallocated = match &self.next_segment {
            Some(spare) => spare.take_as(&path).map_err(io_err(&path))?,
            None => false,
        };
        let f = if preallocated {
            spare::open_at(&path, 0).map_err(io_err(&path))?
        } else {
            OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?
        };
        if self.opts.sync {
            sync_dir(&self.dir)?;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        w.segments.push_back(Segment {
            seq,
            path,
            size: 0,
            max_index: None,
        });
        w.active = Some(f);
        w.active_preallocated = preallocated;
        Ok(())
    }
}

impl Drop for Wal {
    /// Best effort: writes (and, with `sync`, fsyncs) whatever is still buffered.
    fn drop(&mut self) {
        if self.poisoned.load(Ordering::SeqCst) {
            return;
        }
        let mut w = self.writer.lock();
        if let Err(e) = self.flush(&mut w) {
            self.poisoned.store(true, Ordering::SeqCst);
            tracing::warn!(error = %e, dir = %self.dir.display(), "wal: flush on drop failed");
        }
    }
}

fn active_path(w: &Writer) -> PathBuf {
    w.segments
        .back()
        .map(|s| s.path.clone())
        .unwrap_or_default()
}

fn write_active(w: &mut Writer, buf: &[u8]) -> Result<(), WalError> {
    let path = active_path(w);
    let f = w.active.as_mut().ok_or(WalError::Poisoned)?;
    f.write_all(buf).map_err(io_err(&path))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
    }
    Ok(())
}

fn record_crc(len: u32, kind: u8, index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&[kind]);
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}{SEGMENT_EXT}")
}

/// Parses `{seq:016x}-{first_index:016x}.wal`.
fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SEGMENT_EXT)?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 16 || first.len() != 16 {
        return None;
    }
    let hex = |s: &str| {
        if s.bytes().all(|b| b.is_ascii_hexdigit()) {
            u64::from_str_radix(s, 16).ok()
        } else {
            None
        }
    };
    Some((hex(seq)?, hex(first)?))
}

struct ParsedSegment {
    records: Vec<Record>,
    /// Length of the prefix made of whole, valid records.
    valid_len: u64,
    /// Why the bytes after `valid_len` were judged a torn tail (last segment only).
    torn: Option<String>,
    /// Only zeros follow `valid_len`: a preallocated segment's unused room (last segment only).
    zero_tail: bool,
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

/// Parses one segment. In the last segment a torn tail is reported in `torn`; everything else
/// that is not a whole valid record is `Corrupt`.
fn parse_segment(path: &Path, data: &[u8], is_last: bool) -> Result<ParsedSegment, WalError> {
    let mut records = Vec::new();
    let mut off = 0usize;
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let torn = |records: Vec<Record>, offset: usize, reason: String| {
        if is_last {
            Ok(ParsedSegment {
                records,
                valid_len: offset as u64,
                torn: Some(reason),
                zero_tail: false,
            })
        } else {
            Err(corrupt(offset, format!("{reason} (in a non-last segment)")))
        }
    };
    while off < data.len() {
        let remaining = data.len() - off;
        let (Some(len), Some(crc)) = (read_u32(data, off), read_u32(data, off + 4)) else {
            return torn(
                records,
                off,
                format!("partial record header ({remaining} bytes)"),
            );
        };
        let len = len as usize;
        if len < BODY_PREFIX_LEN {
            if is_last && all_zero(&data[off..]) {
                return Ok(ParsedSegment {
                    records,
                    valid_len: off as u64,
                    torn: None,
                    zero_tail: true,
                });
            }
            // No record has a length below 9, let alone 0: these are the zeros of room that a
            // write did not reach before the crash (the device persists an unsynced write's
            // sectors in any order, so later sectors of it may have landed), or a header cut
            // short.
            if is_last && (len == 0 || has_zero_sector(data, off, off + HEADER_LEN)) {
                return torn(
                    records,
                    off,
                    format!("unwritten or torn record header (length {len})"),
                );
            }
            return Err(corrupt(off, format!("invalid record length {len}")));
        }
        let end = off + HEADER_LEN + len;
        if end > data.len() {
            return torn(
                records,
                off,
                format!("record of {len} bytes extends past end of file ({remaining} bytes left)"),
            );
        }
        if len > MAX_BODY_LEN {
            return Err(corrupt(
                off,
                format!("record length {len} exceeds the maximum"),
            ));
        }
        let body = &data[off + HEADER_LEN..end];
        let mut h = crc32fast::Hasher::new();
        h.update(&data[off..off + 4]);
        h.update(body);
        let actual = h.finalize();
        if actual != crc {
            let reason = format!("crc mismatch (stored {crc:08x}, computed {actual:08x})");
            // A record cut short by a crash ends the file, or is followed by the zeros it did
            // not get to overwrite, or has a sector the device never wrote. A record cut short
            // is never followed by an acknowledged one: the fsync that acknowledged it covered
            // every byte before it.
            if all_zero(&data[end..]) || has_zero_sector(data, off, end) {
                return torn(records, off, reason);
            }
            return Err(corrupt(off, reason));
        }
        let kind = body[0];
        let mut index_bytes = [0u8; 8];
        index_bytes.copy_from_slice(&body[1..BODY_PREFIX_LEN]);
        records.push(Record {
            kind,
            index: u64::from_le_bytes(index_bytes),
            payload: body[BODY_PREFIX_LEN..].to_vec(),
        });
        off = end;
    }
    Ok(ParsedSegment {
        records,
        valid_len: off as u64,
        torn: None,
        zero_tail: false,
    })
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Smallest unit a disk writes whole; a write interrupted by power loss lands sector by sector.
const SECTOR: usize = 512;

/// Whether a whole, aligned sector overlapping `data[from..to]` holds only zeros: the sign of a
/// torn write (etcd's WAL uses the same test). A record whose payload holds 512 aligned zero
/// bytes and is damaged otherwise is also taken for torn: the price of starting after a power
/// loss instead of refusing to.
fn has_zero_sector(data: &[u8], from: usize, to: usize) -> bool {
    let to = to.min(data.len());
    let mut sector = from - from % SECTOR;
    while sector < to {
        let sector_end = (sector + SECTOR).min(data.len());
        if all_zero(&data[sector..sector_end]) {
            return true;
        }
        sector += SECTOR;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Wal>();
    }

    #[test]
    fn segment_names_round_trip() {
        let name = segment_name(0x1f, 0xabc);
        assert_eq!(name, "000000000000001f-0000000000000abc.wal");
        assert_eq!(parse_segment_name(&name), Some((0x1f, 0xabc)));
        assert_eq!(parse_segment_name("1-2.wal"), None);
        assert_eq!(
            parse_segment_name("000000000000001g-0000000000000abc.wal"),
            None
        );
        assert_eq!(
            parse_segment_name("+00000000000001f-0000000000000abc.wal"),
            None
        );
    }

    #[test]
    fn crc_covers_len_and_body() {
        let a = record_crc(9 + 3, 1, 7, b"abc");
        assert_ne!(a, record_crc(9 + 3, 2, 7, b"abc"));
        assert_ne!(a, record_crc(9 + 3, 1, 8, b"abc"));
        assert_ne!(a, record_crc(9 + 3, 1, 7, b"abd"));
        assert_ne!(a, record_crc(9 + 4, 1, 7, b"abc"));
    }
}

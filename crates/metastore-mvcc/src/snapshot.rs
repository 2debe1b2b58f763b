//! State-machine snapshots: the whole engine (every key space) at one applied index, as one
//! zstd-compressed file. This is how the memory engine survives restarts without replaying the
//! whole log: restart = latest snapshot + the raft WAL after it.
//!
//! File: `snap-<applied index, 16 hex>.snap` =
//! `MAGIC | zstd( (space u8, key_len u32, key, value_len u32, value)* ) | crc32(uncompressed) u32`.
//! Written to a temporary name, fsynced, renamed, and the directory fsynced: a crash leaves either
//! the old set of snapshots or the new one, never a torn file under the final name.

use crate::MvccError;
use bytes::Bytes;
use metastore_engine::{Engine, Space, WriteBatch};
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};

mod etcd;
mod etcd_import;

pub use etcd::{etcd_backend_status, EtcdBackendStatus};
pub use etcd_import::{
    import_etcd_backend, ImportOptions, ImportSummary, AUTH_ENABLED, AUTH_REVISION,
    AUTH_ROLE_PREFIX, AUTH_USER_PREFIX,
};

const MAGIC: &[u8; 8] = b"MSSNAP01";

fn io_err(path: &Path, e: impl std::fmt::Display) -> MvccError {
    MvccError::Engine(format!("snapshot {}: {e}", path.display()))
}

fn space_code(s: Space) -> u8 {
    match s {
        Space::Kv => 0,
        Space::Meta => 1,
    }
}

fn space_of(code: u8) -> Option<Space> {
    match code {
        0 => Some(Space::Kv),
        1 => Some(Space::Meta),
        _ => None,
    }
}

pub fn snapshot_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("snap-{index:016x}.snap"))
}

/// Snapshot files in `dir`, newest first, with their applied index.
pub fn list_snapshots(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let hex = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
            Some((u64::from_str_radix(hex, 16).ok()?, e.path()))
        })
        .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.0));
    out
}

/// Writes everything the engine holds as a snapshot taken at `index`; keeps the newest
/// `retention` snapshots and deletes older ones. The caller must keep writers out meanwhile
/// (the server uses [`SnapshotCapture`] instead, which lets writers go on).
pub fn write_snapshot(
    engine: &dyn Engine,
    dir: &Path,
    index: u64,
    level: i32,
    retention: usize,
) -> Result<PathBuf, MvccError> {
    capture(engine, None, None)?.write(engine, dir, index, level, retention)
}

/// Counts one reader of MVCC records (a snapshot capture, a hash) for as long as it lives:
/// physical compaction defers its deletes while any is counted.
pub(crate) struct ScanHold(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl ScanHold {
    pub(crate) fn new(count: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for ScanHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The state machine at one applied index, taken so that the file can be written while
/// writers go on. Taken between two applied entries: the small meta space (applied index,
/// revision, leases, alarms) is copied at once; MVCC records are immutable and keyed by
/// revision, so the records of the captured state are exactly those up to its revision, and
/// records of later entries sort after that bound and are skipped. The only thing that
/// removes records, physical compaction, waits while the capture is held (see
/// `Store::capture_snapshot`).
pub struct SnapshotCapture {
    meta: Vec<(Bytes, Bytes)>,
    /// Exclusive upper bound of the MVCC keys that belong to the capture (None: all).
    kv_end: Option<Vec<u8>>,
    /// Share of one core the write may use (1.0 = as fast as it goes).
    pace: f64,
    _hold: Option<ScanHold>,
}

/// Captures the engine's state as of now. `revision` bounds the MVCC records taken (None =
/// every record, for a quiesced engine).
pub(crate) fn capture(
    engine: &dyn Engine,
    revision: Option<i64>,
    hold: Option<ScanHold>,
) -> Result<SnapshotCapture, MvccError> {
    let mut meta = Vec::new();
    engine.scan(
        Space::Meta,
        (Bound::Unbounded, Bound::Unbounded),
        &mut |k, v| {
            meta.push((Bytes::copy_from_slice(k), v.clone()));
            true
        },
    )?;
    // MVCC keys start with the big-endian main revision: every key of a revision above
    // `revision` is at or after the 8 bytes of `revision + 1`.
    let kv_end = revision.map(|r| r.saturating_add(1).to_be_bytes().to_vec());
    Ok(SnapshotCapture {
        meta,
        kv_end,
        pace: 1.0,
        _hold: hold,
    })
}

/// Records written between two pacing pauses.
const PACE_CHUNK: usize = 2048;

impl SnapshotCapture {
    /// Lets the write use about `share` of one core (0 < share ≤ 1): it sleeps between
    /// chunks of records in proportion to the time it worked, so a snapshot of a large state
    /// never takes a whole core away from serving requests for its whole length.
    pub fn with_pace(mut self, share: f64) -> Self {
        if share.is_finite() && share > 0.0 {
            self.pace = share.min(1.0);
        }
        self
    }

    /// Writes the captured state as the snapshot of `index` (temp file, fsync, rename, dir
    /// fsync) and keeps the newest `retention` snapshots.
    pub fn write(
        self,
        engine: &dyn Engine,
        dir: &Path,
        index: u64,
        level: i32,
        retention: usize,
    ) -> Result<PathBuf, MvccError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let path = snapshot_path(dir, index);
        let tmp = path.with_extension("tmp");
        self.write_file(engine, &tmp, level)?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))?;
        for (_, old) in list_snapshots(dir).into_iter().skip(retention.max(1)) {
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!(file = %old.display(), error = %e, "cannot remove an old snapshot");
            }
        }
        Ok(path)
    }

    /// Writes the captured state to the file at `path` (created or truncated) and fsyncs it.
    pub fn write_file(self, engine: &dyn Engine, path: &Path, level: i32) -> Result<(), MvccError> {
        let tmp = path;
        let file = std::fs::File::create(tmp).map_err(|e| io_err(tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        out.write_all(MAGIC).map_err(|e| io_err(tmp, e))?;
        let mut crc = crc32fast::Hasher::new();
        let mut enc = zstd::Encoder::new(out, level).map_err(|e| io_err(tmp, e))?;
        let mut failure = None;
        let mut put = |space: Space, k: &[u8], v: &[u8]| {
            let mut rec = Vec::with_capacity(9 + k.len() + v.len());
            rec.push(space_code(space));
            rec.extend_from_slice(&(k.len() as u32).to_le_bytes());
            rec.extend_from_slice(k);
            rec.extend_from_slice(&(v.len() as u32).to_le_bytes());
            rec.extend_from_slice(v);
            crc.update(&rec);
            match enc.write_all(&rec) {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        };
        let end = match &self.kv_end {
            Some(e) => Bound::Excluded(e.as_slice()),
            None => Bound::Unbounded,
        };
        let pause_per_busy = 1.0 / self.pace - 1.0;
        let mut in_chunk = 0usize;
        let mut chunk_started = std::time::Instant::now();
        engine.scan_bulk(Space::Kv, (Bound::Unbounded, end), &mut |k, v| {
            if pause_per_busy > 0.0 {
                in_chunk += 1;
                if in_chunk == PACE_CHUNK {
                    std::thread::sleep(chunk_started.elapsed().mul_f64(pause_per_busy));
                    in_chunk = 0;
                    chunk_started = std::time::Instant::now();
                }
            }
            put(Space::Kv, k, v)
        })?;
        for (k, v) in &self.meta {
            if !put(Space::Meta, k, v) {
                break;
            }
        }
        if let Some(e) = failure {
            return Err(io_err(tmp, e));
        }
        // The engine is no longer read: compaction may go on while the file is finished.
        drop(self);
        let mut out = enc.finish().map_err(|e| io_err(tmp, e))?;
        out.write_all(&crc.finalize().to_le_bytes())
            .map_err(|e| io_err(tmp, e))?;
        let file = out.into_inner().map_err(|e| io_err(tmp, e.error()))?;
        file.sync_all().map_err(|e| io_err(tmp, e))?;
        Ok(())
    }
}

/// Largest key or value a snapshot record may hold: far above any request limit, low enough
/// that a damaged length cannot make the loader allocate without bound.
const MAX_RECORD_PART: usize = 256 * 1024 * 1024;

/// Records or bytes written to the engine in one batch while loading.
const LOAD_BATCH_RECORDS: usize = 10_000;
const LOAD_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Loads a snapshot into an empty engine, streaming: memory stays bounded by one write batch
/// whatever the snapshot's size. A damaged file is an error naming it: a snapshot is never
/// silently skipped. The checksum covers the whole file and is only known at its end, so a
/// damaged file may have loaded part of its records into the engine before the error: callers
/// that must not see that verify the file first (a received snapshot's transfer checksum) or
/// discard the engine on error (a restart).
pub fn load_snapshot(engine: &dyn Engine, path: &Path) -> Result<(), MvccError> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let body_len = len
        .checked_sub((MAGIC.len() + 4) as u64)
        .ok_or_else(|| io_err(path, "not a MetaStore snapshot"))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic).map_err(|e| io_err(path, e))?;
    if &magic != MAGIC {
        return Err(io_err(path, "not a MetaStore snapshot"));
    }
    let mut decoder =
        zstd::Decoder::with_buffer(std::io::BufReader::new((&mut reader).take(body_len)))
            .map_err(|e| io_err(path, format!("decompression failed: {e}")))?;
    let mut crc = crc32fast::Hasher::new();
    let mut batch = WriteBatch::new();
    let mut batch_bytes = 0usize;
    let damaged = |e: std::io::Error| io_err(path, format!("damaged or truncated: {e}"));
    loop {
        let mut head = [0u8; 5];
        // A clean end of the stream may only fall between records.
        match decoder.read(&mut head[..1]) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(damaged(e)),
        }
        decoder.read_exact(&mut head[1..]).map_err(damaged)?;
        let space = space_of(head[0]).ok_or_else(|| io_err(path, "unknown key space"))?;
        let key = read_part(
            &mut decoder,
            u32::from_le_bytes([head[1], head[2], head[3], head[4]]),
        )
        .map_err(damaged)?;
        let mut vlen = [0u8; 4];
        decoder.read_exact(&mut vlen).map_err(damaged)?;
        let value = read_part(&mut decoder, u32::from_le_bytes(vlen)).map_err(damaged)?;
        crc.update(&head);
        crc.update(&key);
        crc.update(&vlen);
        crc.update(&value);
        batch_bytes += key.len() + value.len();
        batch.put(space, key, value);
        if batch.len() >= LOAD_BATCH_RECORDS || batch_bytes >= LOAD_BATCH_BYTES {
            engine.write(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    drop(decoder);
    let mut tail = [0u8; 4];
    reader.read_exact(&mut tail).map_err(damaged)?;
    if crc.finalize() != u32::from_le_bytes(tail) {
        return Err(io_err(path, "checksum mismatch"));
    }
    engine.write(batch)?;
    Ok(())
}

fn read_part(from: &mut impl Read, len: u32) -> std::io::Result<Vec<u8>> {
    let len = len as usize;
    if len > MAX_RECORD_PART {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a record part of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    from.read_exact(&mut buf)?;
    Ok(buf)
}

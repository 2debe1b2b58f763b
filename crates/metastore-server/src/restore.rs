//! `metastore snapshot restore`: a data dir for a new cluster, built from a snapshot file that
//! `etcdctl snapshot save` wrote against etcd or MetaStore, as `etcdutl snapshot restore` builds
//! one for etcd.
//!
//! The data dir holds the state machine the file describes at raft index 0 and this member's
//! identity in the new cluster; its raft log is empty. The first start then bootstraps the new
//! cluster's log (one `AddNode` per member) on top of the restored state, exactly as a new
//! member's first start does, so nothing here writes raft's WAL.

use crate::config::{Config, ConfigError, Flags, StorageKind};
use crate::identity::{new_cluster_identity, write_identity};
use crate::ServerError;
use metastore_engine::Engine;
use metastore_memory::MemoryEngine;
use metastore_mvcc::snapshot::{import_etcd_backend, write_snapshot, ImportOptions, ImportSummary};
use metastore_mvcc::{MvccError, Store};
use metastore_rocksdb::RocksDbEngine;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// etcdutl's options beside the server's flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    pub skip_hash_check: bool,
    pub bump_revision: u64,
    pub mark_compacted: bool,
}

/// Messages as etcdutl words them where it has one.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("couldn't find local name {0:?} in the initial cluster configuration")]
    NameNotInCluster(String),
    #[error("--initial-cluster has {name}={cluster_urls} but missing from --initial-advertise-peer-urls={advertised}")]
    PeerUrlsDiffer {
        name: String,
        cluster_urls: String,
        advertised: String,
    },
    #[error("data-dir {0:?} not empty or could not be read")]
    DataDirNotEmpty(String),
    #[error("--mark-compacted required if --bump-revision > 0")]
    BumpWithoutMarkCompacted,
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    #[error("expected sha256 {expected}, got {got}")]
    HashMismatch { expected: String, got: String },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] MvccError),
    #[error(transparent)]
    Engine(#[from] metastore_engine::EngineError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// `snapshot save` appends the SHA-256 of the database to the file; bbolt files are a whole
/// number of pages, so a length 32 past a multiple of 512 means the hash is there (etcdutl's
/// `hasChecksum`).
fn verify_hash(file: &Path, skip: bool) -> Result<(), RestoreError> {
    let io = |e| RestoreError::Io(file.to_path_buf(), e);
    let mut f = std::fs::File::open(file).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let has_hash = len % 512 == 32;
    if skip {
        return Ok(());
    }
    if !has_hash {
        return Err(RestoreError::MissingHash);
    }
    let mut hasher = Sha256::new();
    let mut left = len - 32;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n]).map_err(io)?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut expected = [0u8; 32];
    f.read_exact(&mut expected).map_err(io)?;
    let got = hasher.finalize();
    if got.as_slice() != expected {
        return Err(RestoreError::HashMismatch {
            expected: hex(&expected),
            got: hex(&got),
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dir_is_empty_or_absent(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Restores `file` into the data dir the flags name; returns what to print.
pub fn snapshot_restore(
    file: &Path,
    flags: Flags,
    options: RestoreOptions,
) -> Result<String, RestoreError> {
    let cfg = Config::load(flags)?;
    if options.bump_revision > 0 && !options.mark_compacted {
        return Err(RestoreError::BumpWithoutMarkCompacted);
    }
    let initial = cfg.initial_members()?;
    let identity = new_cluster_identity(&cfg, &initial);
    let Some(me) = identity.members.iter().find(|m| m.id == identity.member_id) else {
        return Err(RestoreError::NameNotInCluster(cfg.name.clone()));
    };
    let (mut listed, mut advertised) = (me.peer_urls.clone(), cfg.peer_urls());
    listed.sort();
    advertised.sort();
    if listed != advertised {
        return Err(RestoreError::PeerUrlsDiffer {
            name: cfg.name.clone(),
            cluster_urls: me.peer_urls.join(","),
            advertised: cfg.initial_advertise_peer_urls.clone(),
        });
    }
    let data_dir = PathBuf::from(&cfg.data_dir);
    if !dir_is_empty_or_absent(&data_dir) {
        return Err(RestoreError::DataDirNotEmpty(cfg.data_dir.clone()));
    }
    verify_hash(file, options.skip_hash_check)?;

    let member_dir = data_dir.join("member");
    let result = restore_into(file, &cfg, &member_dir, options);
    if result.is_err() {
        // Nothing of a failed restore may look like a data dir to a later start.
        let _ = std::fs::remove_dir_all(&member_dir);
    }
    let summary = result?;
    write_identity(&member_dir, &identity)?;

    let mut text = format!(
        "restored snapshot {} into data dir {}: revision {}, {} records, {} leases{}\n",
        file.display(),
        data_dir.display(),
        summary.revision,
        summary.records,
        summary.leases,
        if summary.compact_revision > 0 {
            format!(", compacted at {}", summary.compact_revision)
        } else {
            String::new()
        },
    );
    text += &format!(
        "member {} ({:x}) of a new cluster {:x} with {} member(s); start each member with the same flags\n",
        cfg.name,
        identity.member_id,
        identity.cluster_id,
        identity.members.len()
    );
    if summary.users > 0 || summary.roles > 0 || summary.auth_enabled {
        text += &format!(
            "warning: the snapshot holds {} user(s) and {} role(s){}; this version of MetaStore \
             keeps them (a snapshot saved from it gives them back to etcd) but does not check \
             credentials yet\n",
            summary.users,
            summary.roles,
            if summary.auth_enabled {
                " with auth enabled"
            } else {
                ""
            }
        );
    }
    Ok(text)
}

fn restore_into(
    file: &Path,
    cfg: &Config,
    member_dir: &Path,
    options: RestoreOptions,
) -> Result<ImportSummary, RestoreError> {
    std::fs::create_dir_all(member_dir)
        .map_err(|e| RestoreError::Io(member_dir.to_path_buf(), e))?;
    let import = ImportOptions {
        bump_revision: i64::try_from(options.bump_revision).unwrap_or(i64::MAX),
        mark_compacted: options.mark_compacted,
    };
    match cfg.storage {
        StorageKind::Memory => {
            let engine = Arc::new(MemoryEngine::new());
            let summary = import_etcd_backend(engine.as_ref(), file, import)?;
            // Opening the store checks every record and finishes the compaction the file
            // names, so the snapshot written holds only what is served.
            drop(Store::open(engine.clone())?);
            write_snapshot(
                engine.as_ref(),
                &member_dir.join("snap"),
                0,
                1,
                cfg.snapshot_retention,
            )?;
            Ok(summary)
        }
        StorageKind::Rocksdb => {
            let engine = Arc::new(RocksDbEngine::open(
                member_dir.join("rocksdb"),
                &cfg.rocksdb,
            )?);
            let summary = import_etcd_backend(engine.as_ref(), file, import)?;
            drop(Store::open(engine.clone())?);
            engine.persist()?;
            Ok(summary)
        }
    }
}

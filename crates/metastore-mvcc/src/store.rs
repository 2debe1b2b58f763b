use crate::keyindex::{IndexRev, KeyIndex, KeyRange, Revision};
use crate::lease::{lease_meta_key, LeaseInfo, Lessor, LEASE_META_PREFIX};
use crate::watch::{History, StreamReceiver, WatchHub, WatchSpec};
use crate::MvccError;
use bytes::Bytes;
use metastore_engine::{Engine, Space, WriteBatch, WriteOp};
use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
};
use metastore_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionRequest, CompactionResponse,
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use metastore_proto::etcdserverpb::{
    LeaseCheckpointRequest, LeaseCheckpointResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse,
};
use metastore_proto::internal::{command::Op, Command, LeaseRecord};
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use parking_lot::Mutex;
use prost::Message;
use std::cmp::Ordering as CmpOrdering;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

mod auth;
mod cluster_version;
mod compaction;
mod hash;
mod install;
mod members;
mod read;
mod rebuild;
mod txn;
pub use auth::is_auth_op;
pub use cluster_version::ClusterVersion;
pub use hash::KvHash;
pub use install::{interrupted_install, replace_engine_contents};

type Result<T> = std::result::Result<T, MvccError>;

pub(crate) const META_APPLIED: &[u8] = b"applied_index";
pub(crate) const META_REVISION: &[u8] = b"revision";
pub(crate) const META_COMPACT: &[u8] = b"compact_revision";

/// The result of one applied command. Headers carry only the revision; the API layer adds the
/// cluster/member/term fields.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseCheckpoint(LeaseCheckpointResponse),
    Alarm(AlarmResponse),
    /// The cluster version after a `ClusterVersionSet` (never lower than before).
    ClusterVersion(Option<ClusterVersion>),
    /// A member's published attributes were stored.
    MemberAttrSet,
    /// The member table changed.
    MemberChange,
    /// An auth store change was applied.
    Auth,
    /// `Authenticate` applied: the simple token every member now knows.
    Authenticated(String),
}

const ALARM_META_PREFIX: &[u8] = b"alarm/";

/// About how many bytes of events one catch-up read for watchers holds at once.
const HISTORY_READ_BYTES: usize = 4 * 1024 * 1024;

fn alarm_meta_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = ALARM_META_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

pub struct Store<E: Engine> {
    engine: Arc<E>,
    index: KeyIndex,
    /// The revision readers see: published only after the engine holds everything up to it.
    current_rev: AtomicI64,
    compact_rev: AtomicI64,
    applied_index: AtomicU64,
    /// Serialises writers. The apply loop is the only writer in the server; this keeps the
    /// single-writer invariant true for tests and tools too. Readers never take it.
    writer: Mutex<()>,
    hub: WatchHub,
    leases: Lessor,
    /// Raised alarms (member, alarm type), replicated like etcd's.
    alarms: parking_lot::RwLock<BTreeSet<(u64, i32)>>,
    /// Set by the leader through raft; see `cluster_version`.
    cluster_version: parking_lot::RwLock<Option<ClusterVersion>>,
    /// The replicated member table; see `members`.
    members: members::MemberTable,
    /// Number of snapshot captures or hashes reading MVCC records: while any is, physical
    /// compaction defers its deletes.
    snapshot_scan: Arc<std::sync::atomic::AtomicUsize>,
    /// MVCC records compaction dropped from the index while a capture was reading the engine;
    /// deleted by the next write once the capture is done.
    deferred_deletes: Mutex<Vec<Bytes>>,
    /// Readers hold it shared; installing a snapshot from the leader holds it exclusively, so
    /// that no read ever sees the half-replaced state.
    install_gate: parking_lot::RwLock<()>,
    /// Most bytes of key-values a Txn that writes may answer from its ranges (the member's
    /// `--max-response-bytes`); see `txn_range`.
    apply_response_limit: std::sync::atomic::AtomicUsize,
    /// Physical compaction in progress; see `compaction`.
    compaction: compaction::Compaction,
    /// Users, roles and tokens; see `crate::auth`.
    auth: crate::auth::AuthStore,
}

/// The engine key of a record. Allocated to its exact length: `Bytes::from` a `Vec` with
/// spare room allocates a second, shared header (24 B more per record kept).
fn rev_key(rev: Revision, tombstone: bool) -> Bytes {
    let mut k = Vec::with_capacity(16 + usize::from(tombstone));
    k.extend_from_slice(&rev.main.to_be_bytes());
    k.extend_from_slice(&rev.sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k.into()
}

pub(crate) fn parse_rev_key(k: &[u8]) -> Option<(Revision, bool)> {
    if k.len() != 16 && !(k.len() == 17 && k[16] == b't') {
        return None;
    }
    let main = i64::from_be_bytes(k[0..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[8..16].try_into().ok()?);
    Some((Revision { main, sub }, k.len() == 17))
}

fn read_meta_i64(engine: &dyn Engine, key: &[u8]) -> Result<Option<i64>> {
    match engine.get(Space::Meta, key)? {
        None => Ok(None),
        Some(v) => {
            let arr: [u8; 8] = v[..].try_into().map_err(|_| {
                MvccError::Corrupt(0, format!("meta key {key:?} has {} bytes", v.len()))
            })?;
            Ok(Some(i64::from_be_bytes(arr)))
        }
    }
}

/// A record as `KeyValue::encode_to_vec` writes it, from borrowed key and value, in a buffer
/// of exactly its length (see [`rev_key`]: the engine keeps it as it is).
fn encode_record(
    key: &[u8],
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    value: &[u8],
    lease: i64,
) -> Vec<u8> {
    use prost::encoding::{
        encode_key, encode_varint, encoded_len_varint, int64, key_len, WireType,
    };
    let bytes_len = |tag, data: &[u8]| {
        if data.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(data.len() as u64) + data.len()
        }
    };
    let int_len = |tag, v: i64| {
        if v == 0 {
            0
        } else {
            int64::encoded_len(tag, &v)
        }
    };
    let len = bytes_len(1, key)
        + int_len(2, create_revision)
        + int_len(3, mod_revision)
        + int_len(4, version)
        + bytes_len(5, value)
        + int_len(6, lease);
    let mut buf = Vec::with_capacity(len);
    fn bytes_field(tag: u32, data: &[u8], buf: &mut Vec<u8>) {
        if !data.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(data.len() as u64, buf);
            buf.extend_from_slice(data);
        }
    }
    bytes_field(1, key, &mut buf);
    for (tag, v) in [(2, create_revision), (3, mod_revision), (4, version)] {
        if v != 0 {
            int64::encode(tag, &v, &mut buf);
        }
    }
    bytes_field(5, value, &mut buf);
    if lease != 0 {
        int64::encode(6, &lease, &mut buf);
    }
    debug_assert_eq!(buf.len(), buf.capacity());
    buf
}

/// Records a range loads from the engine at a time: enough for a batched lookup to pay off,
/// few enough that a range refused for its size has not loaded much past the limit.
const LOAD_CHUNK: usize = 32;

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

impl<E: Engine> Store<E> {
    /// Opens the store over an engine, rebuilding the key index from what the engine holds.
    pub fn open(engine: Arc<E>) -> Result<Self> {
        if let Some(index) = install::interrupted_install(engine.as_ref())? {
            return Err(MvccError::InstallInterrupted(index));
        }
        let index = KeyIndex::new();
        let max_rev = rebuild::rebuild_index(engine.as_ref(), &index)?;
        let revision = read_meta_i64(engine.as_ref(), META_REVISION)?
            .unwrap_or(1)
            .max(max_rev);
        let compact = read_meta_i64(engine.as_ref(), META_COMPACT)?.unwrap_or(-1);
        let applied = read_meta_i64(engine.as_ref(), META_APPLIED)?.unwrap_or(0) as u64;
        let cluster_version = cluster_version::load(engine.as_ref(), ClusterVersion::this_build())?;
        let members = members::MemberTable::load(engine.as_ref())?;
        let store = Self {
            engine,
            index,
            current_rev: AtomicI64::new(revision),
            compact_rev: AtomicI64::new(compact),
            applied_index: AtomicU64::new(applied),
            writer: Mutex::new(()),
            hub: WatchHub::new(revision),
            leases: Lessor::default(),
            alarms: parking_lot::RwLock::new(BTreeSet::new()),
            cluster_version: parking_lot::RwLock::new(cluster_version),
            members,
            snapshot_scan: Arc::default(),
            deferred_deletes: Mutex::new(Vec::new()),
            install_gate: parking_lot::RwLock::new(()),
            apply_response_limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
            compaction: Default::default(),
            auth: Default::default(),
        };
        store.auth.reload(store.engine.as_ref())?;
        store.load_alarms()?;
        if compact >= 0 {
            // A crash between a compaction's logical and physical halves leaves superseded
            // records behind: finish the job.
            store.physical_compaction(compact)?;
        }
        store.load_leases()?;
        Ok(store)
    }

    fn load_alarms(&self) -> Result<()> {
        let mut end = ALARM_META_PREFIX.to_vec();
        end.push(0xff);
        let mut alarms = self.alarms.write();
        self.engine.scan(
            Space::Meta,
            (
                Bound::Included(ALARM_META_PREFIX),
                Bound::Excluded(&end[..]),
            ),
            &mut |k, _| {
                let rest = &k[ALARM_META_PREFIX.len()..];
                if rest.len() == 12 {
                    let member = u64::from_be_bytes(rest[..8].try_into().unwrap_or_default());
                    let alarm = i32::from_be_bytes(rest[8..].try_into().unwrap_or_default());
                    alarms.insert((member, alarm));
                }
                true
            },
        )?;
        Ok(())
    }

    /// Raised alarms, as `Maintenance.Alarm(GET)` lists them.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.alarms
            .read()
            .iter()
            .map(|(member_id, alarm)| AlarmMember {
                member_id: *member_id,
                alarm: *alarm,
            })
            .collect()
    }

    /// Whether the NOSPACE alarm is raised: writes that add data are refused until it is
    /// disarmed, as etcd's capped applier does.
    pub fn is_space_capped(&self) -> bool {
        self.alarms
            .read()
            .iter()
            .any(|(_, a)| *a == AlarmType::Nospace as i32)
    }

    fn load_leases(&self) -> Result<()> {
        let mut records = Vec::new();
        let mut end = LEASE_META_PREFIX.to_vec();
        end.push(0xff);
        self.engine.scan(
            Space::Meta,
            (
                Bound::Included(LEASE_META_PREFIX),
                Bound::Excluded(&end[..]),
            ),
            &mut |_, v| {
                records.push(v.clone());
                true
            },
        )?;
        for raw in records {
            let rec = LeaseRecord::decode(raw)
                .map_err(|e| MvccError::Corrupt(0, format!("lease record: {e}")))?;
            self.leases.grant(rec.id, rec.ttl, rec.remaining_ttl);
        }
        // The index carries each live key's lease: reading every record for it was a random
        // engine read per key (most of a 10M-key RocksDB restart).
        let current = self.current_revision();
        self.index
            .visit(&KeyRange::new(&[0], &[0]), current, &mut |key, r| {
                if r.lease != 0 {
                    self.leases.attach(r.lease, key);
                }
                true
            });
        Ok(())
    }

    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    /// The revision of the last applied write.
    pub fn current_revision(&self) -> i64 {
        self.current_rev.load(Ordering::Acquire)
    }

    /// The revision of the last compaction (-1 when never compacted).
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev.load(Ordering::Acquire)
    }

    /// The last raft index whose commands are reflected in the store.
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::Acquire)
    }

    /// Number of keys with history in the index.
    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    /// A serializable read at the current (or requested) revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        self.range_bounded(req, usize::MAX)
    }

    /// `range`, refused with `ResponseTooLarge` as soon as the key-values it has loaded pass
    /// `max_bytes`, so that a range over millions of keys never holds more than that.
    /// Bounds the answers of the ranges inside Txns that write (applied, not read), as
    /// `range_bounded` bounds reads.
    pub fn set_apply_response_limit(&self, max_bytes: usize) {
        self.apply_response_limit
            .store(max_bytes, Ordering::Relaxed);
    }

    pub fn range_bounded(&self, req: &RangeRequest, max_bytes: usize) -> Result<RangeResponse> {
        let _gate = self.install_gate.read();
        at_current(req.revision <= 0, || {
            self.range_in_bounded(req, &View::at(self.current_revision()), max_bytes, &mut 0)
        })
    }

    // ---- leases (read side) --------------------------------------------------------------------

    /// Users, roles, whether auth is on, and this member's simple tokens.
    pub fn auth(&self) -> &crate::auth::AuthStore {
        &self.auth
    }

    pub fn lease(&self, id: i64, with_keys: bool) -> Option<LeaseInfo> {
        let _gate = self.install_gate.read();
        self.leases.get(id, with_keys)
    }

    pub fn leases(&self) -> Vec<LeaseInfo> {
        let _gate = self.install_gate.read();
        self.leases.list()
    }

    // ---- watch ----------------------------------------------------------------------------------

    pub fn watch_hub(&self) -> &WatchHub {
        &self.hub
    }

    /// Opens a watch stream on this store.
    pub fn open_watch_stream(&self) -> (u64, StreamReceiver) {
        self.hub.open_stream()
    }

    /// Creates a watcher on a stream; returns its id, or None if it was refused (the refusal
    /// is sent on the stream).
    pub fn watch(&self, stream: u64, spec: WatchSpec) -> Option<i64> {
        self.hub.watch(stream, spec, self.compact_revision())
    }

    /// Starts the loop that brings unsynced watchers up to date from history. It ends when
    /// the store is dropped.
    pub fn spawn_watch_sync(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("watch-sync".into())
            .spawn(move || loop {
                let Some(store) = weak.upgrade() else { return };
                let caught_up = store.hub.sync_round(
                    &|| store.compact_revision(),
                    &|from, to| store.history(from, to).ok(),
                    std::time::Duration::from_millis(100),
                );
                drop(store);
                if !caught_up {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            })
    }

    /// Every event with a revision in `from..=to`, in order, each with its previous value;
    /// stops after the revision that brings the values read past `HISTORY_READ_BYTES`
    /// (`History::to` says where), so a catch-up round holds a bounded amount in memory.
    fn history(&self, from: i64, to: i64) -> Result<History> {
        let _gate = self.install_gate.read();
        let lo = rev_key(Revision { main: from, sub: 0 }, false);
        let hi = rev_key(
            Revision {
                main: to.saturating_add(1),
                sub: 0,
            },
            false,
        );
        let mut raw = Vec::new();
        let mut bytes = 0;
        let mut read_to = to;
        let mut last_main = None;
        self.engine.scan(
            Space::Kv,
            (Bound::Included(&lo[..]), Bound::Excluded(&hi[..])),
            &mut |k, v| {
                let main = parse_rev_key(k).map(|(r, _)| r.main);
                if bytes >= HISTORY_READ_BYTES && main != last_main {
                    // A revision is never cut in two: stop between revisions.
                    read_to = last_main.unwrap_or(from - 1);
                    return false;
                }
                last_main = main;
                // Twice: the event may carry its previous value too.
                bytes += 2 * v.len();
                raw.push((k.len() == 17, v.clone()));
                true
            },
        )?;
        let mut events = Vec::with_capacity(raw.len());
        for (tombstone, v) in raw {
            let kv = KeyValue::decode(v).map_err(|e| MvccError::Corrupt(from, e.to_string()))?;
            let is_create = !tombstone && kv.create_revision == kv.mod_revision;
            let prev_kv = if is_create {
                None
            } else {
                self.index
                    .get(&kv.key, kv.mod_revision - 1)
                    .and_then(|r| self.load(r.rev, &View::at(to)).ok())
            };
            let kind = if tombstone {
                EventType::Delete
            } else {
                EventType::Put
            };
            events.push(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        Ok(History {
            events,
            to: read_to,
        })
    }

    /// Applies the commands of one committed raft entry at `raft_index`. Entries at or below the
    /// applied index (already reflected in a persistent engine) are skipped and return `None`.
    /// An `Err` means the engine failed: the store must not be written again.
    pub fn apply(
        &self,
        raft_index: u64,
        commands: &[Command],
    ) -> Result<Option<Vec<Result<ApplyResponse>>>> {
        let mut all = Vec::with_capacity(commands.len());
        let applied = self.apply_in_parts(raft_index, commands, usize::MAX, &mut |part| {
            all.extend(part)
        })?;
        Ok(applied.then_some(all))
    }

    /// Like [`Store::apply`], but hands the results to `deliver` in order, in parts of about
    /// `part_len` commands, each as soon as its writes are visible to readers: the requests of
    /// a large entry are answered while the rest of it is still being applied, so the answers
    /// and the next requests run beside the apply instead of after it. Returns false for an
    /// entry that was already applied.
    ///
    /// An entry is split only over an engine that does not persist writes on its own (the
    /// memory engine, whose durable state is a snapshot captured between entries): a persistent
    /// engine could flush half an entry beside an applied index that does not cover it. An
    /// entry with a compaction is not split either, since its physical half runs at the end.
    pub fn apply_in_parts(
        &self,
        raft_index: u64,
        commands: &[Command],
        part_len: usize,
        deliver: &mut dyn FnMut(Vec<Result<ApplyResponse>>),
    ) -> Result<bool> {
        let _writer = self.writer.lock();
        if raft_index != 0 && raft_index <= self.applied_index() {
            return Ok(false);
        }
        self.flush_deferred_deletes()?;
        let part_len = if self.engine.is_persistent() {
            usize::MAX
        } else {
            part_len.max(1)
        };
        let mut ctx = WriteCtx {
            rev: self.current_revision(),
            main: 0,
            sub: 0,
            batch: WriteBatch::new(),
            overlay: Overlay::new(),
            compact: None,
            events: self.hub.has_watchers().then(Vec::new),
            response_bytes: 0,
            response_over: None,
        };
        let mut results = Vec::with_capacity(commands.len().min(part_len));
        for (i, cmd) in commands.iter().enumerate() {
            ctx.begin();
            // Outer error: the whole entry fails (the member stops); inner: this command's.
            let result = if cmd.auth.is_some() && self.auth.is_enabled() {
                match self.check_command_auth(cmd) {
                    Ok(()) => self.apply_command(cmd, raft_index, &mut ctx)?,
                    Err(e) => Err(e),
                }
            } else {
                self.apply_command(cmd, raft_index, &mut ctx)?
            };
            ctx.end();
            results.push(result);
            let last = i + 1 == commands.len();
            if results.len() >= part_len && !last && ctx.compact.is_none() {
                self.publish_part(&mut ctx)?;
                deliver(std::mem::replace(
                    &mut results,
                    Vec::with_capacity(part_len.min(commands.len() - i - 1)),
                ));
            }
        }
        let WriteCtx {
            rev,
            mut batch,
            compact,
            events,
            ..
        } = ctx;
        batch.put(Space::Meta, META_REVISION, rev.to_be_bytes().to_vec());
        if raft_index != 0 {
            batch.put(Space::Meta, META_APPLIED, raft_index.to_be_bytes().to_vec());
        }
        if let Some(c) = compact {
            batch.put(Space::Meta, META_COMPACT, c.to_be_bytes().to_vec());
        }
        let started = std::time::Instant::now();
        self.engine.write(batch)?;
        // etcd's backend commit: one engine batch per applied entry.
        metrics::histogram!("etcd_disk_backend_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        self.current_rev.store(rev, Ordering::Release);
        if raft_index != 0 {
            self.applied_index.store(raft_index, Ordering::Release);
        }
        if let Some(c) = compact {
            // Only now that the revision is published: a reader at the (old) current
            // revision must never see records it can still read vanish.
            self.physical_compaction(c)?;
        }
        self.hub.dispatch(rev, events.as_deref());
        deliver(results);
        Ok(true)
    }

    /// Applies one command. The outer error fails the whole entry (and stops the member); the
    /// inner one is this command's answer.
    fn apply_command(
        &self,
        cmd: &Command,
        raft_index: u64,
        ctx: &mut WriteCtx,
    ) -> Result<Result<ApplyResponse>> {
        Ok(match &cmd.op {
            Some(Op::Put(_)) | Some(Op::Txn(_)) if self.is_space_capped() && adds_data(cmd) => {
                Err(MvccError::NoSpace)
            }
            Some(Op::Put(p)) => self.check_put(p, ctx.rev, false).and_then(|()| {
                self.put(p, ctx).map(|prev_kv| {
                    ApplyResponse::Put(PutResponse {
                        header: header(ctx.main),
                        prev_kv,
                    })
                })
            }),
            Some(Op::DeleteRange(d)) => self.delete_range(d, ctx).map(|(deleted, prev_kvs)| {
                ApplyResponse::DeleteRange(DeleteRangeResponse {
                    header: header(ctx.rev_after()),
                    deleted,
                    prev_kvs,
                })
            }),
            // A Txn whose ranges passed the response limit has applied all the same: only
            // this member's answer is the error.
            Some(Op::Txn(t)) => self
                .txn(t, ctx)
                .and_then(|resp| match ctx.response_over.take() {
                    Some(too_large) => Err(too_large),
                    None => Ok(ApplyResponse::Txn(resp)),
                }),
            Some(Op::Compaction(c)) => self.compact(c, ctx).map(ApplyResponse::Compaction),
            Some(Op::LeaseGrant(g)) => self.lease_grant(g, ctx).map(ApplyResponse::LeaseGrant),
            Some(Op::LeaseRevoke(r)) => self.lease_revoke(r, ctx).map(ApplyResponse::LeaseRevoke),
            Some(Op::LeaseCheckpoint(c)) => self
                .lease_checkpoint(c, ctx)
                .map(ApplyResponse::LeaseCheckpoint),
            Some(Op::Alarm(a)) => Ok(ApplyResponse::Alarm(self.alarm(a, ctx))),
            // Fails the whole entry: a member older than the cluster stops here.
            Some(Op::ClusterVersionSet(c)) => Ok(ApplyResponse::ClusterVersion(
                self.set_cluster_version(&c.version, ctx)?,
            )),
            Some(
                op @ (Op::AuthEnable(_)
                | Op::AuthDisable(_)
                | Op::AuthUserAdd(_)
                | Op::AuthUserDelete(_)
                | Op::AuthUserChangePassword(_)
                | Op::AuthUserGrantRole(_)
                | Op::AuthUserRevokeRole(_)
                | Op::AuthRoleAdd(_)
                | Op::AuthRoleDelete(_)
                | Op::AuthRoleGrantPermission(_)
                | Op::AuthRoleRevokePermission(_)
                | Op::Authenticate(_)),
            ) => self.apply_auth(op, raft_index, ctx),
            Some(Op::MemberAttrSet(m)) => {
                self.set_member_attrs(m, ctx);
                Ok(ApplyResponse::MemberAttrSet)
            }
            Some(Op::MemberChange(c)) => {
                self.apply_member_change(c, ctx);
                Ok(ApplyResponse::MemberChange)
            }
            // An operation this build does not know (prost drops unknown oneof fields): a
            // newer member proposed it. Skipping it would let this member diverge from
            // the ones that applied it, so the whole entry fails and the member stops.
            None => return Err(MvccError::UnknownCommand(raft_index)),
        })
    }

    /// Makes the writes of the commands applied so far in an entry visible, as the end of an
    /// entry does, but without recording the entry as applied.
    fn publish_part(&self, ctx: &mut WriteCtx) -> Result<()> {
        let mut batch = std::mem::take(&mut ctx.batch);
        batch.put(Space::Meta, META_REVISION, ctx.rev.to_be_bytes().to_vec());
        self.engine.write(batch)?;
        // The records are in the engine now; later commands read them from there.
        ctx.overlay.clear();
        self.current_rev.store(ctx.rev, Ordering::Release);
        let events = std::mem::replace(&mut ctx.events, self.hub.has_watchers().then(Vec::new));
        self.hub.dispatch(ctx.rev, events.as_deref());
        Ok(())
    }

    /// Captures the state machine as of now for a snapshot file written by another thread
    /// while applying goes on. Call it from the writer (the apply loop) between entries, one
    /// capture at a time. Until the capture has read the engine, physical compaction leaves
    /// records in place (the index forgets them at once; the engine deletes follow later).
    pub fn capture_snapshot(&self) -> Result<crate::snapshot::SnapshotCapture> {
        let _writer = self.writer.lock();
        // Deletes deferred during the previous capture go first: the new capture must hold
        // exactly the applied state.
        self.flush_deferred_deletes()?;
        let hold = crate::snapshot::ScanHold::new(self.snapshot_scan.clone());
        crate::snapshot::capture(
            self.engine.as_ref(),
            Some(self.current_rev.load(Ordering::Acquire)),
            Some(hold),
        )
    }

    /// Deletes the records compaction deferred, unless a capture is still reading them.
    /// Callers hold the writer lock.
    fn flush_deferred_deletes(&self) -> Result<()> {
        if self.snapshot_scan.load(Ordering::Acquire) > 0 {
            return Ok(());
        }
        let keys = std::mem::take(&mut *self.deferred_deletes.lock());
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for k in keys {
            batch.delete(Space::Kv, k);
        }
        self.engine.write(batch)?;
        Ok(())
    }

    /// Publishes `rev` as the compact revision, then drops superseded records at or below it.
    fn physical_compaction(&self, rev: i64) -> Result<()> {
        // Publish first: a reader that then sees a trimmed index also sees the new compact
        // revision when it re-checks, and reports Compacted instead of a partial answer.
        self.compact_rev.store(rev, Ordering::SeqCst);
        self.schedule_compaction(rev)
    }

    // ---- writes ------------------------------------------------------------------------------

    /// etcd checks a plain put's lease before its key, and a txn put's key before its lease.
    fn check_put(&self, p: &PutRequest, rev: i64, key_first: bool) -> Result<()> {
        let lease_err =
            (p.lease != 0 && !self.leases.exists(p.lease)).then_some(MvccError::LeaseNotFound);
        let key_err = ((p.ignore_value || p.ignore_lease) && self.index.get(&p.key, rev).is_none())
            .then_some(MvccError::KeyNotFound);
        let (first, second) = if key_first {
            (key_err, lease_err)
        } else {
            (lease_err, key_err)
        };
        match first.or(second) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes a put at the context's revision; returns the previous value if asked for.
    fn put(&self, p: &PutRequest, ctx: &mut WriteCtx) -> Result<Option<KeyValue>> {
        let view_rev = ctx.read_rev();
        let slot = self.index.slot(&p.key);
        let prev_rev = slot.visible(view_rev);
        // The index holds create_revision, version and lease; the previous record itself is
        // loaded only when its value is wanted (one search of the big revision map saved).
        let wants_prev = p.prev_kv || p.ignore_value || ctx.events.is_some();
        let prev = match prev_rev {
            Some(r) if wants_prev => Some(self.load(r.rev, &ctx.view())?),
            _ => None,
        };
        let (create_revision, version) = match prev_rev {
            Some(r) => (r.create_revision, r.version + 1),
            None => (ctx.main, 1),
        };
        let value = match (&prev, p.ignore_value) {
            (Some(kv), true) => &kv.value,
            _ => &p.value,
        };
        let old_lease = prev_rev.map_or(0, |r| r.lease);
        let lease = if p.ignore_lease { old_lease } else { p.lease };
        let rev = ctx.next_rev();
        // Encoded from borrowed parts: building a `KeyValue` would bump and drop the reference
        // count of the raft entry's buffer twice per put, a cache line the raft thread shares.
        let encoded = encode_record(&p.key, create_revision, rev.main, version, value, lease);
        ctx.overlay.push((rev, ctx.batch.len()));
        ctx.batch.put(Space::Kv, rev_key(rev, false), encoded);
        slot.push(IndexRev::live(rev, create_revision, version, lease));
        if old_lease != lease {
            if old_lease != 0 {
                self.leases.detach(old_lease, &p.key);
            }
            if lease != 0 {
                self.leases.attach(lease, &p.key);
            }
        }
        if let Some(events) = &mut ctx.events {
            let kv = KeyValue {
                key: p.key.clone(),
                create_revision,
                mod_revision: rev.main,
                version,
                value: value.clone(),
                lease,
            };
            events.push(Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv: prev.clone(),
            });
        }
        Ok(if p.prev_kv { prev } else { None })
    }

    fn delete_range(
        &self,
        d: &DeleteRangeRequest,
        ctx: &mut WriteCtx,
    ) -> Result<(i64, Vec<KeyValue>)> {
        let view_rev = ctx.read_rev();
        let mut victims = Vec::new();
        self.index.visit(
            &KeyRange::new(&d.key, &d.range_end),
            view_rev,
            &mut |k, r| {
                victims.push((k.clone(), r));
                true
            },
        );
        let wants_prev = d.prev_kv || ctx.events.is_some();
        let mut prev_kvs = Vec::new();
        for (key, victim) in &victims {
            let prev = if wants_prev {
                Some(self.load(victim.rev, &ctx.view())?)
            } else {
                None
            };
            if victim.lease != 0 {
                self.leases.detach(victim.lease, key);
            }
            let rev = ctx.next_rev();
            let tomb = KeyValue {
                key: key.clone(),
                mod_revision: rev.main,
                ..Default::default()
            };
            ctx.batch
                .put(Space::Kv, rev_key(rev, true), tomb.encode_to_vec());
            if let Some(events) = &mut ctx.events {
                events.push(Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(tomb),
                    prev_kv: prev.clone(),
                });
            }
            if d.prev_kv {
                prev_kvs.extend(prev);
            }
            self.index.push(key, IndexRev::tombstone(rev));
        }
        Ok((victims.len() as i64, prev_kvs))
    }

    fn compact(&self, c: &CompactionRequest, ctx: &mut WriteCtx) -> Result<CompactionResponse> {
        let compacted = self.compact_revision().max(ctx.compact.unwrap_or(-1));
        if c.revision <= compacted {
            return Err(MvccError::Compacted);
        }
        if c.revision > ctx.rev {
            return Err(MvccError::FutureRev);
        }
        // Compacted logically now (later commands of this entry see it through the view);
        // records are dropped once the entry's revision is published.
        ctx.compact = Some(c.revision);
        Ok(CompactionResponse {
            header: header(ctx.rev),
        })
    }

    // ---- leases (apply side) -------------------------------------------------------------------

    fn put_lease_record(&self, ctx: &mut WriteCtx, id: i64, ttl: i64, remaining_ttl: i64) {
        let rec = LeaseRecord {
            id,
            ttl,
            remaining_ttl,
        };
        ctx.batch
            .put(Space::Meta, lease_meta_key(id), rec.encode_to_vec());
    }

    fn alarm(&self, a: &AlarmRequest, ctx: &mut WriteCtx) -> AlarmResponse {
        let mut alarms = self.alarms.write();
        let affected = match AlarmAction::try_from(a.action) {
            Ok(AlarmAction::Activate) if a.alarm != AlarmType::None as i32 => {
                alarms.insert((a.member_id, a.alarm));
                ctx.batch.put(
                    Space::Meta,
                    alarm_meta_key(a.member_id, a.alarm),
                    Vec::new(),
                );
                vec![(a.member_id, a.alarm)]
            }
            Ok(AlarmAction::Deactivate) => {
                // etcd deactivates exactly the named alarm; NONE names none.
                let gone: Vec<(u64, i32)> = alarms
                    .iter()
                    .filter(|(m, t)| *m == a.member_id && *t == a.alarm)
                    .copied()
                    .collect();
                for g in &gone {
                    alarms.remove(g);
                    ctx.batch.delete(Space::Meta, alarm_meta_key(g.0, g.1));
                }
                gone
            }
            _ => alarms.iter().copied().collect(),
        };
        AlarmResponse {
            header: header(ctx.read_rev()),
            alarms: affected
                .into_iter()
                .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                .collect(),
        }
    }

    fn lease_grant(&self, g: &LeaseGrantRequest, ctx: &mut WriteCtx) -> Result<LeaseGrantResponse> {
        if self.is_space_capped() {
            return Err(MvccError::NoSpace);
        }
        if self.leases.exists(g.id) {
            return Err(MvccError::LeaseExists);
        }
        self.leases.grant(g.id, g.ttl, 0);
        self.put_lease_record(ctx, g.id, g.ttl, 0);
        Ok(LeaseGrantResponse {
            header: header(ctx.read_rev()),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        })
    }

    /// Deletes every key attached to the lease, all at one revision, and the lease.
    fn lease_revoke(
        &self,
        r: &LeaseRevokeRequest,
        ctx: &mut WriteCtx,
    ) -> Result<LeaseRevokeResponse> {
        let keys = self.leases.revoke(r.id).ok_or(MvccError::LeaseNotFound)?;
        ctx.batch.delete(Space::Meta, lease_meta_key(r.id));
        for key in keys {
            let d = DeleteRangeRequest {
                key,
                range_end: Bytes::new(),
                prev_kv: false,
            };
            self.delete_range(&d, ctx)?;
        }
        Ok(LeaseRevokeResponse {
            header: header(ctx.read_rev()),
        })
    }

    fn lease_checkpoint(
        &self,
        c: &LeaseCheckpointRequest,
        ctx: &mut WriteCtx,
    ) -> Result<LeaseCheckpointResponse> {
        for cp in &c.checkpoints {
            if let Some(ttl) = self.leases.checkpoint(cp.id, cp.remaining_ttl) {
                self.put_lease_record(ctx, cp.id, ttl, cp.remaining_ttl);
            }
        }
        Ok(LeaseCheckpointResponse {
            header: header(ctx.read_rev()),
        })
    }
}

/// A read "at the current revision" that raced a compaction of that very revision (the
/// compaction was published just after the reader took the revision) is simply done again at
/// the newer revision: etcd never fails such a read. Reads at a named revision are not retried.
fn at_current<T>(current: bool, mut read: impl FnMut() -> Result<T>) -> Result<T> {
    const ATTEMPTS: usize = 16;
    let mut attempt = 0;
    loop {
        match read() {
            Err(MvccError::Compacted) if current && attempt < ATTEMPTS => attempt += 1,
            other => return other,
        }
    }
}

/// etcd's quota cost test: a put, a lease grant, or a txn with a put among its top-level ops
/// (etcd's `costTxn` does not look into nested txns).
pub fn adds_data(cmd: &Command) -> bool {
    match &cmd.op {
        Some(Op::Put(_)) | Some(Op::LeaseGrant(_)) => true,
        Some(Op::Txn(t)) => t
            .success
            .iter()
            .chain(t.failure.iter())
            .any(|op| matches!(op.request, Some(request_op::Request::RequestPut(_)))),
        _ => false,
    }
}

/// Records put by the entry being applied and not yet written to the engine: each revision
/// with the position of its record in the entry's write batch, in revision order (revisions
/// only grow within an entry).
type Overlay = Vec<(Revision, usize)>;

/// The overlay with the write batch its positions point into.
#[derive(Clone, Copy)]
struct Pending<'a> {
    puts: &'a [(Revision, usize)],
    batch: &'a WriteBatch,
}

impl Pending<'_> {
    fn get(&self, rev: Revision) -> Option<Bytes> {
        let at = self.puts.binary_search_by(|(r, _)| r.cmp(&rev)).ok()?;
        match self.batch.ops().get(self.puts[at].1) {
            Some(WriteOp::Put { value, .. }) => Some(value.clone()),
            _ => None,
        }
    }
}

/// What a read sees: the revision it reads at, plus the not-yet-persisted records of the raft
/// batch being applied (reads inside a txn see the txn's own earlier writes).
struct View<'a> {
    current: i64,
    overlay: Option<Pending<'a>>,
    /// A compaction applied earlier in the same raft entry but not yet published.
    compact_floor: i64,
}

impl View<'static> {
    fn at(current: i64) -> Self {
        View {
            current,
            overlay: None,
            compact_floor: -1,
        }
    }
}

struct WriteCtx {
    /// Revision of the store as of the commands applied so far in this batch.
    rev: i64,
    /// Main revision of the command being applied.
    main: i64,
    /// Next sub revision; 0 means the command has changed nothing yet.
    sub: i64,
    batch: WriteBatch,
    overlay: Overlay,
    compact: Option<i64>,
    /// Events for watchers, in revision order; None when no watcher exists.
    events: Option<Vec<Event>>,
    /// Bytes of key-values the current command's Txn ranges answer so far.
    response_bytes: usize,
    /// The current command's answer passed the response limit (see `txn_range`).
    response_over: Option<MvccError>,
}

impl WriteCtx {
    fn begin(&mut self) {
        self.main = self.rev + 1;
        self.sub = 0;
        self.response_bytes = 0;
        self.response_over = None;
    }

    fn end(&mut self) {
        if self.sub > 0 {
            self.rev = self.main;
        }
    }

    fn next_rev(&mut self) -> Revision {
        let r = Revision {
            main: self.main,
            sub: self.sub,
        };
        self.sub += 1;
        r
    }

    /// The revision a read inside the current command sees: its own writes once it made any.
    fn read_rev(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.rev
        }
    }

    fn rev_after(&self) -> i64 {
        self.read_rev()
    }

    fn view(&self) -> View<'_> {
        View {
            current: self.read_rev(),
            overlay: Some(Pending {
                puts: &self.overlay,
                batch: &self.batch,
            }),
            compact_floor: self.compact.unwrap_or(-1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The hand-written record encoding is byte for byte what prost writes, default
        /// (omitted) fields and negative numbers included.
        #[test]
        fn record_encoding_matches_prost(
            key in proptest::collection::vec(any::<u8>(), 0..40),
            value in proptest::collection::vec(any::<u8>(), 0..300),
            create_revision in prop_oneof![Just(0i64), any::<i64>()],
            mod_revision in prop_oneof![Just(0i64), any::<i64>()],
            version in prop_oneof![Just(0i64), any::<i64>()],
            lease in prop_oneof![Just(0i64), any::<i64>()],
        ) {
            let kv = KeyValue {
                key: Bytes::from(key.clone()),
                create_revision,
                mod_revision,
                version,
                value: Bytes::from(value.clone()),
                lease,
            };
            let encoded = encode_record(&key, create_revision, mod_revision, version, &value, lease);
            prop_assert_eq!(&encoded, &kv.encode_to_vec());
            // What the index rebuild reads of it.
            let fields = super::rebuild::IndexFields::decode(&encoded[..]).expect("decodes");
            prop_assert_eq!(
                (&fields.key[..], fields.create_revision, fields.version, fields.lease),
                (&key[..], create_revision, version, lease)
            );
        }
    }
}

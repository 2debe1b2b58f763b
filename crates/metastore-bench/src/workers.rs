//! One client of a request/response workload: what it sends and how it checks answers.

use crate::report::{Outcome, Recorder};
use crate::{
    error_label, fail, key_of, status_label, value_of, Common, Consistency, KeyPicker, Workload,
};
use anyhow::{bail, Context, Result};
use etcd_client::{
    Compare, CompareOp, GetOptions, KvClient, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, Txn,
    TxnOp,
};
use metastore_client::BatchClient;
use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
use metastore_proto::metastore::v1::{BatchGetRequest, BatchPutRequest};

/// TTL of the leases `lease-keepalive` keeps alive: long enough never to expire mid-run.
const KEEPALIVE_LEASE_TTL: i64 = 600;

pub(crate) struct Worker {
    kind: Kind,
    keys: KeyPicker,
    key_size: usize,
    val_size: usize,
    check_every: u64,
    steps: u64,
    /// Keys whose write was acknowledged at this revision; read back after the run.
    written: Vec<(Vec<u8>, i64)>,
    kv: KvClient,
}

enum Kind {
    Put,
    Range {
        serializable: bool,
        limit: i64,
        prefix: Option<Vec<u8>>,
        span: u64,
    },
    TxnPut {
        ops: usize,
    },
    TxnMixed {
        read_share: f64,
        serializable: bool,
        dice: u64,
    },
    LeaseKeepalive(Box<KeepAlive>),
    BatchPut {
        client: BatchClient,
        size: usize,
    },
    BatchGet {
        client: BatchClient,
        size: usize,
    },
}

struct KeepAlive {
    lease: i64,
    client: LeaseClient,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl Worker {
    pub(crate) async fn new(
        workload: &Workload,
        common: &Common,
        index: usize,
        conn: &etcd_client::Client,
        batch: Option<BatchClient>,
    ) -> Result<Self> {
        let kind = match workload {
            Workload::Put => Kind::Put,
            Workload::Range(a) => Kind::Range {
                serializable: a.consistency == Consistency::S,
                limit: a.limit,
                prefix: a.prefix.as_ref().map(|p| p.as_bytes().to_vec()),
                span: a.span,
            },
            Workload::TxnPut(a) => {
                if a.txn_ops == 0 {
                    bail!("--txn-ops must be positive");
                }
                Kind::TxnPut { ops: a.txn_ops }
            }
            Workload::TxnMixed(a) => {
                if !(a.rw_ratio >= 0.0 && a.rw_ratio.is_finite()) {
                    bail!("--rw-ratio must be a non-negative number");
                }
                Kind::TxnMixed {
                    read_share: a.rw_ratio / (a.rw_ratio + 1.0),
                    serializable: a.consistency == Consistency::S,
                    dice: 0x5851_f42d_4c95_7f2d ^ index as u64,
                }
            }
            Workload::LeaseKeepalive => {
                let mut client = conn.lease_client();
                let lease = client
                    .grant(KEEPALIVE_LEASE_TTL, None)
                    .await
                    .context("granting the keep-alive lease")?
                    .id();
                let (keeper, stream) = client
                    .keep_alive(lease)
                    .await
                    .context("opening the keep-alive stream")?;
                Kind::LeaseKeepalive(Box::new(KeepAlive {
                    lease,
                    client,
                    keeper,
                    stream,
                }))
            }
            Workload::BatchPut(a) | Workload::BatchGet(a) => {
                if a.batch_size == 0 || a.batch_size > metastore_client::MAX_BATCH_OPS {
                    bail!(
                        "--batch-size must be 1..={}",
                        metastore_client::MAX_BATCH_OPS
                    );
                }
                if (a.batch_size as u64) > common.key_space_size {
                    bail!("--key-space-size must hold at least one batch of distinct keys");
                }
                let client = batch.context("no batch client")?;
                match workload {
                    Workload::BatchPut(_) => Kind::BatchPut {
                        client,
                        size: a.batch_size,
                    },
                    _ => Kind::BatchGet {
                        client,
                        size: a.batch_size,
                    },
                }
            }
            Workload::Watch(_) | Workload::WatchLatency(_) | Workload::K8s(_) => {
                bail!("watch and k8s workloads have their own driver")
            }
        };
        Ok(Self {
            kind,
            keys: KeyPicker::new(index, common),
            key_size: common.key_size,
            val_size: common.val_size,
            check_every: common.check_every,
            steps: 0,
            written: Vec::new(),
            // A `--prefix` or `--span` read may be far larger than tonic's 4 MiB default: the
            // server's `--max-response-bytes` is what bounds an answer.
            kv: conn.kv_client().max_decoding_message_size(usize::MAX),
        })
    }

    fn sample_now(&self) -> bool {
        self.check_every > 0 && self.steps.is_multiple_of(self.check_every)
    }

    /// Sends one request and judges its answer.
    pub(crate) async fn step(&mut self, seq: u64) -> Outcome {
        // The first request of every client is checked, then every `check_every`-th.
        let sample = self.sample_now();
        self.steps += 1;
        let (key_size, val_size) = (self.key_size, self.val_size);
        match &mut self.kind {
            Kind::Put => {
                let key = key_of(self.keys.next(seq), key_size);
                let value = value_of(&key, val_size);
                match self.kv.put(key.clone(), value, None).await {
                    Ok(resp) => {
                        if sample {
                            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                            self.written.push((key, rev));
                        }
                        Outcome::Ok { items: 1 }
                    }
                    Err(e) => fail(error_label(&e)),
                }
            }
            Kind::Range {
                serializable,
                limit,
                prefix,
                span,
            } => {
                let mut opts = GetOptions::new();
                if *serializable {
                    opts = opts.with_serializable();
                }
                if *limit > 0 {
                    opts = opts.with_limit(*limit);
                }
                let key = match prefix {
                    Some(p) => {
                        opts = opts.with_prefix();
                        p.clone()
                    }
                    None if *span > 0 => {
                        // Start early enough that every range holds `span` keys.
                        let starts = self.keys.space.saturating_sub(*span) + 1;
                        let first = self.keys.next(seq) % starts;
                        opts = opts.with_range(key_of(first + *span, key_size));
                        key_of(first, key_size)
                    }
                    None => key_of(self.keys.next(seq), key_size),
                };
                match self.kv.get(key, Some(opts)).await {
                    Ok(resp) => {
                        if sample {
                            for kv in resp.kvs() {
                                if kv.value() != value_of(kv.key(), val_size).as_slice() {
                                    return Outcome::CheckFailed(format!(
                                        "key {:?} holds a value this tool did not write",
                                        String::from_utf8_lossy(kv.key())
                                    ));
                                }
                            }
                        }
                        Outcome::Ok { items: 1 }
                    }
                    Err(e) => fail(error_label(&e)),
                }
            }
            Kind::TxnPut { ops } => {
                let first = self.keys.next(seq);
                let space = self.keys.space;
                let keys: Vec<Vec<u8>> = (0..*ops as u64)
                    .map(|i| key_of((first + i) % space, key_size))
                    .collect();
                let puts: Vec<TxnOp> = keys
                    .iter()
                    .map(|k| TxnOp::put(k.clone(), value_of(k, val_size), None))
                    .collect();
                // The compare always holds; it makes the server evaluate one before writing.
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        keys[0].clone(),
                        CompareOp::Less,
                        i64::MAX,
                    )])
                    .and_then(puts);
                match self.kv.txn(txn).await {
                    Ok(resp) if resp.succeeded() => {
                        if sample {
                            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                            self.written.extend(keys.into_iter().map(|k| (k, rev)));
                        }
                        Outcome::Ok { items: 1 }
                    }
                    Ok(_) => Outcome::CheckFailed("txn compare failed".into()),
                    Err(e) => fail(error_label(&e)),
                }
            }
            Kind::TxnMixed {
                read_share,
                serializable,
                dice,
            } => {
                *dice ^= *dice << 13;
                *dice ^= *dice >> 7;
                *dice ^= *dice << 17;
                let read = (*dice % 1_000_000) as f64 / 1_000_000.0 < *read_share;
                let key = key_of(self.keys.next(seq), key_size);
                let op = if read {
                    let mut opts = GetOptions::new();
                    if *serializable {
                        opts = opts.with_serializable();
                    }
                    TxnOp::get(key.clone(), Some(opts))
                } else {
                    TxnOp::put(key.clone(), value_of(&key, val_size), None)
                };
                match self.kv.txn(Txn::new().and_then([op])).await {
                    Ok(resp) => {
                        if sample && read {
                            for r in resp.op_responses() {
                                if let etcd_client::TxnOpResponse::Get(g) = r {
                                    for kv in g.kvs() {
                                        if kv.value() != value_of(kv.key(), val_size).as_slice() {
                                            return Outcome::CheckFailed(format!(
                                                "key {:?} holds a value this tool did not write",
                                                String::from_utf8_lossy(kv.key())
                                            ));
                                        }
                                    }
                                }
                            }
                        } else if sample {
                            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                            self.written.push((key, rev));
                        }
                        Outcome::Ok { items: 1 }
                    }
                    Err(e) => fail(error_label(&e)),
                }
            }
            Kind::LeaseKeepalive(ka) => {
                let KeepAlive {
                    lease,
                    keeper,
                    stream,
                    ..
                } = ka.as_mut();
                if let Err(e) = keeper.keep_alive().await {
                    return fail(error_label(&e));
                }
                match stream.message().await {
                    Ok(Some(resp)) if resp.id() == *lease && resp.ttl() > 0 => {
                        Outcome::Ok { items: 1 }
                    }
                    Ok(Some(resp)) => Outcome::CheckFailed(format!(
                        "keep-alive of lease {lease:x} answered id {:x} ttl {}",
                        resp.id(),
                        resp.ttl()
                    )),
                    Ok(None) => fail("StreamClosed".into()),
                    Err(e) => fail(error_label(&e)),
                }
            }
            Kind::BatchPut { client, size } => {
                let space = self.keys.space;
                let first = self.keys.next(seq.wrapping_mul(*size as u64));
                let keys: Vec<Vec<u8>> = (0..*size as u64)
                    .map(|i| key_of((first + i) % space, key_size))
                    .collect();
                let puts = keys
                    .iter()
                    .map(|k| PutRequest {
                        key: k.clone().into(),
                        value: value_of(k, val_size).into(),
                        ..Default::default()
                    })
                    .collect();
                match client.inner().batch_put(BatchPutRequest { puts }).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        if resp.responses.len() != keys.len() {
                            return Outcome::CheckFailed(format!(
                                "BatchPut of {} keys answered {} results",
                                keys.len(),
                                resp.responses.len()
                            ));
                        }
                        if sample {
                            let rev = resp.header.map(|h| h.revision).unwrap_or_default();
                            // A few keys of the batch, not all: the read-back stays cheap.
                            self.written
                                .extend(keys.into_iter().step_by(97).map(|k| (k, rev)));
                        }
                        Outcome::Ok {
                            items: *size as u64,
                        }
                    }
                    Err(s) => fail(status_label(&s)),
                }
            }
            Kind::BatchGet { client, size } => {
                let space = self.keys.space;
                let first = self.keys.next(seq.wrapping_mul(*size as u64));
                let ranges = (0..*size as u64)
                    .map(|i| RangeRequest {
                        key: key_of((first + i) % space, key_size).into(),
                        ..Default::default()
                    })
                    .collect();
                let req = BatchGetRequest {
                    ranges,
                    serializable: false,
                };
                match client.inner().batch_get(req).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        if resp.responses.len() != *size {
                            return Outcome::CheckFailed(format!(
                                "BatchGet of {size} keys answered {} results",
                                resp.responses.len()
                            ));
                        }
                        if sample {
                            for kv in resp.responses.iter().flat_map(|r| r.kvs.iter()) {
                                if kv.value != value_of(&kv.key, val_size) {
                                    return Outcome::CheckFailed(format!(
                                        "key {:?} holds a value this tool did not write",
                                        String::from_utf8_lossy(&kv.key)
                                    ));
                                }
                            }
                        }
                        Outcome::Ok {
                            items: *size as u64,
                        }
                    }
                    Err(s) => fail(status_label(&s)),
                }
            }
        }
    }

    /// Reads back the sampled writes: each key must hold this tool's value, written at or
    /// after the revision its put was acknowledged at (a later put may have overwritten it).
    pub(crate) async fn verify_writes(&mut self, rec: &mut Recorder) {
        for (key, rev) in std::mem::take(&mut self.written) {
            match self.kv.get(key.clone(), None).await {
                Ok(resp) => match resp.kvs().first() {
                    Some(kv)
                        if kv.mod_revision() >= rev
                            && kv.value() == value_of(&key, self.val_size).as_slice() =>
                    {
                        rec.checks.pass()
                    }
                    Some(kv) => rec.checks.fail(format!(
                        "key {:?} acknowledged at revision {rev} reads back mod_revision {} with a {}-byte value",
                        String::from_utf8_lossy(&key),
                        kv.mod_revision(),
                        kv.value().len()
                    )),
                    None => rec.checks.fail(format!(
                        "key {:?} acknowledged at revision {rev} is missing",
                        String::from_utf8_lossy(&key)
                    )),
                },
                Err(e) => rec
                    .checks
                    .fail(format!("reading back {:?}: {e}", String::from_utf8_lossy(&key))),
            }
        }
    }

    /// Releases what the worker holds on the server (its lease).
    pub(crate) async fn close(self) {
        if let Kind::LeaseKeepalive(ka) = self.kind {
            let KeepAlive {
                lease, mut client, ..
            } = *ka;
            let _ = client.revoke(lease).await;
        }
    }
}

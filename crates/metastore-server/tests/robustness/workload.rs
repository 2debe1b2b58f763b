//! Recording clients: each is one sequential actor with its own connection to one member,
//! doing puts, linearizable and serializable gets, deletes and compare-and-swap txns on a
//! small key set, and recording every request as a `metastore_checker::Operation`.

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, Txn, TxnOp, TxnOpResponse,
};
use metastore_checker::{ClientId, Input, KeyValue, Operation, Outcome, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Few keys, so that clients contend on each and stale or lost values have a chance to show;
/// a prefix no other write of the tests uses, so the history holds every write to them.
pub const KEYS: usize = 10;

pub fn key(i: usize) -> String {
    format!("robust/{i}")
}

/// Long enough to ride out a re-election (about a second here) without recording an unknown
/// outcome for a request that would have succeeded, short enough that a client stuck on a
/// paused member records few requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One client's share of the load and what it saw.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Operation>>>,
}

impl Workload {
    /// `per_member` clients on each endpoint, all timing against `start`.
    pub fn start(endpoints: &[String], per_member: usize, start: Instant) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (m, endpoint) in endpoints.iter().enumerate() {
            for k in 0..per_member {
                let id = (m * per_member + k) as ClientId;
                let actor = Actor {
                    id,
                    endpoint: endpoint.clone(),
                    client: None,
                    rng: StdRng::seed_from_u64(0x5eed ^ id),
                    known_mod: HashMap::new(),
                    seq: 0,
                    start,
                    history: Vec::new(),
                    failures_in_a_row: 0,
                };
                tasks.push(tokio::spawn(actor.run(stop.clone())));
            }
        }
        Workload { stop, tasks }
    }

    /// Stops every client after its request in flight and returns the merged history.
    pub async fn stop(self) -> Vec<Operation> {
        self.stop.store(true, Ordering::SeqCst);
        let mut history = Vec::new();
        for t in self.tasks {
            history.extend(t.await.expect("a recording client panicked"));
        }
        history.sort_by_key(|op| op.call);
        history
    }
}

struct Actor {
    id: ClientId,
    endpoint: String,
    client: Option<Client>,
    rng: StdRng,
    /// The last mod revision this client saw per key: what its CAS expects, so that CAS
    /// succeeds about as often as it fails.
    known_mod: HashMap<String, i64>,
    seq: u64,
    start: Instant,
    history: Vec<Operation>,
    failures_in_a_row: u32,
}

impl Actor {
    async fn run(mut self, stop: Arc<AtomicBool>) -> Vec<Operation> {
        while !stop.load(Ordering::SeqCst) {
            if !self.connect().await {
                // Nothing was sent, so there is nothing to record.
                self.back_off().await;
                continue;
            }
            let input = next_input(&mut self.rng, &mut self.seq, self.id, &self.known_mod);
            let call = self.now();
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, execute(client, &input)).await
            {
                Ok(Ok(r)) => Outcome::Ok(r),
                Ok(Err(_)) | Err(_) => Outcome::Unknown,
            };
            let ret = self.now();
            self.learn(&input, &outcome);
            let failed = matches!(outcome, Outcome::Unknown);
            self.history.push(Operation {
                client: self.id,
                call,
                ret,
                input,
                outcome,
            });
            if failed {
                // A broken channel may not recover by itself after its member restarts, and
                // every failed write is an unknown the checker must place: back off, so a
                // client of a dead member adds a handful, not hundreds.
                self.client = None;
                self.back_off().await;
            } else {
                self.failures_in_a_row = 0;
            }
        }
        self.history
    }

    async fn back_off(&mut self) {
        self.failures_in_a_row += 1;
        let wait = 100 * u64::from(self.failures_in_a_row.min(5));
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Whether the client has a connection, making one if needed.
    async fn connect(&mut self) -> bool {
        if self.client.is_none() {
            let opts = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(REQUEST_TIMEOUT);
            let endpoints = [self.endpoint.as_str()];
            self.client =
                tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(opts)))
                    .await
                    .ok()
                    .and_then(Result::ok);
        }
        self.client.is_some()
    }

    fn learn(&mut self, input: &Input, outcome: &Outcome) {
        let Outcome::Ok(response) = outcome else {
            return;
        };
        let Some(key) = history_key(input) else {
            return;
        };
        let seen = match response {
            Response::Put { header_revision } => Some(*header_revision),
            Response::Delete { .. } => Some(0),
            Response::Get { kv, .. } => Some(kv.as_ref().map_or(0, |kv| kv.mod_revision)),
            Response::CasPut {
                header_revision,
                succeeded: true,
                ..
            } => Some(*header_revision),
            Response::CasPut { kv, .. } => Some(kv.as_ref().map_or(0, |kv| kv.mod_revision)),
            Response::LeaseGrant { .. } => None,
        };
        if let Some(rev) = seen {
            self.known_mod.insert(key.to_string(), rev);
        }
    }
}

fn next_input(
    rng: &mut StdRng,
    seq: &mut u64,
    id: ClientId,
    known_mod: &HashMap<String, i64>,
) -> Input {
    let key = key(rng.random_range(0..KEYS));
    *seq += 1;
    // Unique values, so that every value a read returns names the one write behind it.
    let value = format!("c{}-{}", id, *seq);
    match rng.random_range(0..100) {
        0..30 => Input::Put {
            key,
            value,
            lease: 0,
        },
        30..55 => Input::Get {
            key,
            serializable: false,
        },
        55..70 => Input::Get {
            key,
            serializable: true,
        },
        70..80 => Input::Delete { key },
        _ => Input::CasPut {
            expected_mod_revision: known_mod.get(&key).copied().unwrap_or(0),
            key,
            value,
        },
    }
}

fn history_key(input: &Input) -> Option<&str> {
    match input {
        Input::Put { key, .. }
        | Input::Get { key, .. }
        | Input::Delete { key }
        | Input::CasPut { key, .. } => Some(key),
        Input::LeaseGrant { .. } => None,
    }
}

/// The response as the checker models it; an error for anything it could not parse, which
/// the caller records as an unknown outcome.
async fn execute(c: &mut Client, input: &Input) -> Result<Response, String> {
    let err = |e: etcd_client::Error| e.to_string();
    match input {
        Input::Put { key, value, .. } => {
            let resp = c
                .put(key.as_str(), value.as_str(), None)
                .await
                .map_err(err)?;
            Ok(Response::Put {
                header_revision: revision(resp.header())?,
            })
        }
        Input::Get { key, serializable } => {
            let opts = serializable.then(|| GetOptions::new().with_serializable());
            let resp = c.get(key.as_str(), opts).await.map_err(err)?;
            Ok(Response::Get {
                header_revision: revision(resp.header())?,
                kv: single_kv(&resp),
            })
        }
        Input::Delete { key } => {
            let resp = c.delete(key.as_str(), None).await.map_err(err)?;
            Ok(Response::Delete {
                header_revision: revision(resp.header())?,
                deleted: resp.deleted(),
            })
        }
        Input::CasPut {
            key,
            expected_mod_revision,
            value,
        } => {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    *expected_mod_revision,
                )])
                .and_then([TxnOp::put(key.as_str(), value.as_str(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = c.txn(txn).await.map_err(err)?;
            let header_revision = revision(resp.header())?;
            let kv = if resp.succeeded() {
                None
            } else {
                match resp.op_responses().first() {
                    Some(TxnOpResponse::Get(get)) => single_kv(get),
                    other => return Err(format!("else branch answered {other:?}")),
                }
            };
            Ok(Response::CasPut {
                header_revision,
                succeeded: resp.succeeded(),
                kv,
            })
        }
        Input::LeaseGrant { .. } => Err("the workload grants no leases".into()),
    }
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, String> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| "response without a header".to_string())
}

fn single_kv(resp: &GetResponse) -> Option<KeyValue> {
    resp.kvs().first().map(|kv| KeyValue {
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

/// Counts for the report: requests, and how many came back with an unknown outcome.
pub struct Counts {
    pub total: usize,
    pub unknown: usize,
    pub writes: usize,
    pub reads: usize,
}

pub fn counts(history: &[Operation]) -> Counts {
    Counts {
        total: history.len(),
        unknown: history.iter().filter(|o| o.is_unknown()).count(),
        writes: history
            .iter()
            .filter(|o| !matches!(o.input, Input::Get { .. }))
            .count(),
        reads: history
            .iter()
            .filter(|o| matches!(o.input, Input::Get { .. }))
            .count(),
    }
}

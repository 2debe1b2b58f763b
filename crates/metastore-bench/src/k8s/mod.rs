//! The Kubernetes-shaped workload: what kube-apiserver asks of etcd. Objects of 1–16 KiB under
//! `/registry/<type>/<namespace>/<name>` are created first; then closed-loop clients get,
//! update, create and delete them with the apiserver's revision-guarded txns, a lister walks
//! whole types in pages of 500 at a pinned revision at a fixed rate (the same list work for
//! every server compared), a compactor compacts to the revision of its previous round as the
//! apiserver does every 5 minutes, and one watch per type, from the revision the run starts at,
//! measures how long each write takes to reach it and must receive exactly the writes the
//! server acknowledged.

mod objects;
mod ops;
mod watchers;

use crate::report::{Latency, Recorder, Report};
use crate::{connect, cpu, error_label, parse_duration, Common};
use anyhow::{bail, Context, Result};
use clap::Args;
use etcd_client::{GetOptions, KvClient};
use objects::{Layout, HEADER};
use ops::{list, K8sClient, Op, OPS};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A page of 500 objects of up to 16 KiB, and catch-up watch responses, pass gRPC's 4 MiB
/// default; etcd sends without a limit.
const MAX_MESSAGE: usize = 256 << 20;
/// How often the lister and compactor look at the stop flag while they wait.
const POLL: Duration = Duration::from_millis(20);

#[derive(Args, Clone, Debug)]
pub struct K8sArgs {
    /// Objects created before the measured run.
    #[arg(long, default_value_t = 50_000)]
    pub objects: u64,
    /// Resource types: `/registry/<type>/`, one watch each.
    #[arg(long, default_value_t = 8)]
    pub types: usize,
    /// Namespaces each type's objects are spread over.
    #[arg(long, default_value_t = 20)]
    pub namespaces: u64,
    /// Smallest object, bytes (sizes are log-uniform between the bounds).
    #[arg(long, default_value_t = 1024)]
    pub min_size: usize,
    /// Largest object, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_size: usize,
    /// Objects per list page (the apiserver's default chunk size).
    #[arg(long, default_value_t = 500)]
    pub page: i64,
    /// Whole-type lists per second, paced (0 = none).
    #[arg(long, default_value_t = 1.0)]
    pub list_rate: f64,
    /// Compaction interval (Kubernetes: 5 minutes; scaled down to the run).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub compact_every: Duration,
    /// Operation mix of the clients, in parts: gets …
    #[arg(long, default_value_t = 30)]
    pub gets: u64,
    /// … updates (txn guarded by mod_revision) …
    #[arg(long, default_value_t = 50)]
    pub updates: u64,
    /// … creates (txn guarded by create_revision = 0) …
    #[arg(long, default_value_t = 10)]
    pub creates: u64,
    /// … and deletes (txn guarded by mod_revision).
    #[arg(long, default_value_t = 10)]
    pub deletes: u64,
}

impl K8sArgs {
    fn check(&self) -> Result<()> {
        if self.objects == 0 || self.types == 0 || self.namespaces == 0 || self.page <= 0 {
            bail!("--objects, --types, --namespaces and --page must be positive");
        }
        if self.min_size < HEADER || self.max_size < self.min_size {
            bail!("object sizes must satisfy {HEADER} <= --min-size <= --max-size");
        }
        if self.gets + self.updates + self.creates + self.deletes == 0 {
            bail!("the operation mix (--gets, --updates, --creates, --deletes) is empty");
        }
        if !(self.list_rate >= 0.0 && self.list_rate.is_finite()) {
            bail!("--list-rate must be a non-negative number");
        }
        if self.compact_every.is_zero() {
            bail!("--compact-every must be positive");
        }
        Ok(())
    }

    fn layout(&self) -> Layout {
        Layout {
            types: self.types,
            namespaces: self.namespaces,
            min_size: self.min_size,
            max_size: self.max_size,
        }
    }

    fn pick(&self, r: u64) -> Op {
        let weights = [self.gets, self.updates, self.creates, self.deletes];
        let mut r = r % weights.iter().sum::<u64>();
        for (op, w) in OPS.into_iter().zip(weights) {
            if r < w {
                return op;
            }
            r -= w;
        }
        Op::Update
    }
}

/// When the run ends: a deadline, or a count of client operations.
struct Stop {
    flag: AtomicBool,
    deadline: Option<Instant>,
    issued: AtomicU64,
    total: u64,
}

impl Stop {
    /// Claims one more operation; false once the run is over.
    fn claim(&self) -> bool {
        if self.flag.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.issued.fetch_add(1, Ordering::Relaxed) < self.total
    }

    fn stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Sleeps until `until`; false if the run stopped first.
    async fn sleep_until(&self, until: Instant) -> bool {
        while Instant::now() < until {
            if self.stopped() {
                return false;
            }
            tokio::time::sleep(POLL.min(until - Instant::now())).await;
        }
        !self.stopped()
    }
}

async fn current_revision(kv: &mut KvClient) -> Result<i64> {
    let resp = kv
        .get(
            "/registry/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Lists whole types in turn at `rate` per second; each list's latency counts from when it
/// was due, so a slow server cannot hide a backlog of lists.
async fn lister(mut kv: KvClient, args: K8sArgs, stop: Arc<Stop>) -> (Recorder, u64) {
    let mut rec = Recorder::new();
    let mut objects = 0;
    if args.list_rate <= 0.0 {
        return (rec, objects);
    }
    let layout = args.layout();
    let interval = Duration::from_secs_f64(1.0 / args.list_rate);
    let begin = Instant::now();
    for i in 0u32.. {
        let due = begin + interval * i;
        if !stop.sleep_until(due).await {
            break;
        }
        let prefix = layout.type_prefix(i as usize % args.types);
        let (outcome, n) = list(&mut kv, prefix.as_bytes(), args.page).await;
        // Its pages agreed with the first page's count: a check that passed.
        let checked = matches!(outcome, crate::report::Outcome::Ok { .. });
        rec.record(due.elapsed(), outcome);
        if checked {
            rec.checks.pass();
        }
        objects += n;
    }
    (rec, objects)
}

/// Every `every`, compacts to the revision the previous round saw (kube-apiserver's
/// compactor keeps one interval of history).
async fn compactor(mut kv: KvClient, every: Duration, stop: Arc<Stop>) -> Recorder {
    let mut rec = Recorder::new();
    let mut previous: Option<i64> = None;
    let mut next = Instant::now() + every;
    while stop.sleep_until(next).await {
        next += every;
        let rev = match current_revision(&mut kv).await {
            Ok(r) => r,
            Err(_) => continue,
        };
        if let Some(to) = previous {
            let started = Instant::now();
            let outcome = match kv.compact(to, None).await {
                Ok(_) => crate::report::Outcome::Ok { items: 1 },
                Err(e) => crate::report::Outcome::Failed(error_label(&e)),
            };
            rec.record(started.elapsed(), outcome);
        }
        previous = Some(rev);
    }
    rec
}

/// Adds one kind of operation's rate and latency to `extra` (unless `secs` is `None`) and its
/// outcomes to `all`.
fn fold(extra: &mut Extra, all: &mut Recorder, name: &str, mut rec: Recorder, secs: Option<f64>) {
    if let Some(secs) = secs {
        let lat = Latency::from_histogram(&rec.hist);
        extra.insert(format!("{name}_per_sec"), rec.ok as f64 / secs);
        extra.insert(format!("{name}_p50_ms"), lat.p50);
        extra.insert(format!("{name}_p99_ms"), lat.p99);
    }
    rec.errors = std::mem::take(&mut rec.errors)
        .into_iter()
        .map(|(label, n)| (format!("{name}:{label}"), n))
        .collect();
    all.merge(rec);
}

type Extra = std::collections::BTreeMap<String, f64>;

/// Runs the workload against an empty `/registry/`.
pub(crate) async fn k8s(args: &K8sArgs, common: &Common) -> Result<Report> {
    args.check()?;
    let layout = args.layout();
    let epoch = Instant::now();
    let mut conns = Vec::with_capacity(common.conns);
    for _ in 0..common.conns {
        conns.push(connect(common).await?);
    }
    let kv_of = |i: usize| {
        conns[i % conns.len()]
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    };
    let mut admin = kv_of(0);
    let existing = admin
        .get(
            "/registry/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .context("counting keys under /registry/")?
        .count();
    if existing > 0 {
        bail!("the server already holds {existing} keys under /registry/; the k8s workload needs none");
    }

    // Load: every client creates its share, as the apiserver creates objects.
    let load_started = Instant::now();
    let mut loading = Vec::with_capacity(common.clients);
    for c in 0..common.clients {
        let mut client = K8sClient::new(kv_of(c), c, common.clients, args.types);
        let (layout, objects) = (layout.clone(), args.objects);
        loading.push(tokio::spawn(async move {
            client.load(&layout, objects, epoch).await.map(|_| client)
        }));
    }
    let mut clients = Vec::with_capacity(loading.len());
    for task in loading {
        clients.push(task.await.context("a loading client panicked")??);
    }
    let load_took = load_started.elapsed().as_secs_f64().max(1e-9);
    let data_bytes: u64 = (0..args.objects).map(|id| layout.size(id) as u64).sum();

    let start_rev = current_revision(&mut admin).await?;
    let watches = watchers::Watches::start(common, &layout, start_rev + 1, epoch).await?;

    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        deadline: common.duration.map(|d| Instant::now() + d),
        issued: AtomicU64::new(0),
        total: if common.duration.is_some() {
            u64::MAX
        } else {
            common.total
        },
    });
    let cpu_mark = cpu::CpuMark::now(common.server_pid);
    let started = Instant::now();
    let lists = tokio::spawn(lister(kv_of(1), args.clone(), stop.clone()));
    let compactions = tokio::spawn(compactor(kv_of(2), args.compact_every, stop.clone()));
    let mut running = Vec::with_capacity(clients.len());
    for mut client in clients {
        let (args, layout, stop) = (args.clone(), layout.clone(), stop.clone());
        running.push(tokio::spawn(async move {
            while stop.claim() {
                let op = args.pick(client.owned.random());
                client.step(op, &layout, epoch).await;
            }
            client
        }));
    }
    let mut clients = Vec::with_capacity(running.len());
    for task in running {
        clients.push(task.await.context("a client panicked")?);
    }
    stop.flag.store(true, Ordering::Relaxed);
    let (list_rec, listed) = lists.await.context("the lister panicked")?;
    let compact_rec = compactions.await.context("the compactor panicked")?;
    let elapsed = started.elapsed();
    let cpu_use = cpu_mark.elapsed();

    let mut acked = vec![0u64; args.types];
    let mut uncertain = 0;
    for client in &clients {
        acked
            .iter_mut()
            .zip(&client.acked_writes)
            .for_each(|(a, n)| *a += n);
        uncertain += client.uncertain_writes;
    }
    let delivered = watches.finish(&mut admin, &layout).await?;

    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut all = Recorder::new();
    let mut e = Extra::new();
    for (i, op) in OPS.iter().enumerate() {
        let mut merged = Recorder::new();
        for client in &mut clients {
            merged.merge(std::mem::take(&mut client.recs[i]));
        }
        fold(&mut e, &mut all, op.name(), merged, Some(secs));
    }
    let lists_done = list_rec.ok;
    fold(&mut e, &mut all, "list", list_rec, Some(secs));
    let compact_lat = Latency::from_histogram(&compact_rec.hist);
    let compacts_done = compact_rec.ok;
    // Compactions run on a timer: their count is the interval's, not the server's doing.
    fold(&mut e, &mut all, "compact", compact_rec, None);
    delivered.check(&acked, uncertain, &mut all.checks);

    e.insert("load_s".into(), load_took);
    e.insert(
        "load_objects_per_sec".into(),
        args.objects as f64 / load_took,
    );
    e.insert(
        "load_mb_per_sec".into(),
        data_bytes as f64 / 1e6 / load_took,
    );
    e.insert("n_data_mb".into(), data_bytes as f64 / 1e6);
    e.insert(
        "n_list_objects_mean".into(),
        listed as f64 / lists_done.max(1) as f64,
    );
    e.insert("n_compactions".into(), compacts_done as f64);
    e.insert("compact_max_ms".into(), compact_lat.max);
    e.insert("n_watch_events".into(), delivered.events as f64);
    e.insert("watch_delay_p50_ms".into(), delivered.delay.p50);
    e.insert("watch_delay_p99_ms".into(), delivered.delay.p99);
    e.insert("watch_delay_max_ms".into(), delivered.delay.max);
    let mut report = Report::build("k8s", params(args, common), all, elapsed, cpu_use);
    report.extra = e;
    Ok(report)
}

fn params(args: &K8sArgs, c: &Common) -> serde_json::Map<String, serde_json::Value> {
    let mut p = serde_json::Map::new();
    p.insert("clients".into(), json!(c.clients));
    p.insert("conns".into(), json!(c.conns));
    match c.duration {
        Some(d) => p.insert("duration_s".into(), json!(d.as_secs_f64())),
        None => p.insert("total".into(), json!(c.total)),
    };
    p.insert("objects".into(), json!(args.objects));
    p.insert("types".into(), json!(args.types));
    p.insert("namespaces".into(), json!(args.namespaces));
    p.insert("sizes".into(), json!([args.min_size, args.max_size]));
    p.insert("page".into(), json!(args.page));
    p.insert("list_rate".into(), json!(args.list_rate));
    p.insert(
        "compact_every_s".into(),
        json!(args.compact_every.as_secs_f64()),
    );
    p.insert(
        "mix".into(),
        json!({"get": args.gets, "update": args.updates, "create": args.creates,
               "delete": args.deletes}),
    );
    p
}

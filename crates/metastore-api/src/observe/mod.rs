//! Prometheus metrics under etcd's names, so that etcd's Grafana dashboard and the etcd-mixin
//! alerts work unchanged, plus MetaStore's own (`metastore_*`).
//!
//! Each crate records through the `metrics` facade where the event happens (the WAL its
//! fsyncs, raft its leader changes, the transport its peers' bytes and round trips); this
//! module installs the process's one recorder, gives each histogram etcd's buckets, records
//! every gRPC call (through [`crate::front`]), and samples the server's state (leader, indexes, sizes)
//! at each scrape instead of on a timer.

mod grpc;

use crate::EtcdServer;
use metastore_engine::Engine;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use grpc::publish as publish_grpc;
pub(crate) use grpc::GrpcMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot install the metrics recorder: {0}")]
    Install(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot start the metrics upkeep thread: {0}")]
    Thread(#[from] std::io::Error),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into their buckets (bounds the memory they take
/// between scrapes).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// etcd's buckets for disk latencies: 1 ms to 8 s, doubling.
fn disk_buckets() -> Vec<f64> {
    (0..14).map(|i| 0.001 * f64::powi(2.0, i)).collect()
}

/// Installs the process's recorder once (a second member in the same process shares it).
pub fn install() -> Result<(), ObserveError> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let builder = PrometheusBuilder::new()
        // Prometheus' client default, which grpc-go's interceptor uses.
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .set_buckets_for_metric(
            Matcher::Suffix("_fsync_duration_seconds".into()),
            &disk_buckets(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_disk_backend_commit_duration_seconds".into()),
            &disk_buckets(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_network_peer_round_trip_time_seconds".into()),
            &(0..16)
                .map(|i| 0.0001 * f64::powi(2.0, i))
                .collect::<Vec<_>>(),
        )?
        // etcd's: 1 ms .. 4 s per pause, 100 ms .. 13 min per compaction.
        .set_buckets_for_metric(
            Matcher::Full("etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds".into()),
            &(0..13).map(|i| f64::powi(2.0, i)).collect::<Vec<_>>(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("etcd_debugging_mvcc_db_compaction_total_duration_milliseconds".into()),
            &(0..14)
                .map(|i| 100.0 * f64::powi(2.0, i))
                .collect::<Vec<_>>(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("metastore_op_duration_seconds".into()),
            &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
        )?
        .set_buckets_for_metric(
            Matcher::Full("metastore_raft_proposal_batch_size".into()),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
        )?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Lost a race with another member starting in this process: theirs serves both.
        return Ok(());
    }
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })?;
    let _ = HANDLE.set(handle);
    describe();
    metrics_process::Collector::default().describe();
    // Present (at 0) before the first one, so that rate() and alerts see the series.
    metrics::counter!("etcd_server_proposals_failed_total").increment(0);
    metrics::counter!("etcd_server_slow_apply_total").increment(0);
    metrics::counter!("etcd_server_leader_changes_seen_total").increment(0);
    Ok(())
}

/// The Prometheus text of every metric, with the server's state sampled now; None when no
/// recorder is installed.
pub(crate) fn render<E: Engine>(server: &EtcdServer<E>) -> Option<String> {
    let handle = HANDLE.get()?;
    sample(server);
    publish_grpc();
    metrics_process::Collector::default().collect();
    Some(handle.render())
}

/// Gauges read off the server at scrape time.
fn sample<E: Engine>(server: &EtcdServer<E>) {
    let raft = server.raft.status();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    metrics::gauge!("etcd_server_has_leader").set(flag(raft.leader_id != 0));
    metrics::gauge!("etcd_server_is_leader").set(flag(raft.is_leader));
    metrics::gauge!("etcd_server_is_learner").set(flag(server.is_learner()));
    metrics::gauge!("etcd_server_id", "server_id" => format!("{:x}", server.cluster.member_id))
        .set(1.0);
    metrics::gauge!("etcd_server_version", "server_version" => crate::ETCD_API_VERSION).set(1.0);
    if server.store.cluster_version().is_some() {
        metrics::gauge!("etcd_cluster_version", "cluster_version" => "3.5").set(1.0);
    }
    metrics::gauge!("etcd_server_proposals_committed_total").set(raft.commit_index as f64);
    metrics::gauge!("etcd_server_proposals_applied_total").set(raft.applied_index as f64);
    metrics::gauge!("metastore_raft_log_memory_bytes").set(raft.log_bytes_in_memory as f64);
    metrics::gauge!("metastore_raft_apply_backlog_bytes").set(raft.apply_backlog_bytes as f64);
    metrics::gauge!("etcd_server_proposals_pending")
        .set(server.proposer.stats().pending.load(Ordering::Relaxed) as f64);
    let size = server.store.engine().size_bytes() as f64;
    metrics::gauge!("etcd_mvcc_db_total_size_in_bytes").set(size);
    metrics::gauge!("etcd_mvcc_db_total_size_in_use_in_bytes").set(size);
    metrics::gauge!("etcd_debugging_mvcc_db_total_size_in_bytes").set(size);
    metrics::gauge!("etcd_server_quota_backend_bytes").set(server.limits.quota_bytes() as f64);
    metrics::gauge!("etcd_debugging_mvcc_keys_total").set(server.store.key_count() as f64);
    metrics::gauge!("etcd_debugging_mvcc_current_revision")
        .set(server.store.current_revision() as f64);
    metrics::gauge!("etcd_debugging_mvcc_compact_revision")
        .set(server.store.compact_revision() as f64);
    metrics::gauge!(
        "metastore_storage_engine_info",
        "storage_engine" => server.store.engine().name()
    )
    .set(1.0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "etcd_server_slow_apply_total",
        "The total number of slow apply requests (likely overloaded from slow disk)."
    );
    describe_gauge!(
        "metastore_raft_log_memory_bytes",
        Unit::Bytes,
        "Bytes of raft log entries held in memory: not yet applied, or kept for followers to catch up from."
    );
    describe_gauge!(
        "metastore_raft_apply_backlog_bytes",
        Unit::Bytes,
        "Bytes of committed raft entries waiting for the apply thread (bounded by raft.max-apply-backlog-bytes plus one Ready)."
    );
    describe_gauge!(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not."
    );
    describe_gauge!(
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise."
    );
    describe_gauge!(
        "etcd_server_is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise."
    );
    describe_gauge!(
        "etcd_server_id",
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID."
    );
    describe_gauge!(
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version."
    );
    describe_gauge!(
        "etcd_cluster_version",
        "Which version is running. 1 for 'cluster_version' label with current cluster version"
    );
    describe_counter!(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen."
    );
    describe_gauge!(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed."
    );
    describe_gauge!(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied."
    );
    describe_gauge!(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit."
    );
    describe_counter!(
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen."
    );
    describe_counter!(
        "etcd_server_health_success",
        "The total number of successful health checks"
    );
    describe_counter!(
        "etcd_server_health_failures",
        "The total number of failed health checks"
    );
    describe_gauge!(
        "etcd_server_healthcheck",
        "The result of each kind of healthcheck."
    );
    describe_counter!(
        "etcd_server_healthchecks_total",
        "The total number of each kind of healthcheck."
    );
    describe_histogram!(
        "etcd_disk_wal_fsync_duration_seconds",
        Unit::Seconds,
        "The latency distributions of fsync called by WAL."
    );
    describe_histogram!(
        "etcd_disk_backend_commit_duration_seconds",
        Unit::Seconds,
        "The latency distributions of commit called by backend."
    );
    describe_gauge!(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Total size of the underlying database logically in use in bytes."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes."
    );
    describe_gauge!("etcd_debugging_mvcc_keys_total", "Total number of keys.");
    describe_histogram!(
        "etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds",
        "Bucketed histogram of db compaction pause duration."
    );
    describe_histogram!(
        "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds",
        "Bucketed histogram of db compaction total duration."
    );
    describe_counter!(
        "etcd_debugging_mvcc_db_compaction_keys_total",
        "Total number of db keys compacted."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store."
    );
    describe_gauge!(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store."
    );
    describe_counter!(
        "etcd_network_peer_sent_bytes_total",
        "The total number of bytes sent to peers."
    );
    describe_counter!(
        "etcd_network_peer_received_bytes_total",
        "The total number of bytes received from peers."
    );
    describe_counter!(
        "etcd_network_peer_sent_failures_total",
        "The total number of send failures from peers."
    );
    describe_histogram!(
        "etcd_network_peer_round_trip_time_seconds",
        Unit::Seconds,
        "Round-Trip-Time histogram between peers"
    );
    describe_counter!(
        "etcd_network_client_grpc_sent_bytes_total",
        "The total number of bytes sent to grpc clients."
    );
    describe_counter!(
        "etcd_network_client_grpc_received_bytes_total",
        "The total number of bytes received from grpc clients."
    );
    describe_counter!(
        "grpc_server_started_total",
        "Total number of RPCs started on the server."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_histogram!("grpc_server_handling_seconds", Unit::Seconds, "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.");
    describe_counter!(
        "metastore_ops_total",
        "Client operations by operation, storage engine and outcome."
    );
    describe_histogram!(
        "metastore_op_duration_seconds",
        Unit::Seconds,
        "Client operation latency by operation."
    );
    describe_histogram!(
        "metastore_raft_proposal_batch_size",
        "Commands per proposed raft entry."
    );
    describe_histogram!(
        "metastore_wal_fsync_duration_seconds",
        Unit::Seconds,
        "The latency of each WAL group-commit fsync."
    );
    describe_gauge!(
        "metastore_storage_engine_info",
        "The storage engine this member runs on."
    );
}

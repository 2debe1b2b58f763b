//! `etcdserverpb.Watch`: one bidirectional stream carrying many watchers, on the store's
//! watch hub.

use crate::services::Svc;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use metastore_engine::Engine;
use metastore_mvcc::{QueueSlot, StreamReceiver, WatchSpec};
use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch,
    WatchRequest, WatchResponse,
};
use metastore_proto::mvccpb::Event;
use parking_lot::Mutex;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, Copy, Default)]
struct WatcherOpts {
    fragment: bool,
    progress_notify: bool,
    /// Events went out since the last progress tick (etcd elides the next notification).
    sent_since_tick: bool,
}

type Opts = Arc<Mutex<HashMap<i64, WatcherOpts>>>;

/// A response on its way to the client, holding its bytes' place in the stream's queue.
type Outgoing = (WatchResponse, Option<QueueSlot>);

#[tonic::async_trait]
impl<E: Engine> Watch for Svc<E> {
    type WatchStream = BoxStream<'static, Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let server = self.0.clone();
        let (stream_id, rx) = server.store.open_watch_stream();
        let room = rx.room();
        let opts: Opts = Arc::default();
        // Small: the hub's queue before it is bounded by bytes, and a message here still
        // counts against it (its slot is dropped when tonic takes the message).
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>(8);

        // Requests: create, cancel, progress. The stream ends when the client's side does.
        let recv = {
            let server = server.clone();
            let opts = opts.clone();
            let refusals = out_tx.clone();
            tokio::spawn(async move {
                loop {
                    // A client that sends requests without reading their answers is not read
                    // either once its answers fill the stream's queue (h2 flow control then
                    // holds it back), so it cannot grow the server's memory.
                    room.wait().await;
                    let req = match inbound.message().await {
                        Ok(Some(req)) => req,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "watch stream's requests ended");
                            break;
                        }
                    };
                    match req.request_union {
                        Some(RequestUnion::CreateRequest(c)) => {
                            let key = if c.key.is_empty() {
                                Bytes::from_static(&[0])
                            } else {
                                c.key
                            };
                            if let Err(e) = server.watch_permitted(&metadata, &key, &c.range_end) {
                                // etcd: created and canceled at once, with the reason.
                                let refusal = WatchResponse {
                                    header: Some(server.header(server.store.current_revision())),
                                    watch_id: metastore_mvcc::INVALID_WATCH_ID,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: crate::errors::watch_cancel_reason(e),
                                    ..Default::default()
                                };
                                if refusals.send((refusal, None)).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            let spec = WatchSpec {
                                watch_id: c.watch_id,
                                key,
                                range_end: c.range_end,
                                start_revision: c.start_revision,
                                prev_kv: c.prev_kv,
                                filter_put: c.filters.contains(&(FilterType::Noput as i32)),
                                filter_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
                            };
                            // Holding the options lock while the hub creates the watcher: the
                            // send loop cannot see its first message before its options.
                            let mut opts = opts.lock();
                            if let Some(id) = server.store.watch(stream_id, spec) {
                                opts.insert(
                                    id,
                                    WatcherOpts {
                                        fragment: c.fragment,
                                        progress_notify: c.progress_notify,
                                        sent_since_tick: false,
                                    },
                                );
                            }
                        }
                        Some(RequestUnion::CancelRequest(c)) => {
                            server.store.watch_hub().cancel(stream_id, c.watch_id);
                            opts.lock().remove(&c.watch_id);
                        }
                        Some(RequestUnion::ProgressRequest(_)) => {
                            server.store.watch_hub().progress_all(stream_id)
                        }
                        None => {}
                    }
                }
            })
        };

        // Responses, in the order the hub decided them, plus periodic progress notifications.
        let interval = server.watch_progress_interval;
        tokio::spawn(async move {
            send_loop(&server, stream_id, rx, out_tx, opts, interval, recv).await;
            server.store.watch_hub().close_stream(stream_id);
        });
        let out = ReceiverStream::new(out_rx).map(|(msg, _slot)| Ok(msg));
        Ok(Response::new(Box::pin(out)))
    }
}

async fn send_loop<E: Engine>(
    server: &crate::EtcdServer<E>,
    stream_id: u64,
    mut rx: StreamReceiver,
    out: mpsc::Sender<Outgoing>,
    opts: Opts,
    interval: std::time::Duration,
    mut recv: tokio::task::JoinHandle<()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some((mut msg, slot)) = msg else { return };
                server.fill_header(&mut msg.header);
                let fragment = {
                    let mut opts = opts.lock();
                    match opts.get_mut(&msg.watch_id) {
                        Some(o) => {
                            if !msg.events.is_empty() {
                                o.sent_since_tick = true;
                            }
                            o.fragment
                        }
                        None => false,
                    }
                };
                if msg.canceled && msg.compact_revision != 0 {
                    // Canceled by the server (compaction). A client's own cancel already
                    // removed the options, which may belong to a new watcher of that id by now.
                    opts.lock().remove(&msg.watch_id);
                }
                let parts = if fragment {
                    fragments(msg, server.limits.max_request_bytes)
                } else {
                    vec![msg]
                };
                // The last part carries the slot: the bytes count until all parts are taken.
                let mut slot = Some(slot);
                let last = parts.len().saturating_sub(1);
                for (i, part) in parts.into_iter().enumerate() {
                    let slot = if i == last { slot.take() } else { None };
                    if out.send((part, slot)).await.is_err() {
                        recv.abort();
                        return;
                    }
                }
            }
            _ = ticker.tick() => {
                let due: Vec<i64> = {
                    let mut opts = opts.lock();
                    opts.iter_mut()
                        .filter(|(_, o)| o.progress_notify)
                        .filter_map(|(id, o)| {
                            let due = !o.sent_since_tick;
                            o.sent_since_tick = false;
                            due.then_some(*id)
                        })
                        .collect()
                };
                if !due.is_empty() {
                    server.store.watch_hub().progress(stream_id, &due);
                }
            }
            _ = &mut recv, if !recv.is_finished() => {
                // The client closed its sending side; as etcd, keep sending until it goes away.
            }
            _ = out.closed() => {
                // The client went away (tonic dropped the response stream).
                recv.abort();
                return;
            }
        }
    }
}

/// etcd's `sendFragments`: a response larger than the request limit is split into several,
/// all but the last flagged `fragment`; a single event is never split.
fn fragments(msg: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    if msg.encoded_len() < max_bytes || msg.events.len() < 2 {
        return vec![msg];
    }
    let mut out = Vec::new();
    let mut events: std::collections::VecDeque<Event> = msg.events.clone().into();
    while !events.is_empty() {
        let mut cur = WatchResponse {
            events: Vec::new(),
            fragment: true,
            ..msg.clone()
        };
        while let Some(ev) = events.pop_front() {
            cur.events.push(ev);
            if cur.events.len() > 1 && cur.encoded_len() >= max_bytes {
                if let Some(ev) = cur.events.pop() {
                    events.push_front(ev);
                }
                break;
            }
        }
        if events.is_empty() {
            cur.fragment = false;
        }
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::mvccpb::KeyValue;

    fn ev(n: usize) -> Event {
        Event {
            kv: Some(KeyValue {
                key: format!("k{n}").into(),
                value: Bytes::from(vec![b'v'; 100]),
                mod_revision: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fragments_split_big_responses_and_keep_every_event() {
        let msg = WatchResponse {
            watch_id: 3,
            events: (0..50).map(ev).collect(),
            ..Default::default()
        };
        let parts = fragments(msg.clone(), 1000);
        assert!(parts.len() > 5);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts[parts.len() - 1].fragment);
        let all: Vec<Event> = parts.iter().flat_map(|p| p.events.clone()).collect();
        assert_eq!(all, msg.events);
        assert!(parts.iter().all(|p| p.watch_id == 3));
        // Small responses and single events are never split.
        assert_eq!(fragments(msg.clone(), 1 << 20).len(), 1);
        let one = WatchResponse {
            events: vec![ev(1)],
            ..Default::default()
        };
        assert_eq!(fragments(one, 10).len(), 1);
    }
}

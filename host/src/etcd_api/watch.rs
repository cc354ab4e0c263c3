//! etcd's Watch service, fed by the cache's change feed ([`crate::cache::Changes`]), itself fed
//! by the host's one etcd watch: a node the eviction guard keeps as suspect is not deleted to
//! watchers, and is when the guard lets it go. Each watch is a task forwarding the feed's
//! changes in its range; a start revision the feed no longer has, or a registry resync, cancels
//! the watch with etcd's compaction error, so that clients list again.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto::{
    PbEvent, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::kv::Scope;
use super::stats::{EtcdApiStats, Stat};
use super::{Endpoint, STREAM_QUEUE, status};
use crate::cache::{Change, Compacted, FeedItem, Subscription};

/// etcd's default interval of progress notifications.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

/// Events sent in one response at most.
const BATCH: usize = 1000;

/// etcd's watch filters.
const NO_PUT: i32 = 0;
const NO_DELETE: i32 = 1;

/// etcd's event types.
const PUT: i32 = 0;
const DELETE: i32 = 1;

/// etcd's refusal of a watch id in use on the stream.
const DUPLICATE_ID: &str = "etcdserver: mvcc: duplicate watch ID provided on the WatchStream";

/// The watch id etcd gives answers to a stream-wide progress request.
const STREAM_WIDE: i64 = -1;

/// Watches open per connection, for the bound.
pub(super) struct WatchCounts {
    per_peer: Mutex<HashMap<SocketAddr, usize>>,
    stats: Arc<EtcdApiStats>,
}

/// One watch's place in its connection's count; given back when the watch ends.
struct Slot {
    counts: Arc<WatchCounts>,
    peer: Option<SocketAddr>,
}

impl WatchCounts {
    pub(super) fn new(stats: Arc<EtcdApiStats>) -> Self {
        WatchCounts {
            per_peer: Mutex::default(),
            stats,
        }
    }

    fn take(self: &Arc<Self>, peer: Option<SocketAddr>, limit: usize) -> Option<Slot> {
        if let Some(peer) = peer {
            let mut counts = self.per_peer.lock().unwrap();
            let count = counts.entry(peer).or_default();
            if *count >= limit {
                return None;
            }
            *count += 1;
        }
        self.stats.inc(Stat::Watches);
        Some(Slot {
            counts: self.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.stats.sub(Stat::Watches, 1);
        if let Some(peer) = self.peer {
            let mut counts = self.counts.per_peer.lock().unwrap();
            if let Some(count) = counts.get_mut(&peer) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&peer);
                }
            }
        }
    }
}

/// One watch's options.
struct Watch {
    id: i64,
    /// Changes before this revision are not the watch's (0: it watches from now).
    start: i64,
    scope: Scope,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

type Responses = mpsc::Sender<Result<PbWatchResponse, Status>>;

#[tonic::async_trait]
impl PbWatchService for Endpoint {
    type WatchStream = ReceiverStream<Result<PbWatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.remote_addr();
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(self.clone().serve_watches(peer, requests, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Endpoint {
    /// Serves one Watch stream: its watches run as tasks that end with it.
    async fn serve_watches(
        self,
        peer: Option<SocketAddr>,
        mut requests: Streaming<PbWatchRequest>,
        tx: Responses,
    ) {
        let mut tasks = JoinSet::new();
        let mut watches: HashMap<i64, AbortHandle> = HashMap::new();
        let mut next_id = 0;
        let mut stopping = self.stopping.clone();
        loop {
            let request = tokio::select! {
                request = requests.message() => request,
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            // Finished watches leave the map, so their ids may be used again.
            while tasks.try_join_next().is_some() {}
            watches.retain(|_, task| !task.is_finished());
            let union = match request {
                Ok(Some(request)) => request.request_union,
                Ok(None) | Err(_) => return,
            };
            let response = match union {
                Some(PbWatchRequestUnion::CreateRequest(create)) => {
                    let id = if create.watch_id > 0 {
                        create.watch_id
                    } else {
                        // Ids only grow, as etcd's: a late answer of an ended watch never
                        // reads as a new one's.
                        while watches.contains_key(&next_id) {
                            next_id += 1;
                        }
                        next_id += 1;
                        next_id - 1
                    };
                    let requested = Requested {
                        id,
                        key: create.key,
                        range_end: create.range_end,
                        start_revision: create.start_revision,
                        prev_kv: create.prev_kv,
                        filters: create.filters,
                        progress_notify: create.progress_notify,
                    };
                    match watches.entry(id) {
                        Entry::Occupied(_) => self.cancelled(id, DUPLICATE_ID),
                        Entry::Vacant(vacant) => match self.start_watch(requested, peer) {
                            Ok((watch, subscription, slot)) => {
                                // Sent here, not by the watch's task: answers to creates come
                                // in the order of the creates, as etcd's do.
                                let created = PbWatchResponse {
                                    header: self.header(),
                                    watch_id: id,
                                    created: true,
                                    ..Default::default()
                                };
                                if tx.send(Ok(created)).await.is_err() {
                                    return;
                                }
                                vacant.insert(tasks.spawn(self.clone().forward(
                                    watch,
                                    subscription,
                                    tx.clone(),
                                    slot,
                                )));
                                continue;
                            }
                            Err(response) => response,
                        },
                    }
                }
                Some(PbWatchRequestUnion::CancelRequest(cancel)) => {
                    // etcd answers the cancel of a watch it does not have with nothing.
                    let Some(task) = watches.remove(&cancel.watch_id) else {
                        continue;
                    };
                    task.abort();
                    PbWatchResponse {
                        header: self.header(),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    }
                }
                Some(PbWatchRequestUnion::ProgressRequest(_)) => PbWatchResponse {
                    header: self.header(),
                    watch_id: STREAM_WIDE,
                    ..Default::default()
                },
                None => continue,
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }

    /// Checks and opens a watch, or returns the response that refuses it.
    #[allow(clippy::result_large_err)] // the refusal is the response, sent as it is
    fn start_watch(
        &self,
        request: Requested,
        peer: Option<SocketAddr>,
    ) -> Result<(Watch, Subscription, Slot), PbWatchResponse> {
        let id = request.id;
        let scope = self
            .scope(&request.key, &request.range_end)
            .map_err(|e| self.cancelled(id, e.message()))?;
        let limit = self.settings.max_watches_per_connection;
        let slot = self.watch_counts.take(peer, limit).ok_or_else(|| {
            let e = status::too_many("watches", limit, "etcd_api.max_watches_per_connection");
            self.cancelled(id, e.message())
        })?;
        let subscription = self.changes.subscribe(request.start_revision).map_err(
            |Compacted { complete_from }| PbWatchResponse {
                compact_revision: complete_from,
                ..self.cancelled(id, status::COMPACTED)
            },
        )?;
        let watch = Watch {
            id,
            start: request.start_revision.max(0),
            scope,
            prev_kv: request.prev_kv,
            no_put: request.filters.contains(&NO_PUT),
            no_delete: request.filters.contains(&NO_DELETE),
            progress_notify: request.progress_notify,
        };
        Ok((watch, subscription, slot))
    }

    /// A watch refused or ended by the host.
    fn cancelled(&self, id: i64, reason: &str) -> PbWatchResponse {
        PbWatchResponse {
            header: self.header(),
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        }
    }

    /// Runs one watch (answered `created` already): the changes in its range from its start,
    /// until it is cancelled, its stream ends, or the feed can no longer tell it everything (it
    /// fell behind, or the registry resynced): then it is cancelled as compacted, and the
    /// client lists again.
    async fn forward(self, watch: Watch, subscription: Subscription, tx: Responses, slot: Slot) {
        let _slot = slot;
        let Subscription { backlog, mut live } = subscription;
        if !self.send_events(&watch, &backlog, &tx).await {
            return;
        }
        drop(backlog);
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.tick().await;
        loop {
            let item = tokio::select! {
                item = live.recv() => item,
                _ = progress.tick(), if watch.progress_notify => {
                    let notification = PbWatchResponse {
                        header: self.header(),
                        watch_id: watch.id,
                        ..Default::default()
                    };
                    if tx.send(Ok(notification)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let complete_from = match item {
                Ok(FeedItem::Change(change)) => {
                    let mut changes = vec![change];
                    while changes.len() < BATCH {
                        match live.try_recv() {
                            Ok(FeedItem::Change(change)) => changes.push(change),
                            // Taken by the next receive.
                            _ => break,
                        }
                    }
                    if !self.send_events(&watch, &changes, &tx).await {
                        return;
                    }
                    continue;
                }
                Ok(FeedItem::Reset { revision }) => revision,
                Err(RecvError::Lagged(_)) => self.revision() + 1,
                Err(RecvError::Closed) => return,
            };
            let cancelled = PbWatchResponse {
                compact_revision: complete_from,
                created: false,
                ..self.cancelled(watch.id, status::COMPACTED)
            };
            let _ = tx.send(Ok(cancelled)).await;
            return;
        }
    }

    /// Sends the changes in the watch's range and from its start, in responses of at most
    /// [`BATCH`] events, each built when its turn comes; false once the client is gone.
    async fn send_events(&self, watch: &Watch, changes: &[Arc<Change>], tx: &Responses) -> bool {
        let mut next = 0;
        while next < changes.len() {
            let mut events = Vec::new();
            while next < changes.len() && events.len() < BATCH {
                let change = &changes[next];
                next += 1;
                if change.revision >= watch.start
                    && let Some(event) = self.event(watch, change)
                {
                    events.push(event);
                }
            }
            if events.is_empty() {
                continue;
            }
            let response = PbWatchResponse {
                header: self.header(),
                watch_id: watch.id,
                events,
                ..Default::default()
            };
            if tx.send(Ok(response)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The etcd event of `change`, if the watch wants it.
    fn event(&self, watch: &Watch, change: &Change) -> Option<PbEvent> {
        let key = self.layout.node_key(change.service(), change.node_id());
        if !watch.scope.covers(key.as_bytes(), &*self.layout) {
            return None;
        }
        let prev_kv = if watch.prev_kv {
            change
                .previous
                .as_ref()
                .map(|p| self.key_value_at(key.clone(), p, change.revision))
        } else {
            None
        };
        match &change.current {
            Some(_) if watch.no_put => None,
            None if watch.no_delete => None,
            Some(current) => Some(PbEvent {
                r#type: PUT,
                kv: Some(self.key_value_at(key, current, change.revision)),
                prev_kv,
            }),
            None => Some(PbEvent {
                r#type: DELETE,
                kv: Some(etcd_client::proto::PbKeyValue {
                    key: key.into_bytes(),
                    mod_revision: change.revision,
                    ..Default::default()
                }),
                prev_kv,
            }),
        }
    }
}

/// What a create request asks (its message type is not exported by the client crate, so its
/// fields are taken out where it is matched).
struct Requested {
    id: i64,
    key: Vec<u8>,
    range_end: Vec<u8>,
    start_revision: i64,
    prev_kv: bool,
    filters: Vec<i32>,
    progress_notify: bool,
}

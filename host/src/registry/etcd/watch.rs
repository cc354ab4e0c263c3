//! The prefix watch: one etcd watch per registry, mirrored in memory and fanned out to every
//! [`Registry::watch`](crate::registry::Registry::watch) receiver.
//!
//! The watch starts right after the revision of the list that seeded the mirror and always
//! resumes from the last revision it applied, so a kill and restart of etcd loses and
//! duplicates nothing. When etcd cannot resume (the revision was compacted) the stream answers
//! `canceled` with `compact_revision` set: the registry re-lists, replaces the mirror, and sends
//! every receiver [`WatchEvent::Resync`]. A watch cancelled for any other reason (usually an
//! expired auth token) is re-created after a cheap unary call lets the client re-authenticate
//! (the client refreshes tokens for unary calls only). A stream that may be on a member just
//! taken out of rotation (see [`endpoints`](super::endpoints)) is re-created at once, resuming
//! from the same revision; other streams to a hung etcd end through HTTP/2 pings.
//!
//! Each receiver gets a `Resync` of the mirror first, so that subscribing never races with
//! changes. A receiver that falls behind by a whole queue is not dropped and does not block
//! the others: it is marked lagged and gets a fresh `Resync` as soon as it has room.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::mpsc;

use super::Shared;
use super::connect::MAX_MESSAGE_BYTES;
use super::error::{Deadline, registry_error};
use super::retry::Backoff;
use super::stats::Stats;
use crate::model::{Service, group_services};
use crate::registry::WatchEvent;

/// Capacity of each receiver's queue.
const WATCH_QUEUE: usize = 4096;

/// How often receivers marked lagged are offered their `Resync` when no event comes along to do
/// it: after a burst larger than a queue (a mass lease expiry) etcd may go quiet for hours.
const LAG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A re-list may take this many request timeouts in all (each page has one): a large registry
/// needs several pages, but the watch must not wait on a hung member forever.
const RELIST_TIMEOUTS: u32 = 4;

/// The valid values of a listing, as the mirror keeps them.
pub(crate) struct Listing {
    values: BTreeMap<String, Box<[u8]>>,
    names: BTreeMap<String, usize>,
}

impl Listing {
    /// Keeps the values of `kvs` that `decode` accepts (it counts and logs the others). The
    /// values keep their own buffers: nothing is copied, and the decoded form lives only
    /// while one value is checked.
    pub(crate) fn new(
        kvs: Vec<(String, Vec<u8>)>,
        decode: impl Fn(&str, &[u8]) -> Option<Service>,
    ) -> Listing {
        let mut listing = Listing {
            values: BTreeMap::new(),
            names: BTreeMap::new(),
        };
        for (key, value) in kvs {
            if let Some(service) = decode(&key, &value) {
                *listing.names.entry(service.name).or_default() += 1;
                listing.values.insert(key, value.into_boxed_slice());
            }
        }
        listing
    }
}

/// The mirror of the registry and the receivers of its changes.
///
/// The mirror keeps each key's value as etcd sent it (checked to decode when stored), not the
/// decoded [`Service`]: the JSON is several times smaller, and only the rare paths need it
/// decoded (a resync, a delete naming its nodes), while every put arrives decoded anyway.
#[derive(Default)]
pub(crate) struct Hub {
    mirror: BTreeMap<String, Box<[u8]>>,
    /// How many mirrored keys each service name has: `list_services` reads this, so answering
    /// it costs the number of services, not of nodes.
    names: BTreeMap<String, usize>,
    revision: i64,
    subscribers: Vec<Subscriber>,
    closed: bool,
}

struct Subscriber {
    tx: mpsc::Sender<WatchEvent>,
    lagged: bool,
}

impl Hub {
    /// Replaces the mirror (after a list) without telling anyone.
    pub(crate) fn reset(&mut self, listing: Listing, revision: i64) {
        self.mirror = listing.values;
        self.names = listing.names;
        self.revision = revision;
    }

    /// The names of the mirrored services, sorted.
    pub(crate) fn service_names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    fn insert(&mut self, key: &str, value: &[u8], service: &Service) {
        *self.names.entry(service.name.clone()).or_default() += 1;
        if let Some(old) = self.mirror.insert(key.to_string(), value.into()) {
            self.forget(&old);
        }
    }

    fn remove(&mut self, key: &str) -> Option<Service> {
        let old = self.mirror.remove(key)?;
        self.forget(&old)
    }

    /// Decodes a value leaving the mirror and drops its name's count.
    fn forget(&mut self, value: &[u8]) -> Option<Service> {
        // Stored values were decoded once already, so this cannot fail; if it somehow did,
        // the value is dropped silently rather than taking the watch down.
        let old = Service::decode(value).ok()?;
        self.forget_name(&old.name);
        Some(old)
    }

    fn forget_name(&mut self, name: &str) {
        if let Some(count) = self.names.get_mut(name) {
            *count -= 1;
            if *count == 0 {
                self.names.remove(name);
            }
        }
    }

    /// Every mirrored service, grouped by version.
    pub(crate) fn services(&self) -> Vec<Service> {
        group_services(self.mirror.values().filter_map(|v| Service::decode(v).ok()))
    }

    fn snapshot(&self) -> WatchEvent {
        snapshot(&self.mirror, self.revision)
    }

    /// A new receiver, primed with the mirror as a `Resync`. After shutdown the receiver ends
    /// at once.
    pub(crate) fn subscribe(&mut self) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        if !self.closed {
            let _ = tx.try_send(self.snapshot());
            self.subscribers.push(Subscriber { tx, lagged: false });
        }
        rx
    }

    fn publish(&mut self, event: WatchEvent) {
        let mut resync = None;
        let mut i = 0;
        while i < self.subscribers.len() {
            let sub = &mut self.subscribers[i];
            if sub.tx.is_closed() {
                self.subscribers.swap_remove(i);
                continue;
            }
            if sub.lagged {
                // The snapshot already contains this event.
                if sub.tx.capacity() > 0 {
                    let snap = resync.get_or_insert_with(|| snapshot(&self.mirror, self.revision));
                    if self.subscribers[i].tx.try_send(snap.clone()).is_ok() {
                        self.subscribers[i].lagged = false;
                    }
                }
            } else if sub.tx.try_send(event.clone()).is_err() {
                tracing::warn!("a registry watcher fell behind; it will get a full resync");
                sub.lagged = true;
            }
            i += 1;
        }
    }

    /// Offers every lagged receiver with room its `Resync` now, without waiting for an event.
    fn flush_lagged(&mut self) {
        if !self.subscribers.iter().any(|s| s.lagged) {
            return;
        }
        let snapshot = self.snapshot();
        self.subscribers.retain(|s| !s.tx.is_closed());
        for sub in self.subscribers.iter_mut().filter(|s| s.lagged) {
            if sub.tx.capacity() > 0 && sub.tx.try_send(snapshot.clone()).is_ok() {
                sub.lagged = false;
            }
        }
    }

    /// Sends everyone a `Resync` of the (new) mirror.
    fn resync_all(&mut self) {
        let snapshot = self.snapshot();
        self.subscribers.retain(|s| !s.tx.is_closed());
        for sub in &mut self.subscribers {
            sub.lagged = sub.tx.try_send(snapshot.clone()).is_err();
        }
    }

    /// Ends every receiver (shutdown).
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.subscribers.clear();
    }

    /// Applies a put of `value` at `key`, `service` being its decoding: `None` when the value
    /// is malformed, which removes the node it may have replaced (it is no longer a valid node
    /// in etcd either).
    fn put(&mut self, key: &str, value: &[u8], service: Option<Service>, revision: i64) {
        self.revision = revision;
        match service {
            Some(service) => {
                self.insert(key, value, &service);
                for node in &service.nodes {
                    self.publish(WatchEvent::Put {
                        service: service.with_single_node(node),
                        revision,
                    });
                }
            }
            None => self.delete(key, revision),
        }
    }

    fn delete(&mut self, key: &str, revision: i64) {
        self.revision = revision;
        if let Some(old) = self.remove(key) {
            for node in &old.nodes {
                self.publish(WatchEvent::Delete {
                    service: old.name.clone(),
                    node_id: node.id.clone(),
                    previous: old.with_single_node(node),
                    revision,
                });
            }
        }
    }
}

/// The whole mirror as a `Resync`, grouped by service and version.
fn snapshot(mirror: &BTreeMap<String, Box<[u8]>>, revision: i64) -> WatchEvent {
    // Every stored value decoded when it was stored; `ok()` only keeps a surprise from
    // crashing the watch.
    WatchEvent::Resync {
        services: group_services(mirror.values().filter_map(|v| Service::decode(v).ok())),
        revision,
    }
}

/// Why a watch stream stopped.
enum Stopped {
    /// etcd compacted past our revision: re-list.
    Compacted(i64),
    /// etcd cancelled the watch for another reason (e.g. an invalid auth token), in its words.
    Canceled(String),
    /// The stream ended or failed (etcd killed, connection lost, pings unanswered): a failure.
    Lost(String),
    /// We dropped the stream: an endpoint left rotation and it may have been on it.
    Moved,
}

/// Runs until shutdown, starting after `revision`.
pub(crate) async fn run(shared: Arc<Shared>, mut revision: i64) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut endpoint_removed = shared.endpoint_removed.subscribe();
    let mut backoff = Backoff::new(shared.config.retry_backoff_max);
    let request_timeout = shared.config.request_timeout;
    let prefix = shared.config.key_prefix().to_string();
    let mut started = false;
    loop {
        if shared.shutting_down() {
            return;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_progress_notify()
            .with_start_revision(revision + 1);
        // Marked seen before the create: a removal during it may mean the stream went to that
        // member, and is re-created once more.
        endpoint_removed.mark_unchanged();
        let created = Deadline::after(request_timeout)
            .bound("watch", async {
                let mut client = shared
                    .client
                    .watch_client()
                    .max_decoding_message_size(MAX_MESSAGE_BYTES);
                client
                    .watch(prefix.clone(), Some(options))
                    .await
                    .map_err(|e| registry_error("watch", &e))
            })
            .await;
        let mut stream = match created {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the registry watch");
                shared.contact.record_failure();
                shared.pause(&mut backoff).await;
                continue;
            }
        };
        Stats::bump(&shared.stats.watch_starts);
        if started {
            Stats::bump(&shared.stats.watch_restarts);
        }
        started = true;

        let stopped = loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return,
                // The stream may be on that member, hung: silent, while the mirror goes stale.
                _ = endpoint_removed.changed() => break Stopped::Moved,
                msg = stream.message() => msg,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => break Stopped::Lost("stream ended".into()),
                Err(e) => break Stopped::Lost(e.to_string()),
            };
            shared.contact.touch();
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    break Stopped::Compacted(resp.compact_revision());
                }
                break Stopped::Canceled(resp.cancel_reason().to_string());
            }
            if resp.created() {
                shared.contact.set_watch_connected(true);
                backoff.reset();
                continue;
            }
            if resp.events().is_empty() {
                // A progress notification: every event up to the header's revision was sent.
                if let Some(header) = resp.header() {
                    revision = revision.max(header.revision());
                }
                continue;
            }
            let mut deleted = Vec::new();
            let mut put = Vec::new();
            {
                let mut hub = shared.hub.lock().unwrap();
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let rev = kv.mod_revision();
                    match event.event_type() {
                        EventType::Put => {
                            hub.put(&key, kv.value(), shared.decode(&key, kv.value()), rev);
                            put.push(kv);
                        }
                        EventType::Delete => {
                            hub.delete(&key, rev);
                            deleted.push(key);
                        }
                    }
                    revision = revision.max(rev);
                }
            }
            deleted.extend(overwritten(&shared, &put));
            request_repairs(&shared, deleted);
        };
        shared.contact.set_watch_connected(false);

        match stopped {
            Stopped::Compacted(compacted) => {
                tracing::warn!(revision, compacted, "watch revision compacted; re-listing");
                match relist(&shared).await {
                    Some(listed) => revision = listed,
                    None => shared.pause(&mut backoff).await,
                }
            }
            Stopped::Canceled(reason) => {
                tracing::warn!(%reason, "etcd cancelled the registry watch; re-creating it");
                // etcd says why only in words (an expired or invalid auth token is the usual
                // reason), and words are no contract. So every cancel other than a compaction
                // is treated as one for the token: a unary call goes through the client's
                // token refresh, so the next watch carries a valid token (concurrent calls
                // share the one Authenticate). For any other reason that costs one count-only
                // read, and the backoff keeps a watch cancelled again and again from spinning
                // (reset when a watch is created: the first pause after one is 25 ms
                // at most).
                let _ = shared
                    .call("token_refresh", |mut c| {
                        let prefix = prefix.clone();
                        async move {
                            c.get(
                                prefix,
                                Some(GetOptions::new().with_prefix().with_count_only()),
                            )
                            .await
                        }
                    })
                    .await;
                shared.pause(&mut backoff).await;
            }
            Stopped::Moved => {
                tracing::info!(
                    revision,
                    "an endpoint left rotation; resuming the watch elsewhere"
                );
            }
            Stopped::Lost(reason) => {
                shared.contact.record_failure();
                tracing::warn!(%reason, revision, "registry watch lost; resuming");
                shared.pause(&mut backoff).await;
            }
        }
    }
}

/// Runs until shutdown: resyncs lagged receivers every [`LAG_FLUSH_INTERVAL`], so one that fell
/// behind at the end of a burst catches up even if no further event is published.
pub(crate) async fn flush_lagged(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(LAG_FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => shared.hub.lock().unwrap().flush_lagged(),
        }
    }
}

/// Lists the prefix, replaces the mirror, and sends every receiver a `Resync`. Returns the
/// list's revision, from which the watch continues. The whole list is bounded by
/// [`RELIST_TIMEOUTS`] request timeouts, so a member that hangs mid-list cannot hold the watch
/// down page after page.
async fn relist(shared: &Shared) -> Option<i64> {
    let deadline = Deadline::after(shared.config.request_timeout * RELIST_TIMEOUTS);
    let (kvs, revision) = match shared.list_prefix("relist", deadline).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "re-listing the registry failed; will retry");
            return None;
        }
    };
    let listing = Listing::new(kvs, |key, value| shared.decode(key, value));
    // Every owned key is looked at, not only the missing ones: the events lost to the
    // compaction may have rewritten some. One transaction reads a batch of them.
    let owned: Vec<String> = shared.owned.lock().unwrap().keys().cloned().collect();
    Stats::bump(&shared.stats.resyncs);
    {
        let mut hub = shared.hub.lock().unwrap();
        hub.reset(listing, revision);
        hub.resync_all();
    }
    request_repairs(shared, owned);
    Some(revision)
}

/// The owned keys among `puts` that now hold something other than this host's value on its
/// current lease: a put by hand (on no lease), another host's forced registration. Puts of a
/// lease already known to hold the key in conflict are not looked at again. This host's own
/// puts arriving late (an older value, a lease just replaced) are looked at too, and found fine
/// at the cost of one read.
fn overwritten(shared: &Shared, puts: &[&KeyValue]) -> Vec<String> {
    if puts.is_empty() {
        return Vec::new();
    }
    let lease = shared.lease.id();
    let owned = shared.owned.lock().unwrap();
    puts.iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            let ours = owned.get(key.as_ref())?;
            let fine = Some(kv.lease()) == lease && kv.value() == ours.value.as_slice();
            let known = ours.conflict == Some(kv.lease());
            (!fine && !known).then(|| key.into_owned())
        })
        .collect()
}

/// Asks the lease task to put back those of `keys` this host still owns.
fn request_repairs(shared: &Shared, keys: Vec<String>) {
    if keys.is_empty() || shared.shutting_down() {
        return;
    }
    let owned: Vec<String> = {
        let owned = shared.owned.lock().unwrap();
        keys.into_iter().filter(|k| owned.contains_key(k)).collect()
    };
    if !owned.is_empty() {
        tracing::info!(keys = ?owned, "checking owned keys etcd shows deleted or changed");
        shared.lease.request_repair(owned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;

    fn svc(name: &str, node: &str) -> Service {
        Service {
            name: name.into(),
            version: "1".into(),
            nodes: vec![Node {
                id: node.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A listing of `key` holding `service`, or junk.
    fn listing(key: &str, service: Service) -> Listing {
        Listing::new(vec![(key.to_string(), service.encode())], |_, v| {
            Service::decode(v).ok()
        })
    }

    impl Hub {
        fn contains(&self, key: &str) -> bool {
            self.mirror.contains_key(key)
        }

        /// A put of `service` as etcd carries it, or of junk (`None`).
        fn put_service(&mut self, key: &str, service: Option<Service>, revision: i64) {
            let value = service.as_ref().map_or(b"junk".to_vec(), Service::encode);
            self.put(key, &value, service, revision);
        }
    }

    #[test]
    fn a_listing_keeps_the_values_that_decode() {
        let kvs = vec![
            ("k/a".to_string(), svc("s", "a").encode()),
            ("k/b".to_string(), b"{not json".to_vec()),
            ("k/c".to_string(), svc("t", "c").encode()),
        ];
        let rejected = std::cell::Cell::new(0);
        let listing = Listing::new(kvs, |_, v| {
            let decoded = Service::decode(v).ok();
            rejected.set(rejected.get() + usize::from(decoded.is_none()));
            decoded
        });
        let mut hub = Hub::default();
        hub.reset(listing, 1);
        assert_eq!(rejected.get(), 1);
        assert!(hub.contains("k/a") && !hub.contains("k/b") && hub.contains("k/c"));
        assert_eq!(hub.service_names().collect::<Vec<_>>(), ["s", "t"]);
        let WatchEvent::Resync { services, .. } = hub.snapshot() else {
            panic!("a snapshot is a resync");
        };
        assert_eq!(services, [svc("s", "a"), svc("t", "c")]);
    }

    #[test]
    fn receivers_start_with_the_mirror_and_see_changes() {
        let mut hub = Hub::default();
        hub.reset(listing("k/a", svc("s", "a")), 5);
        let mut rx = hub.subscribe();
        hub.put_service("k/b", Some(svc("s", "b")), 6);
        hub.put_service("k/a", None, 7); // overwritten by junk: the node is gone
        hub.delete("k/missing", 8); // unknown key: nothing to say
        let WatchEvent::Resync { services, revision } = rx.try_recv().unwrap() else {
            panic!("first event is the snapshot");
        };
        assert_eq!(
            (services.len(), services[0].nodes.len(), revision),
            (1, 1, 5)
        );
        assert!(matches!(
            rx.try_recv().unwrap(),
            WatchEvent::Put { revision: 6, .. }
        ));
        assert!(
            matches!(rx.try_recv().unwrap(), WatchEvent::Delete { node_id, revision: 7, .. } if node_id == "a")
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_lagging_receiver_gets_a_resync_and_does_not_block_others() {
        let mut hub = Hub::default();
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        for i in 0..WATCH_QUEUE + 10 {
            hub.put_service(
                &format!("k/{i}"),
                Some(svc("s", &i.to_string())),
                i as i64 + 1,
            );
            while fast.try_recv().is_ok() {}
        }
        // The slow receiver's queue is full; it drains it and then gets one snapshot.
        let mut drained = 0;
        while slow.try_recv().is_ok() {
            drained += 1;
        }
        assert_eq!(drained, WATCH_QUEUE);
        hub.put_service("k/last", Some(svc("s", "last")), 99_999);
        let WatchEvent::Resync { services, revision } = slow.try_recv().unwrap() else {
            panic!("a lagging receiver is resynced");
        };
        assert_eq!(services[0].nodes.len(), WATCH_QUEUE + 11);
        assert_eq!(revision, 99_999);
        hub.put_service("k/after", Some(svc("s", "after")), 100_000);
        assert!(matches!(
            slow.try_recv().unwrap(),
            WatchEvent::Put {
                revision: 100_000,
                ..
            }
        ));
    }

    #[test]
    fn a_lagging_receiver_is_resynced_without_a_further_event() {
        let mut hub = Hub::default();
        let mut slow = hub.subscribe();
        for i in 0..WATCH_QUEUE + 10 {
            hub.put_service(
                &format!("k/{i}"),
                Some(svc("s", &i.to_string())),
                i as i64 + 1,
            );
        }
        while slow.try_recv().is_ok() {}
        // etcd has gone quiet: nothing is published, yet the flush delivers the end of the burst.
        hub.flush_lagged();
        let WatchEvent::Resync { services, revision } = slow.try_recv().unwrap() else {
            panic!("a lagging receiver is resynced by the flush");
        };
        assert_eq!(services[0].nodes.len(), WATCH_QUEUE + 10);
        assert_eq!(revision, (WATCH_QUEUE + 10) as i64);
        hub.flush_lagged();
        assert!(slow.try_recv().is_err(), "resynced once, not again");
    }

    #[test]
    fn service_names_follow_puts_overwrites_deletes_and_resets() {
        let mut hub = Hub::default();
        hub.reset(listing("k/a", svc("s", "a")), 1);
        hub.put_service("k/b", Some(svc("s", "b")), 2);
        hub.put_service("k/c", Some(svc("t", "c")), 3);
        let names = |hub: &Hub| hub.service_names().map(String::from).collect::<Vec<_>>();
        assert_eq!(names(&hub), ["s", "t"]);
        hub.delete("k/a", 4);
        assert_eq!(names(&hub), ["s", "t"], "s still has k/b");
        hub.put_service("k/b", Some(svc("u", "b")), 5); // the key now holds another service
        assert_eq!(names(&hub), ["t", "u"]);
        hub.put_service("k/c", None, 6); // junk: t's only node is gone
        assert_eq!(names(&hub), ["u"]);
        hub.reset(listing("k/z", svc("z", "z")), 7);
        assert_eq!(names(&hub), ["z"]);
    }

    #[test]
    fn closing_ends_every_receiver() {
        let mut hub = Hub::default();
        let mut rx = hub.subscribe();
        hub.close();
        assert!(matches!(rx.try_recv(), Ok(WatchEvent::Resync { .. })));
        assert!(matches!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        let mut late = hub.subscribe();
        assert!(matches!(
            late.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }
}

//! Accepting connections and keeping them within bounds: the HTTP server under the API's
//! router. It replaces `axum::serve`, which accepts without limit and lets a connection sit
//! forever: 1,100 silent connections used every descriptor of a host limited to 1,024, and it
//! stopped answering without a word.
//!
//! - **Connection limit**: at most `max_connections` at once. When full, a new connection takes
//!   the place of one that can give it up (one that never sent a request first, then an idle
//!   keep-alive one, then one whose client has not read its answer for [`STALLED`]; oldest
//!   first), as nginx reuses idle connections under pressure: silent connections and unread
//!   answers cannot keep a client with a request out. If every connection has a request in
//!   flight that is moving, the new one is closed at once. Both are counted, and logged at
//!   most every 10 s.
//! - **Descriptor exhaustion**: `accept` failing with EMFILE or ENFILE backs off for 50 ms
//!   (no spinning) and closes up to 32 connections that can give their place up, chosen as
//!   above, to free descriptors; connections already open keep being served. The default
//!   limit leaves [`RESERVED_DESCRIPTORS`] of the process's RLIMIT_NOFILE to everything else,
//!   so that this stays the exception.
//! - **Timeouts**: header-read and idle on reads, write progress on writes ([`timeouts`]),
//!   and a request's body.
//! - **Head limits**: 16 KiB of head (431), 8 KiB of URI (414); hyper's own answers to heads it
//!   cannot parse get the API's JSON body ([`parse_errors`]).
//! - **Shutdown**: stop accepting, close connections with nothing in flight or an answer left
//!   unread, let the other requests in flight finish.

mod activity;
mod parse_errors;
mod timeouts;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use self::activity::{Activity, TrackedBody};
use self::parse_errors::JsonParseErrors;
use self::timeouts::{Deadlines, TimedBody};
use super::ApiError;

/// Default time a client has to send a complete request head (and again for its body): a
/// local client sends its head in one write, within milliseconds; 10 s leaves room for a
/// loaded node while a silent or dripping connection gives its descriptor back soon.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a kept-alive connection may wait for its next request. Clients keep idle
/// connections for reuse (Go's transport for 90 s, closing them itself past that); 60 s keeps
/// most of that reuse, and a closed idle connection costs a client one reconnect.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time the socket may accept no byte of an answer (its client reads nothing) before
/// the connection is closed: a local client reads its answer as it comes, emptying the
/// socket's buffers within milliseconds; one that has read nothing for 10 s asked and left.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted header-read timeouts: under 100 ms a loaded node's own clients would be cut off;
/// over 5 minutes a silent connection is as good as never closed.
pub const HEADER_READ_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(300);

/// Accepted idle timeouts: from 100 ms (keep-alive all but off) to an hour.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);

/// Accepted write timeouts: the same bounds as the header-read timeout, for the same reasons.
pub const WRITE_TIMEOUT_RANGE: RangeInclusive<Duration> = HEADER_READ_TIMEOUT_RANGE;

/// Accepted connection limits: past a million, the kernel's limits bind first.
pub const MAX_CONNECTIONS_RANGE: RangeInclusive<u64> = 1..=1_000_000;

/// Descriptors of RLIMIT_NOFILE the default connection limit leaves to everything else: etcd's
/// connections, the policy file watch, snapshot and artifact files, the runtime's own, and the
/// connections accepted over the limit only to be closed. The host uses a few dozen.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// Ceiling of the default connection limit: a host serves the services of one node, which need
/// a few hundred connections at most; past a few thousand, more is an attack or a leak.
pub const DEFAULT_MAX_CONNECTIONS_CAP: u64 = 4096;

/// Largest request head (request line and headers): hyper answers 431 past it. A request's
/// data is in its body; its head is a path and a few headers.
const MAX_HEAD: usize = 16 * 1024;

/// Most headers in a request head: hyper's fixed default, answered 431 past it.
const MAX_HEADERS: usize = 100;

/// Largest request URI, answered 414 past it (nginx's default line limit).
const MAX_URI: usize = 8 * 1024;

/// Pause of the accept loop when `accept` fails for want of descriptors or memory: long enough
/// not to spin on an error that persists, short enough that a freed descriptor is used soon.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Connections with no request in flight closed when `accept` runs out of descriptors, so that
/// the connections waiting in the backlog get in at more than one per back-off (nginx closes up
/// to 32 idle connections at a time when it runs out of connections).
const CLOSED_FOR_DESCRIPTORS: usize = 32;

/// How long a connection's answer must have waited for its client to read before the
/// connection counts as abandoned: at the limit it gives its place to a new connection, at
/// shutdown it is closed at once. A client that reads takes its answer out of the socket's
/// buffers as it comes, so a second without room is no client at work; the write timeout
/// closes such a connection anyway, this only makes room sooner.
pub const STALLED: Duration = Duration::from_secs(1);

/// How long a connection admitted in place of another waits for that one to close.
const REPLACE_WAIT: Duration = Duration::from_secs(1);

/// Interval of the warnings about refused and replaced connections and failing accepts.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds of the server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to receive a request head, from accept or from its first byte.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time the socket may accept no byte of what is written to it.
    pub write_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// The default connection limit: the process's RLIMIT_NOFILE (soft) less
/// [`RESERVED_DESCRIPTORS`] (but at least half of it), at most
/// [`DEFAULT_MAX_CONNECTIONS_CAP`]. With the common limit of 1,024 that is 896.
pub fn default_max_connections() -> usize {
    let descriptors = descriptor_limit().unwrap_or(1024);
    let limit = descriptors
        .saturating_sub(RESERVED_DESCRIPTORS)
        .max(descriptors / 2)
        .clamp(1, DEFAULT_MAX_CONNECTIONS_CAP);
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// The soft RLIMIT_NOFILE, or `None` if unlimited or unknown.
fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given and touches nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The server's counters (plain atomics, read at scrape time).
#[derive(Debug, Default)]
pub struct ConnectionStats {
    accepted: AtomicU64,
    open: AtomicU64,
    refused: AtomicU64,
    replaced: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    write_timeouts: AtomicU64,
    accept_errors_descriptors: AtomicU64,
    accept_errors_other: AtomicU64,
}

/// A copy of [`ConnectionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStatsSnapshot {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections closed at once: at the limit with every connection busy.
    pub refused: u64,
    /// Connections closed to make room for a new one at the limit (or for a descriptor): with
    /// no request in flight, or an answer their client did not read for [`STALLED`].
    pub replaced: u64,
    /// Connections closed for not sending a request head in time.
    pub header_timeouts: u64,
    /// Kept-alive connections closed for idleness.
    pub idle_timeouts: u64,
    /// Connections closed because their client read nothing of an answer for the write
    /// timeout.
    pub write_timeouts: u64,
    /// `accept` failures for want of descriptors (EMFILE, ENFILE).
    pub accept_errors_descriptors: u64,
    /// Other `accept` failures that paused accepting (ENOBUFS, ENOMEM, ...).
    pub accept_errors_other: u64,
}

impl ConnectionStats {
    /// The counters now.
    pub fn snapshot(&self) -> ConnectionStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConnectionStatsSnapshot {
            accepted: get(&self.accepted),
            open: get(&self.open),
            refused: get(&self.refused),
            replaced: get(&self.replaced),
            header_timeouts: get(&self.header_timeouts),
            idle_timeouts: get(&self.idle_timeouts),
            write_timeouts: get(&self.write_timeouts),
            accept_errors_descriptors: get(&self.accept_errors_descriptors),
            accept_errors_other: get(&self.accept_errors_other),
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then stops
/// accepting, closes connections with nothing in flight and returns once the others have
/// answered.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout = ?limits.header_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        write_timeout = ?limits.write_timeout,
        "HTTP connection limits"
    );
    let mut builder = http1::Builder::new();
    // Off: `timeouts` keeps a header-read and an idle timeout of its own (see there why).
    builder.header_read_timeout(None).max_header_size(MAX_HEAD);
    let server = Arc::new(Server {
        builder,
        router,
        limits,
        stats,
        open: Open::new(limits.max_connections),
    });
    let (closing_tx, closing) = watch::channel(false);
    let mut warnings = Warnings::default();
    // Owned here, so that a server dropped before its connections closed (its caller stopped
    // waiting for the drain) takes them with it rather than leaving handlers running.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            // Reaps closed connections, which the set would otherwise keep until the end.
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // The connection failed before it was accepted: nothing to do about it.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                server.accept_failed(&e, &mut warnings);
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        ConnectionStats::count(&server.stats.accepted);
        let admission = match server.open.permits.clone().try_acquire_owned() {
            Ok(permit) => Admission::Now(permit),
            Err(_) => match server.open.close_one_replaceable() {
                Some(place) => {
                    ConnectionStats::count(&server.stats.replaced);
                    if let Some(n) = warnings.replaced.hit() {
                        tracing::warn!(
                            "at the connection limit ({}): closed {n} connection(s) with no \
                             request in flight or an answer left unread to admit new ones \
                             (logged at most every {LOG_EVERY:?})",
                            limits.max_connections
                        );
                    }
                    Admission::Replacing(place)
                }
                None => {
                    ConnectionStats::count(&server.stats.refused);
                    if let Some(n) = warnings.refused.hit() {
                        tracing::warn!(
                            "at the connection limit ({}) with a request in flight on every \
                             connection, its answer read: refused {n} new connection(s) \
                             (logged at most every {LOG_EVERY:?})",
                            limits.max_connections
                        );
                    }
                    continue;
                }
            },
        };
        connections.spawn(
            server
                .clone()
                .connection(stream, admission, closing.clone()),
        );
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Whether an `accept` error concerns only the connection being accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// What the accept loop and every connection share.
struct Server {
    builder: http1::Builder,
    router: axum::Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    open: Open,
}

/// How a connection got its place.
enum Admission {
    /// A free place.
    Now(OwnedSemaphorePermit),
    /// The place of a connection asked to close, handed over when it has closed.
    Replacing(Handoff),
}

impl Server {
    /// Counts and logs a failed `accept`; when descriptors ran out, asks connections that can
    /// give their place up to give their descriptors back.
    fn accept_failed(&self, e: &std::io::Error, warnings: &mut Warnings) {
        let descriptors = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        if descriptors {
            ConnectionStats::count(&self.stats.accept_errors_descriptors);
            for _ in 0..CLOSED_FOR_DESCRIPTORS {
                // Nobody waits for these places: they go back to the pool.
                if self.open.close_one_replaceable().is_none() {
                    break;
                }
                ConnectionStats::count(&self.stats.replaced);
            }
        } else {
            ConnectionStats::count(&self.stats.accept_errors_other);
        }
        if let Some(n) = warnings.accept.hit() {
            let open = self.stats.open.load(Ordering::Relaxed);
            let cause = if descriptors {
                "out of file descriptors: lower max_connections or raise RLIMIT_NOFILE"
            } else {
                "pausing accepts"
            };
            tracing::warn!(
                "accept failed {n} time(s) ({e}; {open} connections open): {cause} (logged \
                 at most every {LOG_EVERY:?})"
            );
        }
    }

    /// Serves one connection until it closes, or until it is asked to (shutdown, or room for
    /// a new connection) and has no request in flight or an answer left unread.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        admission: Admission,
        mut closing: watch::Receiver<bool>,
    ) {
        let permit = match admission {
            Admission::Now(permit) => permit,
            Admission::Replacing(place) => match tokio::time::timeout(REPLACE_WAIT, place).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    ConnectionStats::count(&self.stats.refused);
                    return;
                }
            },
        };
        let activity = Arc::new(Activity::default());
        let registered = self.open.register(activity.clone(), &self.stats, permit);
        let io = Deadlines::new(
            JsonParseErrors::new(stream, activity.clone()),
            activity.clone(),
            self.limits,
            self.stats.clone(),
        );
        let service = Api {
            router: self.router.clone(),
            activity: activity.clone(),
            body_timeout: self.limits.header_read_timeout,
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection closed: {e}");
                    }
                    return;
                }
                _ = closing.wait_for(|closing| *closing), if !draining => {}
                () = registered.close.notified(), if !draining => {}
            }
            // Asked to close. With nothing in flight, now (a head half received is dropped
            // with it), and with an answer its client does not read, now too (waiting for it
            // is waiting for the write timeout); otherwise once the request in flight is
            // answered.
            if can_give_up(&activity) {
                return;
            }
            conn.as_mut().graceful_shutdown();
            draining = true;
        }
    }
}

/// The API's router as hyper's service, with the head limits hyper does not check, the body
/// deadline, and the bookkeeping of requests in flight.
#[derive(Clone)]
struct Api {
    router: axum::Router,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Api {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.start();
        let uri_len = request
            .uri()
            .path_and_query()
            .map_or(0, |p| p.as_str().len());
        let request = request.map(|body| Body::new(TimedBody::new(body, self.body_timeout)));
        let router = self.router.clone();
        Box::pin(async move {
            let response = if uri_len > MAX_URI {
                ApiError::new(
                    StatusCode::URI_TOO_LONG,
                    "uri_too_long",
                    format!("the request URI is over {} KiB", MAX_URI / 1024),
                )
                .into_response()
            } else {
                match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            };
            Ok(response.map(|body| TrackedBody::new(body, in_flight)))
        })
    }
}

/// Whether a connection can be closed at once without cutting off a client at work: it has
/// no request in flight, or its client has not read its answer for [`STALLED`].
fn can_give_up(activity: &Activity) -> bool {
    !activity.busy() || activity.write_stalled_for(STALLED)
}

/// The open connections: a place each (a semaphore permit), and a handle on each to ask it to
/// close, by age.
struct Open {
    permits: Arc<Semaphore>,
    handles: Mutex<BTreeMap<u64, Arc<Handle>>>,
    next_id: AtomicU64,
}

/// What the accept loop can see and do of one open connection.
struct Handle {
    activity: Arc<Activity>,
    close: Notify,
    asked: AtomicBool,
    /// The connection admitted in this one's place, which gets its permit when it closes.
    successor: Mutex<Option<oneshot::Sender<OwnedSemaphorePermit>>>,
}

/// A place (permit) to be handed over by a connection asked to close. Handed over rather than
/// released to the semaphore: released, it could be taken by a connection accepted meanwhile,
/// leaving the one admitted in its stead to wait in vain.
type Handoff = oneshot::Receiver<OwnedSemaphorePermit>;

/// An open connection's entry; dropping it removes the entry.
struct Registered<'a> {
    open: &'a Open,
    stats: &'a ConnectionStats,
    id: u64,
    handle: Arc<Handle>,
    permit: Option<OwnedSemaphorePermit>,
}

impl std::ops::Deref for Registered<'_> {
    type Target = Handle;

    fn deref(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        let successor = self
            .handle
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(successor), Some(permit)) = (successor, self.permit.take()) {
            // A successor that gave up waiting drops the permit back into the pool.
            let _ = successor.send(permit);
        }
    }
}

impl Open {
    fn new(max: usize) -> Self {
        Open {
            permits: Arc::new(Semaphore::new(max)),
            handles: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Handle>>> {
        // The map stays consistent whatever panicked while holding it.
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register<'a>(
        &'a self,
        activity: Arc<Activity>,
        stats: &'a ConnectionStats,
        permit: OwnedSemaphorePermit,
    ) -> Registered<'a> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            activity,
            close: Notify::new(),
            asked: AtomicBool::new(false),
            successor: Mutex::default(),
        });
        self.lock().insert(id, handle.clone());
        stats.open.fetch_add(1, Ordering::Relaxed);
        Registered {
            open: self,
            stats,
            id,
            handle,
            permit: Some(permit),
        }
    }

    /// Asks the connection that can best give its place up to close: the oldest that never
    /// sent a request, else the oldest with no request in flight, else the oldest whose
    /// client has not read its answer for [`STALLED`]; its place once it has closed. `None` if
    /// there is none.
    fn close_one_replaceable(&self) -> Option<Handoff> {
        let handles = self.lock();
        let candidates = || {
            handles
                .values()
                .filter(|h| !h.asked.load(Ordering::Relaxed))
        };
        let chosen = candidates()
            .find(|h| !h.activity.busy() && !h.activity.served())
            .or_else(|| candidates().find(|h| !h.activity.busy()))
            .or_else(|| candidates().find(|h| can_give_up(&h.activity)));
        let handle = chosen?;
        let (successor, place) = oneshot::channel();
        *handle.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(successor);
        handle.asked.store(true, Ordering::Relaxed);
        // A stored permit: the connection sees it even if it is not waiting right now.
        handle.close.notify_one();
        Some(place)
    }
}

/// The accept loop's throttled warnings.
#[derive(Default)]
struct Warnings {
    refused: Throttled,
    replaced: Throttled,
    accept: Throttled,
}

/// An event logged at most once per [`LOG_EVERY`], with how many happened since.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    /// Counts an event; `Some(events since the last log)` when it is time to log.
    fn hit(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(open: &Open) -> OwnedSemaphorePermit {
        open.permits.clone().try_acquire_owned().unwrap()
    }

    /// The place of a connection asked to close goes to the one admitted for it, not to a
    /// connection accepted in between (which once left the admitted one to time out).
    #[tokio::test]
    async fn a_closed_connections_place_goes_to_its_successor() {
        let open = Open::new(1);
        let stats = ConnectionStats::default();
        let silent = open.register(Arc::new(Activity::default()), &stats, place(&open));
        let handoff = open
            .close_one_replaceable()
            .expect("a silent connection gives way");
        drop(silent);
        assert!(
            open.permits.clone().try_acquire_owned().is_err(),
            "a newcomer cannot take the place meanwhile"
        );
        let permit = handoff.await.expect("the successor gets the place");
        drop(permit);
        assert_eq!(open.permits.available_permits(), 1);

        // A successor that gave up leaves the place to the pool.
        let silent = open.register(Arc::new(Activity::default()), &stats, place(&open));
        drop(open.close_one_replaceable());
        drop(silent);
        assert_eq!(open.permits.available_permits(), 1);
    }

    #[test]
    fn the_default_limit_leaves_descriptors_to_the_rest_of_the_host() {
        let limit = default_max_connections() as u64;
        let descriptors = descriptor_limit().unwrap_or(1024);
        assert!(limit < descriptors, "{limit} of {descriptors}");
        assert!((1..=DEFAULT_MAX_CONNECTIONS_CAP).contains(&limit));
    }

    #[tokio::test(start_paused = true)]
    async fn warnings_are_throttled_and_count_what_they_skipped() {
        let mut warning = Throttled::default();
        assert_eq!(warning.hit(), Some(1));
        assert_eq!(warning.hit(), None);
        assert_eq!(warning.hit(), None);
        tokio::time::advance(LOG_EVERY).await;
        assert_eq!(warning.hit(), Some(3));
    }

    #[test]
    fn room_is_made_by_closing_a_connection_that_never_sent_a_request_first() {
        let open = Open::new(3);
        let stats = ConnectionStats::default();
        let (kept_alive, silent, busy) = (
            Arc::new(Activity::default()),
            Arc::new(Activity::default()),
            Arc::new(Activity::default()),
        );
        drop(kept_alive.start());
        let _in_flight = busy.start();
        let a = open.register(kept_alive, &stats, place(&open));
        let b = open.register(silent, &stats, place(&open));
        let c = open.register(busy, &stats, place(&open));
        assert!(open.close_one_replaceable().is_some());
        assert!(b.asked.load(Ordering::Relaxed));
        assert!(open.close_one_replaceable().is_some());
        assert!(a.asked.load(Ordering::Relaxed));
        assert!(open.close_one_replaceable().is_none(), "the busy one stays");
        assert!(!c.asked.load(Ordering::Relaxed));
        assert_eq!(stats.snapshot().open, 3);
        drop((a, b, c));
        assert_eq!(stats.snapshot().open, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_gives_its_place_up_once_its_answer_is_left_unread() {
        let open = Open::new(2);
        let stats = ConnectionStats::default();
        let (reading, not_reading) = (Arc::new(Activity::default()), Arc::new(Activity::default()));
        let _in_flight = (reading.start(), not_reading.start());
        let a = open.register(reading.clone(), &stats, place(&open));
        let b = open.register(not_reading.clone(), &stats, place(&open));
        not_reading.set_write_stalled(Some(Instant::now()));
        assert!(
            open.close_one_replaceable().is_none(),
            "a moment without room is not abandonment"
        );
        tokio::time::advance(STALLED).await;
        assert!(open.close_one_replaceable().is_some());
        assert!(b.asked.load(Ordering::Relaxed));
        assert!(!a.asked.load(Ordering::Relaxed));
        assert!(
            open.close_one_replaceable().is_none(),
            "the one whose answer is read stays"
        );
        drop((a, b));
    }
}

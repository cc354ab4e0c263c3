//! What one connection is doing, as its timeouts and the connection limit see it: how many
//! requests are in flight, whether it has ever sent one, and since when its socket has
//! accepted none of the bytes written to it.
//!
//! A request is in flight from the moment hyper hands its head to the service until hyper drops
//! its response body (written out, or abandoned with the connection). The service marks the
//! start; the response body carries the guard that marks the end, because only hyper knows when
//! it is done with the body. The end wakes the connection's reader: hyper, having seen a read
//! pending while the request was in flight, does not read again until woken, and the idle
//! timeout starts on that read.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

/// One connection's activity, shared by its service, its socket's timeouts and the accept
/// loop (which closes connections with nothing in flight when it needs room).
#[derive(Debug, Default)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    served: AtomicBool,
    /// The task that last read while a request was in flight.
    reader: Mutex<Option<Waker>>,
    /// Since when a write has been waiting for room in the socket, if one is. Set and cleared
    /// by the socket's wrapper only when that changes, not on every write.
    write_stalled_since: Mutex<Option<Instant>>,
}

impl Activity {
    /// Whether a request is in flight.
    pub(super) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Whether a request head ever arrived: a connection that never sent one is the first to
    /// be closed when room is needed.
    pub(super) fn served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    /// Records that writes wait for the client to read (`Some(since)`) or that the socket
    /// accepted bytes again (`None`).
    pub(super) fn set_write_stalled(&self, since: Option<Instant>) {
        *self
            .write_stalled_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = since;
    }

    /// Whether the socket has accepted none of the bytes written to it for at least `stalled`:
    /// its client is not reading what it asked for.
    pub(super) fn write_stalled_for(&self, stalled: Duration) -> bool {
        self.write_stalled_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|since| since.elapsed() >= stalled)
    }

    /// Has the reader woken when no request is in flight any more.
    pub(super) fn wake_when_done(&self, waker: &Waker) {
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        match reader.as_mut() {
            Some(known) => known.clone_from(waker),
            None => *reader = Some(waker.clone()),
        }
    }

    /// Marks a request in flight until the guard is dropped.
    pub(super) fn start(self: &Arc<Self>) -> InFlight {
        self.served.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request in flight; dropping it ends it.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let reader = self
                .0
                .reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(reader) = reader {
                reader.wake();
            }
        }
    }
}

/// A response body that keeps its request in flight until hyper drops it.
pub(super) struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl TrackedBody {
    pub(super) fn new(inner: Body, in_flight: InFlight) -> Self {
        TrackedBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_in_flight_until_its_response_body_is_dropped() {
        let activity = Arc::new(Activity::default());
        assert!(!activity.busy() && !activity.served());
        let body = TrackedBody::new(Body::from("ok"), activity.start());
        assert!(activity.busy() && activity.served());
        drop(body);
        assert!(!activity.busy() && activity.served());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_stall_counts_from_when_it_began_until_it_is_cleared() {
        let activity = Activity::default();
        let second = Duration::from_secs(1);
        assert!(!activity.write_stalled_for(Duration::ZERO));
        activity.set_write_stalled(Some(Instant::now()));
        assert!(!activity.write_stalled_for(second));
        tokio::time::advance(second).await;
        assert!(activity.write_stalled_for(second));
        activity.set_write_stalled(None);
        assert!(!activity.write_stalled_for(Duration::ZERO));
    }
}

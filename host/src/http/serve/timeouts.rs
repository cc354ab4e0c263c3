//! The deadlines of a connection's socket (header-read and idle on its reads, write progress on
//! its writes) and the time a request's body may take: together, no state of a connection
//! lasts without its client making progress.
//!
//! hyper has a header-read timeout, but its clock starts as soon as a connection is ready for a
//! request head (at accept, and again right after each answer), so the same value also bounds
//! how long a kept-alive connection may sit idle. The two jobs want different values: a short
//! bound on receiving a head (a client that connects and says nothing, or drips its head a byte
//! at a time, holds a descriptor for nothing) and a longer one on idle keep-alive connections
//! (clients keep them for reuse: Go's transport for 90 s). So hyper's is off and this wrapper
//! keeps both, as Go's `net/http` server does:
//!
//! - a new connection has the header-read timeout to deliver its first request head;
//! - after an answer, a connection has the idle timeout to start its next request, and from that
//!   request's first byte the header-read timeout to complete its head;
//! - while a request is in flight there is no timeout on the socket's reads: its body has the
//!   header-read timeout again ([`TimedBody`], from the end of the head, however the body is
//!   dripped), and handlers are bounded by their own deadlines (etcd calls by the request
//!   timeout, lookups' waits by the cache);
//! - whatever the phase, a write the socket accepts no byte of for the write timeout fails. A
//!   client that asks for answers and does not read them (a large one, or pipelined ones)
//!   fills the socket's buffers, and hyper waits on the write: with the last answer's body
//!   taken into its buffer, only the idle timeout (meant for something else, and up to an
//!   hour) would end that; with a body still streaming (a request in flight), nothing would.
//!   The deadline is on progress, not on the whole answer: a client reading a large answer
//!   slowly keeps it.
//!
//! A connection past a deadline gets a `TimedOut` error from the read or write, on which hyper
//! closes it. Writes waiting for the client are also published to [`Activity`], so the
//! connection limit can close such a connection before its deadline when it needs the room.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::activity::Activity;
use super::{ConnectionLimits, ConnectionStats};

/// Where a connection stands between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head, or reading one: the header-read deadline runs.
    Head,
    /// Kept alive after an answer, nothing of the next request yet: the idle deadline runs.
    Idle,
    /// A request in flight: no deadline on the socket.
    Busy,
}

/// A socket with the read and write deadlines of its connection.
pub(super) struct Deadlines<IO> {
    io: IO,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Since when writes have been waiting with no byte accepted, if they are.
    write_stalled: Option<Instant>,
    write_deadline: Pin<Box<Sleep>>,
}

impl<IO> Deadlines<IO> {
    /// A freshly accepted connection: its first head is due within the header-read timeout.
    pub(super) fn new(
        io: IO,
        activity: Arc<Activity>,
        limits: ConnectionLimits,
        stats: Arc<ConnectionStats>,
    ) -> Self {
        Deadlines {
            io,
            activity,
            limits,
            stats,
            phase: Phase::Head,
            deadline: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            write_stalled: None,
            write_deadline: Box::pin(tokio::time::sleep(limits.write_timeout)),
        }
    }

    fn enter(&mut self, phase: Phase, timeout: Duration) {
        self.phase = phase;
        self.deadline.as_mut().reset(Instant::now() + timeout);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlines<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.busy() {
            // hyper reads a request's body, or watches for the client closing, while the
            // request is in flight: none of that is waiting for a head.
            this.phase = Phase::Busy;
            this.activity.wake_when_done(cx.waker());
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.phase == Phase::Busy {
            this.enter(Phase::Idle, this.limits.idle_timeout);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    this.enter(Phase::Head, this.limits.header_read_timeout);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let (counter, what, after) = match this.phase {
                    Phase::Idle => (&this.stats.idle_timeouts, "idle", this.limits.idle_timeout),
                    _ => (
                        &this.stats.header_timeouts,
                        "request head not received",
                        this.limits.header_read_timeout,
                    ),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("closing a connection: {what} after {after:?}");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} after {after:?}"),
                )))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl<IO: AsyncWrite + Unpin> Deadlines<IO> {
    /// One write-side call on the socket under the write-progress deadline: the clock starts
    /// at the first call the socket has no room for, and stops at the next one that completes
    /// (writes, flushes and shutdowns alike: each completes only once bytes went out).
    fn write_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        call: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let result = call(Pin::new(&mut self.io), cx);
        if result.is_ready() {
            if self.write_stalled.take().is_some() {
                self.activity.set_write_stalled(None);
            }
            return result;
        }
        if self.write_stalled.is_none() {
            let now = Instant::now();
            self.write_stalled = Some(now);
            self.write_deadline
                .as_mut()
                .reset(now + self.limits.write_timeout);
            self.activity.set_write_stalled(Some(now));
        }
        if self.write_deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let after = self.limits.write_timeout;
        self.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            "closing a connection: the client read nothing of its answer for {after:?}"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing of its answer for {after:?}"),
        )))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlines<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_progress(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_progress(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .write_progress(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .write_progress(cx, |io, cx| io.poll_shutdown(cx))
    }
}

/// A request body that must arrive within a deadline (the header-read timeout, from the end
/// of the head): a body announced and never sent would otherwise keep its request in flight,
/// and its connection out of reach of every other timeout, forever.
pub(super) struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl TimedBody {
    pub(super) fn new(inner: Incoming, timeout: Duration) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {timeout:?}"
            )
            .into())));
        }
        Poll::Pending
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(5),
        max_connections: 1,
    };

    fn stats() -> Arc<ConnectionStats> {
        Arc::new(ConnectionStats::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_reads_nothing_of_fails_after_the_write_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let stats = stats();
        let activity = Arc::new(Activity::default());
        let mut io = Deadlines::new(server, activity.clone(), LIMITS, stats.clone());
        // A request in flight: no read deadline runs, the write deadline still does.
        let _in_flight = activity.start();
        io.write_all(&[0; 64]).await.unwrap();
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            let err = io.write_all(&[0; 1]).await.unwrap_err();
            (err.kind(), Instant::now())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(activity.write_stalled_for(Duration::from_secs(1)));
        let (kind, at) = writer.await.unwrap();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(at - start, LIMITS.write_timeout);
        assert_eq!(stats.write_timeouts.load(Ordering::Relaxed), 1);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_reading_slowly_keeps_its_answer_coming() {
        let (mut client, server) = tokio::io::duplex(64);
        let stats = stats();
        let activity = Arc::new(Activity::default());
        let mut io = Deadlines::new(server, activity.clone(), LIMITS, stats.clone());
        // 8 bytes read every 4 s, each read within the 5 s write timeout of the last.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let mut total = 0;
            while total < 256 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0);
                total += n;
            }
        });
        let start = Instant::now();
        io.write_all(&[0; 256]).await.unwrap();
        assert!(
            start.elapsed() > LIMITS.write_timeout * 4,
            "{:?}",
            start.elapsed()
        );
        assert!(!activity.write_stalled_for(Duration::ZERO));
        assert_eq!(stats.write_timeouts.load(Ordering::Relaxed), 0);
        reader.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_after_the_header_read_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let stats = stats();
        let activity = Arc::new(Activity::default());
        let mut io = Deadlines::new(server, activity, LIMITS, stats.clone());
        let start = Instant::now();
        let err = io.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(stats.header_timeouts.load(Ordering::Relaxed), 1);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_starts_when_a_request_ends_under_a_pending_read() {
        let (client, server) = tokio::io::duplex(64);
        let stats = stats();
        let activity = Arc::new(Activity::default());
        let mut io = Deadlines::new(server, activity.clone(), LIMITS, stats.clone());
        let in_flight = activity.start();
        // hyper watches the socket while the request is in flight; that read stays pending.
        let reader = tokio::spawn(async move {
            let err = io.read(&mut [0u8; 16]).await.unwrap_err();
            (err.kind(), Instant::now())
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        let ended = Instant::now();
        drop(in_flight);
        let (kind, at) = tokio::time::timeout(Duration::from_secs(3600), reader)
            .await
            .expect("the idle timeout fired")
            .unwrap();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(at - ended, Duration::from_secs(60));
        assert_eq!(stats.idle_timeouts.load(Ordering::Relaxed), 1);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_gets_the_idle_timeout_then_the_header_timeout_from_its_first_byte()
    {
        let (mut client, server) = tokio::io::duplex(64);
        let stats = stats();
        let activity = Arc::new(Activity::default());
        let mut io = Deadlines::new(server, activity.clone(), LIMITS, stats.clone());
        // A request in flight, then answered: the connection is idle from then on.
        let in_flight = activity.start();
        client.write_all(b"G").await.unwrap();
        assert_eq!(io.read(&mut [0u8; 16]).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(in_flight);
        let idle = Instant::now();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let first = io.read(&mut buf).await.map(|_| Instant::now());
            let second = io
                .read(&mut buf)
                .await
                .map_err(|e| (e.kind(), Instant::now()));
            (first, second)
        });
        tokio::time::sleep(Duration::from_secs(59)).await;
        client.write_all(b"G").await.unwrap();
        let (first, second) = reader.await.unwrap();
        assert_eq!(first.unwrap() - idle, Duration::from_secs(59));
        let (kind, at) = second.unwrap_err();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert_eq!(at - idle, Duration::from_secs(61));
        assert_eq!(stats.header_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(stats.idle_timeouts.load(Ordering::Relaxed), 0);
    }
}

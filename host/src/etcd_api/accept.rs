//! Accepting the endpoint's connections under a bound: past `etcd_api.max_connections` a new
//! connection is closed at once (its client retries; the connections open are served on), so
//! that clients opening connections without end cost the others nothing and cannot take the
//! descriptors the host's other front and etcd's connection need. Accept errors (descriptors
//! running out) pause accepting briefly instead of spinning.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::stats::{EtcdApiStats, Stat};

/// How long accepting pauses after an error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Time a new connection has to send its first bytes (HTTP/2's preface): a connection that
/// says nothing holds a place under the bound and is closed after it.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Refusals are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// An accepted connection holding its place under the bound until it closes.
pub(super) struct Admitted {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    stats: Arc<EtcdApiStats>,
    /// Until the client has sent anything.
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.stats.sub(Stat::ConnectionsOpen, 1);
    }
}

/// Accepts on `listener` into `admitted` until the receiver is gone.
pub(super) async fn accept(
    listener: TcpListener,
    max_connections: usize,
    stats: Arc<EtcdApiStats>,
    admitted: mpsc::Sender<Admitted>,
) {
    let places = Arc::new(Semaphore::new(max_connections));
    let mut refused: u64 = 0;
    let mut logged_at: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("etcd API: accept failed ({e}); pausing {ACCEPT_PAUSE:?}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            stats.inc(Stat::ConnectionsRefused);
            refused += 1;
            if logged_at.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                tracing::warn!(
                    refused,
                    "etcd API: {max_connections} connections open (etcd_api.max_connections); \
                     closing new ones"
                );
                logged_at = Some(Instant::now());
            }
            continue;
        };
        // gRPC's small frames must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        stats.inc(Stat::ConnectionsOpen);
        let connection = Admitted {
            stream,
            _place: place,
            stats: stats.clone(),
            silent_until: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
        };
        if admitted.send(connection).await.is_err() {
            return;
        }
    }
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if read.is_ready() {
            self.silent_until = None;
            return read;
        }
        match self
            .silent_until
            .as_mut()
            .map(|sleep| sleep.as_mut().poll(cx))
        {
            Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client sent nothing",
            ))),
            _ => Poll::Pending,
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

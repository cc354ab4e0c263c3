//! A policy's output: its WASI stdout and stderr and its `log` import, sent to the host's log.
//!
//! Lines are tagged with the policy's short digest (and the stream they came from), clipped to
//! [`MAX_REASON_BYTES`](super::bindings::MAX_REASON_BYTES), and limited per instance to
//! [`LINES_PER_SECOND`] over the three sources together; the lines dropped are counted and the
//! count is logged once the next second starts.
//!
//! Why the host implements `wasi:io/streams` (and `wasi:io/poll`) itself: wasmtime-wasi's
//! synchronous bindings run every stream call that may wait, `drop` and
//! `blocking-write-and-flush` included, through a `block_on` on the ambient tokio runtime, which
//! panics on a runtime worker thread, where the host decides lookups. A policy that printed
//! passed `policy check` (no runtime there) and trapped on every call in the host. Here those
//! calls poll wasmtime-wasi-io's own future once: the only streams a policy can hold (the ones
//! below, and an empty stdin) are always ready, and a call that would really wait is a trap
//! (a decision must not wait for anything), never a blocked or panicking worker.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::cli::{stderr, stdout};
use wasmtime_wasi::p2::bindings::io::{poll as async_poll, streams as async_streams};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, OutputStream, Pollable, StreamError, StreamResult,
};

use super::bindings::{self, LogLevel};
use super::sandbox;

/// Lines a policy instance may write per second, `log` and stdout/stderr together; more are
/// dropped and counted. Policies decide in microseconds: a line per decision would flood the log.
pub(crate) const LINES_PER_SECOND: u32 = 20;

/// How many bytes a guest may write at once (`check-write`); any amount is taken, since only a
/// line's first [`bindings::MAX_REASON_BYTES`] are kept.
const WRITE_PERMIT: usize = 64 << 10;

/// The two output streams a policy has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One instance's output: shared by its state (the `log` import) and the stream resources it
/// hands out, which are separate objects in its resource table.
pub(crate) struct GuestOutput {
    /// The policy's short digest, in every line.
    digest: Arc<str>,
    lines: Mutex<Lines>,
}

struct Lines {
    sink: Sink,
    stdout: LineBuffer,
    stderr: LineBuffer,
}

impl GuestOutput {
    pub(crate) fn new(digest: Arc<str>) -> Arc<Self> {
        Arc::new(GuestOutput {
            digest,
            lines: Mutex::new(Lines {
                sink: Sink {
                    limit: RateLimit::new(),
                    spent: Duration::ZERO,
                },
                stdout: LineBuffer::default(),
                stderr: LineBuffer::default(),
            }),
        })
    }

    /// A line from the `log` import.
    pub(crate) fn log(&self, level: LogLevel, message: &str) {
        let policy = &*self.digest;
        self.lock().sink.log(policy, || {
            let message = bindings::clip(message);
            match level {
                LogLevel::Debug => tracing::debug!(policy, "{message}"),
                LogLevel::Info => tracing::info!(policy, "{message}"),
                LogLevel::Warn => tracing::warn!(policy, "{message}"),
                LogLevel::Error => tracing::error!(policy, "{message}"),
            }
        });
    }

    /// The CPU time the host spent writing this instance's lines to its log, all calls
    /// together. The conformance battery takes it out of what a decision costs: the log's
    /// writer is the host's (its cost bounded by the rate limit), not the policy's work.
    pub(crate) fn logging_cost(&self) -> Duration {
        self.lock().sink.spent
    }

    fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut lines = self.lock();
        let Lines {
            sink,
            stdout,
            stderr,
        } = &mut *lines;
        let buffer = match stream {
            Stream::Stdout => stdout,
            Stream::Stderr => stderr,
        };
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            buffer.push(&rest[..end]);
            emit(&self.digest, sink, stream, buffer);
            rest = &rest[end + 1..];
        }
        buffer.push(rest);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for GuestOutput {
    /// The instance is gone (dropped after a trap, replaced, or its engine ended): a last line
    /// without its newline is logged rather than lost, a panic message's last line included.
    fn drop(&mut self) {
        let lines = self.lines.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (stream, buffer) in [
            (Stream::Stdout, &mut lines.stdout),
            (Stream::Stderr, &mut lines.stderr),
        ] {
            if !buffer.is_empty() {
                emit(&self.digest, &mut lines.sink, stream, buffer);
            }
        }
    }
}

/// Logs the line in `buffer` (which it empties), if the rate admits it.
fn emit(policy: &str, sink: &mut Sink, stream: Stream, buffer: &mut LineBuffer) {
    let line = buffer.take();
    if line.is_empty() {
        return; // a blank line says nothing (a Rust panic message starts with one)
    }
    sink.log(policy, || {
        let line = String::from_utf8_lossy(&line);
        // stderr is where a guest's panic message goes: worth a warning.
        match stream {
            Stream::Stdout => tracing::info!(policy, stream = stream.name(), "{line}"),
            Stream::Stderr => tracing::warn!(policy, stream = stream.name(), "{line}"),
        }
    });
}

/// Where an instance's lines go: the rate limit, and what writing them cost.
struct Sink {
    limit: RateLimit,
    spent: Duration,
}

impl Sink {
    /// Runs `log`, which writes one line to the host's log, if the rate admits it; its CPU
    /// time is counted in `spent` (two clock reads, at most [`LINES_PER_SECOND`] times a
    /// second).
    fn log(&mut self, policy: &str, log: impl FnOnce()) {
        if !self.limit.admit(policy) {
            return;
        }
        let started = sandbox::thread_cpu_time();
        log();
        self.spent += sandbox::thread_cpu_time().saturating_sub(started);
    }
}

/// A line being written: its first [`bindings::MAX_REASON_BYTES`] bytes, and whether more
/// came.
#[derive(Default)]
struct LineBuffer {
    bytes: Vec<u8>,
    clipped: bool,
}

impl LineBuffer {
    fn push(&mut self, bytes: &[u8]) {
        let room = bindings::MAX_REASON_BYTES - self.bytes.len();
        if bytes.len() > room {
            self.clipped = true;
        }
        self.bytes
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && !self.clipped
    }

    /// The line, `…` marking a clipped one; the buffer is empty afterwards.
    fn take(&mut self) -> Vec<u8> {
        let mut line = std::mem::take(&mut self.bytes);
        if std::mem::take(&mut self.clipped) {
            line.extend_from_slice("…".as_bytes());
        }
        line
    }
}

/// At most [`LINES_PER_SECOND`] lines a second; the lines dropped are logged as a count when
/// the next second starts.
struct RateLimit {
    window: Instant,
    lines: u32,
    dropped: u64,
}

impl RateLimit {
    fn new() -> Self {
        RateLimit {
            window: Instant::now(),
            lines: 0,
            dropped: 0,
        }
    }

    fn admit(&mut self, digest: &str) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.dropped > 0 {
                tracing::warn!(
                    policy = digest,
                    "policy output: {} lines dropped (at most {LINES_PER_SECOND} a second)",
                    self.dropped
                );
            }
            *self = RateLimit::new();
        }
        self.lines += 1;
        if self.lines > LINES_PER_SECOND {
            self.dropped += 1;
            return false;
        }
        true
    }
}

/// The stream resource behind a policy's stdout or stderr.
struct GuestStream {
    output: Arc<GuestOutput>,
    stream: Stream,
}

impl OutputStream for GuestStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.output.write(self.stream, &bytes);
        Ok(())
    }

    /// Lines leave as they are completed; nothing waits to be flushed.
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    /// Always ready: writes are taken at once.
    async fn ready(&mut self) {}
}

/// What the interfaces implemented here see of an instance's state.
pub(crate) struct GuestIo<'a> {
    pub(crate) table: &'a mut ResourceTable,
    pub(crate) output: &'a Arc<GuestOutput>,
}

impl GuestIo<'_> {
    fn push(&mut self, stream: Stream) -> wasmtime::Result<Resource<DynOutputStream>> {
        let stream: DynOutputStream = Box::new(GuestStream {
            output: self.output.clone(),
            stream,
        });
        Ok(self.table.push(stream)?)
    }
}

/// The [`HasData`] of the interfaces implemented here.
pub(crate) struct HasGuestIo;

impl HasData for HasGuestIo {
    type Data<'a> = GuestIo<'a>;
}

/// Adds `wasi:cli/stdout`, `wasi:cli/stderr`, `wasi:io/streams` and `wasi:io/poll` as
/// implemented here.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    get: fn(&mut T) -> GuestIo<'_>,
) -> wasmtime::Result<()> {
    stdout::add_to_linker::<T, HasGuestIo>(linker, get)?;
    stderr::add_to_linker::<T, HasGuestIo>(linker, get)?;
    streams::add_to_linker::<T, HasGuestIo>(linker, get)?;
    poll::add_to_linker::<T, HasGuestIo>(linker, get)?;
    Ok(())
}

impl stdout::Host for GuestIo<'_> {
    fn get_stdout(&mut self) -> wasmtime::Result<Resource<DynOutputStream>> {
        self.push(Stream::Stdout)
    }
}

impl stderr::Host for GuestIo<'_> {
    fn get_stderr(&mut self) -> wasmtime::Result<Resource<DynOutputStream>> {
        self.push(Stream::Stderr)
    }
}

/// Runs a wasmtime-wasi-io future that needs no runtime: polled once, `None` if it would wait.
fn at_once<F: Future>(future: F) -> Option<F::Output> {
    let mut context = Context::from_waker(Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// The trap of a call that would wait.
fn would_wait(call: &str) -> wasmtime::Error {
    wasmtime::format_err!(
        "{call} would wait, and a policy's decision may not wait for anything (its stdout and \
         stderr never make it wait)"
    )
}

fn stream_at_once<T>(call: &str, future: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    at_once(future).unwrap_or_else(|| Err(StreamError::Trap(would_wait(call))))
}

fn trap_at_once<T>(
    call: &str,
    future: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    at_once(future).unwrap_or_else(|| Err(would_wait(call)))
}

impl streams::Host for GuestIo<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        Ok(
            match async_streams::Host::convert_stream_error(self.table, err)? {
                async_streams::StreamError::Closed => streams::StreamError::Closed,
                async_streams::StreamError::LastOperationFailed(e) => {
                    streams::StreamError::LastOperationFailed(e)
                }
            },
        )
    }
}

impl streams::HostOutputStream for GuestIo<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        trap_at_once(
            "dropping an output stream",
            async_streams::HostOutputStream::drop(self.table, stream),
        )
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        async_streams::HostOutputStream::check_write(self.table, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        async_streams::HostOutputStream::write(self.table, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        stream_at_once(
            "blocking-write-and-flush",
            async_streams::HostOutputStream::blocking_write_and_flush(self.table, stream, bytes),
        )
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        stream_at_once(
            "blocking-write-zeroes-and-flush",
            async_streams::HostOutputStream::blocking_write_zeroes_and_flush(
                self.table, stream, len,
            ),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        async_streams::HostOutputStream::subscribe(self.table, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        async_streams::HostOutputStream::write_zeroes(self.table, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        async_streams::HostOutputStream::flush(self.table, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        stream_at_once(
            "blocking-flush",
            async_streams::HostOutputStream::blocking_flush(self.table, stream),
        )
    }

    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        async_streams::HostOutputStream::splice(self.table, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_at_once(
            "blocking-splice",
            async_streams::HostOutputStream::blocking_splice(self.table, dst, src, len),
        )
    }
}

impl streams::HostInputStream for GuestIo<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        trap_at_once(
            "dropping an input stream",
            async_streams::HostInputStream::drop(self.table, stream),
        )
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        async_streams::HostInputStream::read(self.table, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        stream_at_once(
            "blocking-read",
            async_streams::HostInputStream::blocking_read(self.table, stream, len),
        )
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        async_streams::HostInputStream::skip(self.table, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        stream_at_once(
            "blocking-skip",
            async_streams::HostInputStream::blocking_skip(self.table, stream, len),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        async_streams::HostInputStream::subscribe(self.table, stream)
    }
}

impl poll::Host for GuestIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        trap_at_once("poll", async_poll::Host::poll(self.table, pollables))
    }
}

impl poll::HostPollable for GuestIo<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        trap_at_once(
            "pollable.ready",
            async_poll::HostPollable::ready(self.table, pollable),
        )
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        trap_at_once(
            "pollable.block",
            async_poll::HostPollable::block(self.table, pollable),
        )
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.table, pollable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_kept_to_its_first_kib_and_marked_clipped() {
        let mut line = LineBuffer::default();
        line.push(&[b'x'; 1000]);
        line.push(&[b'y'; 1000]);
        let taken = line.take();
        assert_eq!(&taken[..1000], &[b'x'; 1000][..]);
        assert_eq!(&taken[1000..bindings::MAX_REASON_BYTES], &[b'y'; 24][..]);
        assert_eq!(&taken[bindings::MAX_REASON_BYTES..], "…".as_bytes());
        assert!(line.is_empty(), "taking empties it");
        line.push(b"short");
        assert_eq!(line.take(), b"short");
    }

    #[test]
    fn output_beyond_the_rate_is_dropped_and_counted() {
        let mut limit = RateLimit::new();
        let admitted = (0..LINES_PER_SECOND + 5)
            .filter(|_| limit.admit("0123456789ab"))
            .count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
        assert_eq!(limit.dropped, 5);
        limit.window -= Duration::from_secs(1);
        assert!(limit.admit("0123456789ab"), "a new second");
        assert_eq!(limit.dropped, 0);
    }
}

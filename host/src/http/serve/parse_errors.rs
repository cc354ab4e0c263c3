//! JSON bodies for the answers hyper gives, on its own, to requests it cannot parse.
//!
//! hyper answers a request head it cannot parse before any service sees it: 400 (a bad request
//! line or header), 431 (a head over the size limit, or too many headers), 414 (a URI over
//! 64 KiB; the head limit stops such a head first). It writes the status line and
//! `content-length: 0`, nothing else, and closes the connection; there is no hook to change
//! that (`Server::on_error` in hyper's `proto/h1/role.rs` builds the head, and
//! `Conn::on_parse_error` writes it with no body). The API promises a JSON body on every error,
//! so this wrapper of the connection's socket rewrites exactly those answers on their way out.
//!
//! How they are recognised, so that no other bytes are ever taken for one:
//!
//! - at the start of a response: the write is the first since hyper flushed with no request
//!   in flight (hyper flushes the socket only once its buffer is written out, and with no
//!   request in flight no answer is under way), or the first on the connection; and no
//!   request is in flight now (the API's own answers are written while theirs is). A write
//!   that resumes a partly written answer, or carries the tail of one, is never a candidate;
//! - the write is exactly one head and nothing after it, one of these statuses, exactly one
//!   `content-length: 0` and no `transfer-encoding`: a chunked answer or one with a body is
//!   left alone (every error the API itself returns has a JSON body anyway).
//!
//! Should a later hyper write them differently, nothing is rewritten (the bodiless answer goes
//! out as before, never a corrupted one) and `tests/tests/host_connections.rs` fails.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::activity::Activity;
use super::{MAX_HEAD, MAX_HEADERS};
use crate::http::ErrorBody;

/// The statuses hyper answers by itself, with the error code of their JSON body.
const AUTOMATIC: [(&[u8; 3], &str); 3] = [
    (b"400", "bad_request"),
    (b"431", "headers_too_large"),
    (b"414", "uri_too_long"),
];

/// The message of an automatic answer's JSON body.
fn message(error: &str) -> String {
    match error {
        "headers_too_large" => format!(
            "the request head is over {} KiB, or has over {MAX_HEADERS} headers",
            MAX_HEAD / 1024
        ),
        "uri_too_long" => "the request URI is too long".into(),
        _ => "the request line or a header could not be parsed as HTTP/1.1".into(),
    }
}

/// A socket whose outgoing bodiless 400, 414 and 431 answers get a JSON body.
pub(super) struct JsonParseErrors<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// Whether the next write starts a response: nothing written since the connection opened
    /// or since hyper flushed with no request in flight.
    at_response_start: bool,
    /// A rewritten answer still to be written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<IO> JsonParseErrors<IO> {
    pub(super) fn new(io: IO, activity: Arc<Activity>) -> Self {
        JsonParseErrors {
            io,
            activity,
            at_response_start: true,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<IO: AsyncWrite + Unpin> JsonParseErrors<IO> {
    /// Writes what is left of a rewritten answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes `buf` (the whole of hyper's write: its first non-empty slice, with `rest` empty)
    /// or, if it is one of hyper's bodiless answers at the start of a response, takes it (its
    /// length returned, as if written) and queues the JSON answer instead.
    fn poll_write_or_rewrite(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        rest_empty: bool,
        write: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        let candidate = self.at_response_start && rest_empty && !self.activity.busy();
        if let Some(answer) = candidate.then(|| rewrite(buf)).flatten() {
            self.pending = answer;
            self.written = 0;
            self.at_response_start = false;
            return Poll::Ready(Ok(buf.len()));
        }
        let written = ready!(write(Pin::new(&mut self.io), cx))?;
        if written > 0 {
            self.at_response_start = false;
        }
        Poll::Ready(Ok(written))
    }
}

/// If `buf` is exactly hyper's bodiless answer (a head of one of [`AUTOMATIC`]'s statuses with
/// exactly one `content-length: 0`, no `transfer-encoding`, nothing after it), the same answer
/// with a JSON body (and `connection: close`, as hyper closes after it).
fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
    // HTTP/1.0 after a 1.0 request on a kept-alive connection, 1.1 otherwise.
    let rest = [&b"HTTP/1.1 "[..], b"HTTP/1.0 "]
        .iter()
        .find_map(|version| buf.strip_prefix(*version))?;
    let (_, error) = AUTOMATIC
        .iter()
        .find(|(status, _)| rest.starts_with(&status[..]))?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != buf.len() {
        return None;
    }
    let lines: Vec<&[u8]> = buf[..end]
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .collect();
    let lengths: Vec<&[u8]> = lines
        .iter()
        .filter_map(|line| value_of(line, b"content-length:"))
        .collect();
    let chunked = lines
        .iter()
        .any(|line| value_of(line, b"transfer-encoding:").is_some());
    if lengths != [b"0"] || chunked {
        return None;
    }
    let body = serde_json::to_vec(&ErrorBody {
        error,
        message: message(error),
        details: None,
    })
    .expect("an error body serializes");
    let mut answer = Vec::with_capacity(end + 128 + body.len());
    for line in lines {
        let replaced = [&b"content-length:"[..], b"content-type:", b"connection:"]
            .iter()
            .any(|name| value_of(line, name).is_some());
        if !replaced {
            answer.extend_from_slice(line);
            answer.extend_from_slice(b"\r\n");
        }
    }
    answer.extend_from_slice(
        format!(
            "content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    answer.extend_from_slice(&body);
    Some(answer)
}

/// The value of a header line if it is the header `name` (given lowercase, with its colon).
fn value_of<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (head, value) = line.split_at_checked(name.len())?;
    head.eq_ignore_ascii_case(name).then(|| value.trim_ascii())
}

impl<IO: AsyncRead + Unpin> AsyncRead for JsonParseErrors<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_or_rewrite(cx, buf, true, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        let first = slices.next().map_or(&[][..], |b| &b[..]);
        let rest_empty = slices.next().is_none();
        self.get_mut()
            .poll_write_or_rewrite(cx, first, rest_empty, |io, cx| {
                io.poll_write_vectored(cx, bufs)
            })
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        // hyper flushes the socket once its buffer is written out: with no request in flight,
        // no answer is under way, and the next write starts one.
        if !this.activity.busy() {
            this.at_response_start = true;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HYPER_431: &[u8] =
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                               date: Sun, 29 Nov 2026 10:00:00 GMT\r\n\r\n";
    const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";

    #[test]
    fn a_bodiless_automatic_answer_gets_a_json_body() {
        let answer = rewrite(HYPER_431).unwrap();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\ndate: Sun, 29 Nov 2026 10:00:00 GMT\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "headers_too_large");
    }

    /// hyper answers in HTTP/1.0 after a 1.0 request kept alive.
    #[test]
    fn an_http_1_0_bodiless_answer_gets_a_json_body_too() {
        let answer = rewrite(b"HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\n\r\n").unwrap();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "bad_request");
    }

    #[test]
    fn answers_with_a_body_and_other_statuses_pass_unchanged() {
        for untouched in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"{\"HTTP/1.1 400 \": 1}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        ] {
            assert!(rewrite(untouched).is_none(), "{:?}", String::from_utf8_lossy(untouched));
        }
    }

    /// What the client receives for `writes`, each followed by a flush if marked so.
    async fn received(activity: Arc<Activity>, writes: &[(&[u8], bool)]) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut io = JsonParseErrors::new(server, activity);
        for (bytes, flush) in writes {
            io.write_all(bytes).await.unwrap();
            if *flush {
                io.flush().await.unwrap();
            }
        }
        io.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        out
    }

    fn rewritten(out: &[u8]) -> bool {
        String::from_utf8_lossy(out).contains("\"error\":\"bad_request\"")
    }

    #[tokio::test]
    async fn an_answer_at_the_start_of_the_connection_or_after_a_flush_is_rewritten() {
        let activity = Arc::new(Activity::default());
        assert!(rewritten(
            &received(activity.clone(), &[(HYPER_400, false)]).await
        ));
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let out = received(activity, &[(ok, true), (HYPER_400, false)]).await;
        assert!(out.starts_with(ok) && rewritten(&out[ok.len()..]));
    }

    #[tokio::test]
    async fn bytes_in_the_middle_of_an_answer_are_never_rewritten() {
        // The rest of a body written in two parts, its second part looking like hyper's
        // answer: no flush with nothing in flight came between them.
        let head: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 51\r\n\r\n";
        let activity = Arc::new(Activity::default());
        let out = received(activity, &[(head, false), (HYPER_400, false)]).await;
        assert_eq!(out, [head, HYPER_400].concat());
        // A flush while a request is in flight is no boundary either, although the request
        // has ended by the next write.
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let activity = Arc::new(Activity::default());
        let mut io = JsonParseErrors::new(server, activity.clone());
        let in_flight = activity.start();
        io.write_all(head).await.unwrap();
        io.flush().await.unwrap();
        drop(in_flight);
        io.write_all(HYPER_400).await.unwrap();
        io.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, [head, HYPER_400].concat());
    }
}

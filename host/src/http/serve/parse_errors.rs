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
//! How they are recognised: hyper writes such an answer only once the previous response is
//! flushed, so it starts a write; and it is the only answer with one of these statuses and
//! an empty body, since every error the API itself returns has a JSON body. Should a later hyper
//! write them differently, nothing is rewritten (the bodiless answer goes out as before) and
//! `tests/tests/host_connections.rs` fails.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    /// A rewritten answer still to be written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<IO> JsonParseErrors<IO> {
    pub(super) fn new(io: IO) -> Self {
        JsonParseErrors {
            io,
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

    /// If `buf` starts with one of hyper's bodiless answers, takes its head (the length
    /// returned, as if written) and queues the JSON answer instead.
    fn take_automatic(&mut self, buf: &[u8]) -> Option<usize> {
        let (head_len, answer) = rewrite(buf)?;
        self.pending = answer;
        self.written = 0;
        Some(head_len)
    }
}

/// hyper's bodiless answer at the start of `buf`, if there is one: the length of its head and
/// the same answer with a JSON body (and `connection: close`, as hyper closes after it).
fn rewrite(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let (_, error) = AUTOMATIC
        .iter()
        .find(|(status, _)| rest.starts_with(&status[..]))?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let lines: Vec<&[u8]> = buf[..end]
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .collect();
    let bodiless = lines
        .iter()
        .filter_map(|line| value_of(line, b"content-length:"))
        .all(|length| length == b"0");
    if !bodiless {
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
    Some((end + 4, answer))
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
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(taken) = this.take_automatic(buf) {
            return Poll::Ready(Ok(taken));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(taken) = this.take_automatic(first)
        {
            return Poll::Ready(Ok(taken));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
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

    #[test]
    fn a_bodiless_automatic_answer_gets_a_json_body() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                      date: Sun, 29 Nov 2026 10:00:00 GMT\r\n\r\n";
        let (taken, answer) = rewrite(hyper).unwrap();
        assert_eq!(taken, hyper.len());
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\ndate: Sun, 29 Nov 2026 10:00:00 GMT\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "headers_too_large");
    }

    #[test]
    fn answers_with_a_body_and_other_statuses_pass_unchanged() {
        for untouched in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"{\"HTTP/1.1 400 \": 1}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        ] {
            assert!(rewrite(untouched).is_none(), "{untouched:?}");
        }
    }
}

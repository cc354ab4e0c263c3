//! The tests' one HTTP client: blocking HTTP/1.1, one request per fresh connection, the answer
//! parsed (a chunked body joined). It talks to the host's API and to etcd's `/health` and
//! `/metrics`; every exchange is bounded by timeouts, so a hung or frozen server fails the test
//! instead of hanging it.
//!
//! [`request_raw`] and [`request_head_only`] send what a well-behaved client would not (bytes
//! as they are, a head without its body) to test how the host handles them. Tests of the
//! connection handling itself (slow, silent, pipelined sockets) keep their own sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How long connecting may take: the servers are local, so longer means they are gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a [`request`] waits for each read or write: generous, for the host's answers that
/// wait on a refresh or a policy on a loaded machine.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a [`request_raw`] waits for each read or write: the host answers malformed bytes
/// at once, or closes.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), each read and write
/// bounded by 30 s. The whole body is sent even if the server answers early (an oversized
/// body); the answer is read anyway.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    request_within(addr, method, path, headers, body, REQUEST_TIMEOUT)
}

/// [`request`] with each read and write bounded by `timeout` (and connecting by the shorter
/// of `timeout` and 5 s).
pub fn request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    let mut stream = connect(addr, timeout)?;
    stream.write_all(head(addr, method, path, headers, body.len()).as_bytes())?;
    // A server refusing a large body may close while we write: what it answered still counts.
    let _ = stream.write_all(body);
    read_to_close(stream).with_context(|| format!("{method} {path}"))
}

/// Sends `bytes` as they are on a fresh connection and reads the answer until the host closes
/// the connection (or 10 s pass).
pub fn request_raw(addr: SocketAddr, bytes: &[u8]) -> Result<Response> {
    let mut stream = connect(addr, RAW_TIMEOUT)?;
    stream.write_all(bytes)?;
    read_to_close(stream)
}

/// Sends a request's head announcing a `content_length`-byte body, and no body: the server
/// must answer from the head alone (say, refuse a missing token) within `timeout`.
pub fn request_head_only(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: usize,
    timeout: Duration,
) -> Result<Response> {
    let mut stream = connect(addr, timeout)?;
    stream.write_all(head(addr, method, path, headers, content_length).as_bytes())?;
    // Read up to the end of the answer's body; the connection stays open (the server may
    // still be willing to read the announced body), so stop at Content-Length.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("no answer to {method} {path} within {timeout:?}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Ok(response) = parse(&raw) {
            let complete = response
                .header("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| response.body.len() >= l);
            if complete {
                return Ok(response);
            }
        }
    }
    parse(&raw)
}

/// A connection to `addr` whose reads and writes give up after `timeout`.
fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout.min(CONNECT_TIMEOUT))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// A request's head, closing the connection after the answer.
fn head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: usize,
) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {content_length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Reads until the server closes, then parses the answer. What arrived before an error (a reset
/// after the answer) still counts.
fn read_to_close(mut stream: TcpStream) -> Result<Response> {
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        read?;
        bail!("empty answer");
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end])?.trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).context("short chunk")?);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

//! The host's HTTP connections under abuse, on the embedded registry (no etcd): a descriptor
//! limit of 1,024 and 1,100 silent connections, descriptors running out, silent, dripping and
//! idle connections timed out, answers left unread closed (and making room at the connection
//! limit), and the answers hyper gives by itself to malformed requests carrying the API's JSON
//! body. The real binary, as operators run it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use regcache_tests::host::{Host, raise_descriptor_limit};
use regcache_tests::http::{Response, request, request_head_only, request_raw};
use regcache_tests::wait::eventually_blocking;
use serde_json::json;

/// Silent connections opened against a host limited to 1,024 descriptors (the case).
const SILENT: usize = 1_100;

/// The host's descriptor limit in these tests, and the connection limit it derives from it
/// (1,024 less the 128 it keeps for everything else).
const DESCRIPTORS: u64 = 1_024;
const DERIVED_MAX_CONNECTIONS: usize = 896;

/// Opens up to `n` connections that send nothing; those that cannot connect within a second
/// (the host's backlog full) are not counted.
fn open_silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        .collect()
}

/// Whether the host closed `stream` (end of file or reset), without waiting.
fn closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).unwrap();
    closed
}

/// Waits (at most `timeout`) for the host to close `stream`; returns when it did.
fn wait_closed(stream: &mut TcpStream, timeout: Duration) -> Option<Instant> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return None;
            }
            Err(_) => return Some(Instant::now()),
        }
    }
}

/// `GET path` on a kept-alive connection: the answer, read up to its `content-length`.
fn get_on(stream: &mut TcpStream, path: &str) -> Response {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let addr = stream.peer_addr().unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut buf)
            .expect("an answer on the kept connection");
        assert!(n > 0, "the host closed the kept connection");
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if raw.len() >= end + 4 + length {
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            return Response {
                status,
                headers: vec![],
                body: raw[end + 4..end + 4 + length].to_vec(),
            };
        }
    }
}

/// A metric's value from `/metrics` (`name` with its labels, as exposed).
fn metric(host: &Host, name: &str) -> f64 {
    let text = host.get("/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// `/healthz` on a fresh connection and how long it took.
fn timed_healthz(host: &Host) -> (u16, Duration) {
    let start = Instant::now();
    let status = request(host.addr, "GET", "/healthz", &[], &[])
        .unwrap_or_else(|e| {
            let elapsed = start.elapsed();
            let metrics = host.get("/metrics").map(|r| r.text()).unwrap_or_default();
            let connections: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("regcache_http"))
                .collect();
            panic!(
                "/healthz on a new connection failed after {elapsed:?}: {e}\n{}\n{}",
                connections.join("\n"),
                host.log()
            )
        })
        .status;
    (status, start.elapsed())
}

#[test]
fn silent_connections_do_not_keep_healthz_from_answering() {
    raise_descriptor_limit(4 * SILENT as u64).unwrap();
    // A long header timeout: what keeps the host answering here is the connection limit,
    // not the silent connections timing out.
    let host =
        Host::start_with_descriptor_limit(&["--http-header-read-timeout", "120s"], DESCRIPTORS)
            .unwrap();
    let derived = format!("max_connections={DERIVED_MAX_CONNECTIONS}");
    assert!(
        eventually_blocking(Duration::from_secs(5), || host.log().contains(&derived)),
        "the limit is derived from RLIMIT_NOFILE:\n{}",
        host.log()
    );
    let mut kept = TcpStream::connect(host.addr).unwrap();
    assert_eq!(get_on(&mut kept, "/healthz").status, 200);

    let opening = Instant::now();
    let silent = open_silent(host.addr, SILENT);
    assert!(
        silent.len() > DERIVED_MAX_CONNECTIONS,
        "{} opened",
        silent.len()
    );

    let start = Instant::now();
    assert_eq!(get_on(&mut kept, "/healthz").status, 200);
    let on_kept = start.elapsed();
    assert!(
        on_kept < Duration::from_secs(1),
        "kept connection: {on_kept:?}"
    );
    let (status, on_new) = timed_healthz(&host);
    assert_eq!(status, 200);
    assert!(
        on_new < Duration::from_secs(1),
        "new connection: {on_new:?}"
    );
    assert_eq!(get_on(&mut kept, "/v1/services/nobody").status, 404);

    // The host holds at most its limit: the kept connection (which has sent requests) stays,
    // silent ones made room for the newer ones.
    let must_close = silent.len() + 1 - DERIVED_MAX_CONNECTIONS;
    let mut closed_silent = 0;
    let settled = eventually_blocking(Duration::from_secs(10), || {
        closed_silent = silent.iter().filter(|s| closed(s)).count();
        closed_silent >= must_close
    });
    assert!(settled, "{closed_silent} of {} silent closed", silent.len());
    assert!(!closed(&kept));
    assert!(metric(&host, "regcache_http_connections_open") <= DERIVED_MAX_CONNECTIONS as f64);
    assert!(
        metric(
            &host,
            "regcache_http_connections_closed_total{reason=\"replaced\"}"
        ) >= must_close as f64
    );
    // Rate-limited to one per 10 s: opening 1,100 connections on a loaded machine can take
    // tens of seconds, so the bound follows the time the replacements could span.
    let warnings = host.log().matches("to admit new ones").count();
    let most = 1 + opening.elapsed().as_secs() / 10;
    assert!(
        (1..=most).contains(&(warnings as u64)),
        "{warnings} warnings in {:?} (rate-limited: one per 10 s):\n{}",
        opening.elapsed(),
        host.log()
    );
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are the 14th
    // and 15th fields, the 12th and 13th after it.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_stalls() {
    raise_descriptor_limit(4 * SILENT as u64).unwrap();
    // A connection limit above what the descriptors allow: accept() fails with EMFILE.
    let host = Host::start_with_descriptor_limit(
        &[
            "--http-max-connections",
            "5000",
            "--http-header-read-timeout",
            "120s",
        ],
        DESCRIPTORS,
    )
    .unwrap();
    let mut kept = TcpStream::connect(host.addr).unwrap();
    assert_eq!(get_on(&mut kept, "/healthz").status, 200);
    let silent = open_silent(host.addr, SILENT);
    assert!(
        silent.len() > DESCRIPTORS as usize,
        "{} opened",
        silent.len()
    );

    let stalled = eventually_blocking(Duration::from_secs(10), || {
        host.log().contains("out of file descriptors")
    });
    assert!(stalled, "accept never ran out:\n{}", host.log());
    let before = cpu_ticks(host.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(host.pid()) - before;
    // Clock ticks are 1/100 s: a spinning accept loop uses a core, about 300 in 3 s (still
    // well over 100 with another busy process on each of 2 cores); a backing-off one, a few,
    // plus the churn of the backlog's connections let in and closed.
    assert!(used < 100, "{used} ticks of CPU in 3 s");

    let start = Instant::now();
    assert_eq!(get_on(&mut kept, "/healthz").status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let (status, on_new) = timed_healthz(&host);
    assert_eq!(status, 200);
    assert!(
        on_new < Duration::from_secs(1),
        "new connection: {on_new:?}"
    );
    assert!(
        metric(
            &host,
            "regcache_http_accept_errors_total{cause=\"descriptors\"}"
        ) >= 1.0
    );
    let warnings = host.log().matches("out of file descriptors").count();
    assert!(
        warnings <= 2,
        "{warnings} warnings (rate-limited):\n{}",
        host.log()
    );
    drop(silent);
}

#[test]
fn silent_dripping_and_idle_connections_are_closed() {
    // Timeouts far enough apart that a close a loaded machine delays by seconds still tells
    // which one fired.
    let host = Host::start(&[
        "--http-header-read-timeout",
        "1s",
        "--http-idle-timeout",
        "8s",
    ])
    .unwrap();
    let within = |closed_at: Option<Instant>, start: Instant, low: f64, high: f64| {
        let after = closed_at
            .expect("closed")
            .duration_since(start)
            .as_secs_f64();
        assert!((low..high).contains(&after), "closed after {after:.2} s");
    };

    // Silent: closed after the header-read timeout.
    let start = Instant::now();
    let mut silent = TcpStream::connect(host.addr).unwrap();
    within(
        wait_closed(&mut silent, Duration::from_secs(10)),
        start,
        0.9,
        6.0,
    );

    // Dripping a head, a byte every 100 ms: closed after the header-read timeout too.
    let start = Instant::now();
    let mut dripping = TcpStream::connect(host.addr).unwrap();
    let drip = {
        let mut stream = dripping.try_clone().unwrap();
        std::thread::spawn(move || {
            let head = b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in head {
                if stream.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    within(
        wait_closed(&mut dripping, Duration::from_secs(10)),
        start,
        0.9,
        6.0,
    );
    drip.join().unwrap();

    // Kept alive after an answer: the idle timeout (8 s), not the header-read one (1 s).
    let mut idle = TcpStream::connect(host.addr).unwrap();
    assert_eq!(get_on(&mut idle, "/healthz").status, 200);
    let start = Instant::now();
    within(
        wait_closed(&mut idle, Duration::from_secs(20)),
        start,
        7.8,
        14.0,
    );

    assert!(
        metric(
            &host,
            "regcache_http_connections_closed_total{reason=\"header_timeout\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &host,
            "regcache_http_connections_closed_total{reason=\"idle_timeout\"}"
        ) >= 1.0
    );
}

#[test]
fn a_body_that_does_not_come_is_an_error_within_the_header_read_timeout() {
    let host = Host::start(&["--http-header-read-timeout", "1s"]).unwrap();
    let start = Instant::now();
    let response = request_head_only(
        host.addr,
        "POST",
        "/v1/registrations",
        &[],
        100,
        Duration::from_secs(10),
    )
    .unwrap();
    let elapsed = start.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(6)).contains(&elapsed),
        "{elapsed:?}"
    );
    assert_eq!(json_error(&response), (400, "bad_request".to_string()));
    assert!(
        response.json()["message"]
            .as_str()
            .unwrap()
            .contains("did not arrive")
    );
}

/// Status, error code and content type of an answer, its body parsed as JSON.
fn json_error(response: &Response) -> (u16, String) {
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{response:?}"
    );
    let error = response.json()["error"].as_str().unwrap().to_string();
    (response.status, error)
}

#[test]
fn malformed_requests_get_json_errors() {
    let host = Host::start(&[]).unwrap();
    let addr = host.addr;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "bad request line",
            b"THIS IS NOT HTTP\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "bad header",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "headers over 16 KiB",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(20 * 1024)
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "over 100 headers",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..150)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>()
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "URI over 8 KiB",
            format!(
                "GET /v1/services/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "a".repeat(10 * 1024)
            )
            .into_bytes(),
            414,
            "uri_too_long",
        ),
    ];
    for (what, bytes, status, error) in cases {
        let response = request_raw(addr, &bytes).unwrap();
        assert_eq!(json_error(&response), (status, error.to_string()), "{what}");
    }
    // The host still answers, and a normal error keeps its own JSON.
    let response = request(addr, "GET", "/nope", &[], &[]).unwrap();
    assert_eq!(json_error(&response), (404, "not_found".to_string()));
}

#[test]
fn a_malformed_request_after_an_answer_on_the_same_connection_gets_a_json_error() {
    let host = Host::start(&[]).unwrap();
    let mut stream = TcpStream::connect(host.addr).unwrap();
    assert_eq!(get_on(&mut stream, "/healthz").status, 200);
    stream.write_all(b"THIS IS NOT HTTP\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an answer");
    assert!(head.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["error"], "bad_request");
}

/// Nodes of the service [`register_large_service`] registers.
const LARGE_NODES: usize = 1_200;

/// Registers `name` on the embedded registry over the API, with [`LARGE_NODES`] nodes carrying
/// 400 bytes of metadata each, in registrations of 200 nodes (each under the registry's value
/// size limit); returns the size of its lookup's answer (about half a MiB).
fn register_large_service(host: &Host, name: &str) -> usize {
    for batch in 0..LARGE_NODES / 200 {
        let nodes: Vec<_> = (0..200)
            .map(|i| {
                let n = batch * 200 + i;
                json!({
                    "id": format!("{name}-{n}"),
                    "address": format!("10.0.{}.{}:9000", n / 250, n % 250 + 1),
                    "metadata": { "padding": "x".repeat(400) },
                })
            })
            .collect();
        let service = json!({ "name": name, "version": "1", "nodes": nodes });
        let response = host
            .request(
                "POST",
                "/v1/registrations",
                &[],
                service.to_string().as_bytes(),
            )
            .unwrap();
        assert_eq!(response.status, 201, "{}", response.text());
    }
    let answer = host.lookup(name);
    assert_eq!(answer.status, 200);
    answer.body.len()
}

/// A connection with a 4 KiB receive buffer that pipelines `copies` requests for `path` and
/// reads none of the answers: past a few MiB of them, the host's socket has no room left.
fn pipeline_and_never_read(addr: SocketAddr, path: &str, copies: usize) -> TcpStream {
    use std::os::fd::{AsRawFd, FromRawFd};
    let SocketAddr::V4(v4) = addr else {
        panic!("the host listens on IPv4 loopback")
    };
    // SAFETY: a new socket, owned by `stream` from here on; setsockopt and connect get
    // pointers to live values and their sizes.
    let mut stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let size: libc::c_int = 4096;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            stream.as_raw_fd(),
            (&raw const to).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0, "{}", std::io::Error::last_os_error());
        stream
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(copies);
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

/// Pipelined copies of the large service's lookup that add up to well over what the host's
/// socket buffers (a few MiB on loopback) and hyper's hold.
fn copies_to_stall(answer: usize) -> usize {
    (16 << 20) / answer + 1
}

#[test]
fn answers_left_unread_are_closed_after_the_write_timeout() {
    // Long read timeouts: only the write timeout can close the connection in time.
    let host = Host::start(&[
        "--http-write-timeout",
        "1s",
        "--http-header-read-timeout",
        "300s",
        "--http-idle-timeout",
        "1h",
    ])
    .unwrap();
    let answer = register_large_service(&host, "large");
    let start = Instant::now();
    let unread = pipeline_and_never_read(host.addr, "/v1/services/large", copies_to_stall(answer));
    let write_timeouts = "regcache_http_connections_closed_total{reason=\"write_timeout\"}";
    assert!(
        eventually_blocking(Duration::from_secs(15), || metric(&host, write_timeouts)
            >= 1.0),
        "not closed:\n{}",
        host.log()
    );
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    // The log line follows the counter, and the harness reads the log from a pipe.
    assert!(
        eventually_blocking(Duration::from_secs(5), || host
            .log()
            .contains("the client read nothing of its answer for 1s")),
        "{}",
        host.log()
    );
    assert_eq!(host.get("/healthz").unwrap().status, 200);
    drop(unread);
}

#[test]
fn answers_left_unread_give_their_place_up_and_do_not_hold_shutdown() {
    const LIMIT: usize = 4;
    // A write timeout longer than the test: what lets /healthz in is the connection limit.
    let mut host = Host::start(&[
        "--http-max-connections",
        &LIMIT.to_string(),
        "--http-write-timeout",
        "300s",
    ])
    .unwrap();
    let answer = register_large_service(&host, "large");
    let unread: Vec<TcpStream> = (0..LIMIT)
        .map(|_| pipeline_and_never_read(host.addr, "/v1/services/large", copies_to_stall(answer)))
        .collect();
    // Every place taken by a connection with a request in flight whose answer nobody reads,
    // for longer than the host's stall threshold (1 s).
    std::thread::sleep(Duration::from_secs(3));

    let (status, on_new) = timed_healthz(&host);
    assert_eq!(status, 200);
    assert!(
        on_new < Duration::from_secs(5),
        "new connection: {on_new:?}"
    );
    assert!(
        metric(
            &host,
            "regcache_http_connections_closed_total{reason=\"replaced\"}"
        ) >= 1.0
    );
    assert!(
        host.log()
            .contains("or an answer left unread to admit new ones"),
        "{}",
        host.log()
    );

    // Shutdown closes the others at once rather than waiting out the drain (10 s).
    let stop = Instant::now();
    host.signal("TERM").unwrap();
    let status = host.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stop.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        stop.elapsed()
    );
    drop(unread);
}

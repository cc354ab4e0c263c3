//! The host's HTTP connections under abuse, on the embedded registry (no etcd): a descriptor
//! limit of 1,024 and 1,100 silent connections, descriptors running out, silent, dripping and
//! idle connections timed out, and the answers hyper gives by itself to malformed requests
//! carrying the API's JSON body. The real binary, as operators run it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use regcache_tests::host::{
    Host, Response, poll, raise_descriptor_limit, request, request_head_only, request_raw,
};

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
fn timed_healthz(addr: SocketAddr) -> (u16, Duration) {
    let start = Instant::now();
    let status = request(addr, "GET", "/healthz", &[], &[]).unwrap().status;
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
        poll(Duration::from_secs(5), || host.log().contains(&derived)),
        "the limit is derived from RLIMIT_NOFILE:\n{}",
        host.log()
    );
    let mut kept = TcpStream::connect(host.addr).unwrap();
    assert_eq!(get_on(&mut kept, "/healthz").status, 200);

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
    let (status, on_new) = timed_healthz(host.addr);
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
    let settled = poll(Duration::from_secs(10), || {
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
    let warnings = host.log().matches("at the connection limit").count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings (rate-limited: one per 10 s):\n{}",
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

    let stalled = poll(Duration::from_secs(10), || {
        host.log().contains("out of file descriptors")
    });
    assert!(stalled, "accept never ran out:\n{}", host.log());
    let before = cpu_ticks(host.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(host.pid()) - before;
    // Clock ticks are 1/100 s: a spinning accept loop would use about 200 in 2 s.
    assert!(used < 50, "{used} ticks of CPU in 2 s");

    let start = Instant::now();
    assert_eq!(get_on(&mut kept, "/healthz").status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let (status, on_new) = timed_healthz(host.addr);
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
    let host = Host::start(&[
        "--http-header-read-timeout",
        "1s",
        "--http-idle-timeout",
        "3s",
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
        2.5,
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
        2.5,
    );
    drip.join().unwrap();

    // Kept alive after an answer: the idle timeout (3 s), not the header-read one (1 s).
    let mut idle = TcpStream::connect(host.addr).unwrap();
    assert_eq!(get_on(&mut idle, "/healthz").status, 200);
    let start = Instant::now();
    within(
        wait_closed(&mut idle, Duration::from_secs(10)),
        start,
        2.8,
        4.5,
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
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&elapsed),
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

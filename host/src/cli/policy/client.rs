//! `regcache policy push|status|shadow|recording`: an operator's client of a running host's
//! policy lifecycle endpoints, as `etcdctl` is etcd's: `PUT /v1/policy` (activate, or load as
//! the shadow candidate), `GET /v1/policy`, `GET|POST|DELETE /v1/policy/shadow[/promote]` and
//! `GET /v1/policy/recording`.
//!
//! The host is found as it finds itself: `listen` and `admin_token` / `admin_token_file`, from
//! a host's `--config` file, the host's own flags and its `REGCACHE_*` variables, so that the
//! client run in a host's environment talks to that host. A host listening on every address
//! (`0.0.0.0`, `[::]`) is asked on loopback. One HTTP/1 exchange per command through hyper's
//! client, bounded twice: the connection by [`CONNECT_TIMEOUT`], the whole exchange by
//! `--timeout`.
//!
//! Stdout holds the host's answer: its JSON pretty-printed, or the recording's JSON lines as
//! they come. Failures are one line on stderr. Exit status: 0 done; 1 the host refused (its
//! status, error code and message, and what to do about it); 2 the host could not be asked
//! (unreachable, too slow, an answer that is not the host's JSON, a setting or file refused).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use regcache::config::settings::{self, Setting};
use regcache::config::{ConfigError, POLICY_MAX_SIZE_RANGE, Secret};
use regcache::policy::{PolicyError, PolicySpec};

use crate::cli::args::{Selected, Selection};

/// How long connecting to the host may take: it answers on loopback or a local network, where
/// a connection that takes seconds is a host that is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest JSON answer read: a report holds at most 64 disagreements of a few KiB each.
const MAX_ANSWER: usize = 16 << 20;

/// The largest error answer read: one line of reason and a few details.
const MAX_ERROR_ANSWER: usize = 64 << 10;

/// The query parameters of `PUT /v1/policy` that are the API's own, not the policy's.
const RESERVED_PARAMETERS: [&str; 2] = ["mode", "replay"];

/// The commands that talk to a running host.
#[derive(Debug, clap::Subcommand)]
pub enum HostCommand {
    /// Send a policy to a running host, to activate or (--shadow) to shadow.
    ///
    /// It becomes active if it passes the host's validation; otherwise it is refused, with the
    /// reason, and the active policy stays. With --shadow it is loaded beside the active one as
    /// the shadow candidate. Prints the new active policy, or the shadow's (empty) report.
    Push {
        /// The policy component (.wasm).
        file: PathBuf,
        /// Load it as the shadow candidate: asked the host's questions, never acted on.
        #[arg(long)]
        shadow: bool,
        /// Activate it only if the host's recent recording replays through it without a trap
        /// or an overrun (refused when nothing is recorded: see policy.record.ring).
        #[arg(long, conflicts_with = "shadow")]
        replay_recent: bool,
        /// The policy's configuration, passed to its `configure` (repeated or comma-separated);
        /// without it, the active policy's configuration is kept.
        #[arg(long, value_name = "KEY=VALUE", value_delimiter = ',', value_parser = key_value)]
        policy_config: Vec<(String, String)>,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show a running host's active policy.
    ///
    /// Its generation, digest, source, settings, counters and the last automatic rollback.
    Status {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show the shadow candidate's report, or promote or drop the candidate.
    ///
    /// The report: agreements and disagreements with the active policy by decision pair, the
    /// recent disagreements with their questions, the candidate's failures and cost.
    Shadow {
        /// Make the candidate the active policy, as a push would; prints the new active
        /// policy.
        #[arg(long, conflicts_with = "drop")]
        promote: bool,
        /// Unload the candidate; prints its last report.
        #[arg(long)]
        drop: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Fetch the questions a running host recorded, as JSON lines for `replay --contexts`.
    ///
    /// The recording in memory (policy.record.ring), oldest first.
    Recording {
        /// Write them to FILE rather than to stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        host: HostArgs,
    },
}

/// Where the host is and how long an exchange with it may take.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    #[command(flatten)]
    settings: ClientArgs,
    /// How long the whole exchange may take, in seconds. A push waits while the host compiles
    /// and validates the policy: at most twice its policy.compile_cpu_time (30 s by default).
    #[arg(long, value_name = "SECONDS", default_value_t = 150)]
    timeout: u64,
}

/// The host's settings a client takes: where the host listens and its admin token.
type ClientArgs = Selected<HostApi>;

/// The selection of [`ClientArgs`].
#[derive(Debug)]
pub struct HostApi;

impl Selection for HostApi {
    const CONFIG_HELP: &'static str = "A host's TOML configuration file: the host is asked at \
         its `listen` address with its admin token; flags and REGCACHE_* variables override them";

    fn settings() -> impl Iterator<Item = &'static Setting> {
        [
            &settings::LISTEN,
            &settings::ADMIN_TOKEN,
            &settings::ADMIN_TOKEN_FILE,
        ]
        .into_iter()
    }
}

pub fn run(command: HostCommand) -> anyhow::Result<ExitCode> {
    let outcome = match command {
        HostCommand::Push {
            file,
            shadow,
            replay_recent,
            policy_config,
            host,
        } => push(&file, shadow, replay_recent, policy_config, host),
        HostCommand::Status { host } => Client::new(host)
            .and_then(|client| client.json(Method::GET, "/v1/policy", Body::empty())),
        HostCommand::Shadow {
            promote,
            drop,
            host,
        } => {
            let (method, path) = match (promote, drop) {
                (true, _) => (Method::POST, "/v1/policy/shadow/promote"),
                (_, true) => (Method::DELETE, "/v1/policy/shadow"),
                _ => (Method::GET, "/v1/policy/shadow"),
            };
            Client::new(host).and_then(|client| client.json(method, path, Body::empty()))
        }
        HostCommand::Recording { output, host } => {
            Client::new(host).and_then(|client| client.recording(output.as_deref()))
        }
    };
    Ok(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !failure.is_closed_stdout() {
                eprintln!("regcache: {failure}");
            }
            ExitCode::from(failure.exit_code())
        }
    })
}

fn push(
    file: &Path,
    shadow: bool,
    replay_recent: bool,
    config: Vec<(String, String)>,
    host: HostArgs,
) -> Result<(), Failure> {
    let mut query = Vec::new();
    if shadow {
        query.push(("mode".to_string(), "shadow".to_string()));
    }
    if replay_recent {
        query.push(("replay".to_string(), "recent".to_string()));
    }
    let mut seen = BTreeSet::new();
    for (key, value) in config {
        if RESERVED_PARAMETERS.contains(&key.as_str()) {
            return Err(Failure::Argument(format!(
                "--policy-config: `{key}` is a parameter of the host's API, not of the policy"
            )));
        }
        if !seen.insert(key.clone()) {
            return Err(Failure::Argument(format!(
                "--policy-config: `{key}` is given twice"
            )));
        }
        query.push((key, value));
    }
    let client = Client::new(host)?;
    // No host accepts more than the top of policy.max_size's range; within it, the host's own
    // limit decides (413 naming it).
    let max_size = usize::try_from(*POLICY_MAX_SIZE_RANGE.end()).unwrap_or(usize::MAX);
    let spec = PolicySpec::from_file(file, Vec::new(), max_size)?;
    let target = if query.is_empty() {
        "/v1/policy".to_string()
    } else {
        let pairs: Vec<String> = query
            .iter()
            .map(|(key, value)| format!("{}={}", percent_encoded(key), percent_encoded(value)))
            .collect();
        format!("/v1/policy?{}", pairs.join("&"))
    };
    client.json(Method::PUT, &target, Body::from(spec.wasm.to_vec()))
}

/// `KEY=VALUE`, as the policy's configuration is written on every command line.
fn key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    Ok((key.trim().to_string(), value.trim().to_string()))
}

/// `text` as a query string's component: every byte but the unreserved ones escaped.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Why a command did not get what it asked for.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The host answered with an error status.
    #[error("{0}")]
    Refused(Refusal),
    #[error(
        "cannot reach the host at {addr} (`listen`: {} / {}, or a host's --config): {error}",
        settings::LISTEN.flag(),
        settings::LISTEN.env()
    )]
    Unreachable { addr: SocketAddr, error: io::Error },
    #[error("the host at {addr} did not answer within {after:?} (--timeout)")]
    TimedOut { addr: SocketAddr, after: Duration },
    #[error("the exchange with the host at {addr} broke off: {error}")]
    Broken {
        addr: SocketAddr,
        error: hyper::Error,
    },
    #[error("the host at {addr} answered more than {max} bytes")]
    TooLong { addr: SocketAddr, max: usize },
    #[error("the host at {addr} answered {status} with {what}: is it a regcache host?")]
    NotTheHost {
        addr: SocketAddr,
        status: StatusCode,
        what: String,
    },
    #[error(transparent)]
    Setting(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Argument(String),
    #[error("cannot start the client's runtime: {0}")]
    Runtime(io::Error),
    #[error("{}: {error}", path.as_deref().map_or("stdout".into(), |p| p.display().to_string()))]
    Output {
        /// The file written, or `None` for stdout.
        path: Option<PathBuf>,
        error: io::Error,
    },
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            _ => 2,
        }
    }

    /// A reader of stdout that went away (`| head`): no message needed.
    fn is_closed_stdout(&self) -> bool {
        matches!(self, Failure::Output { path: None, error } if error.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// An error answer of the host: one line with its status, error code and message, and what to
/// do about it where the client knows.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    body: ErrorBody,
    /// The setting that gave the token sent, if one was.
    token_from: Option<&'static Setting>,
}

/// The host's JSON body of every error.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
    details: Option<ErrorDetails>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetails {
    /// The policy that stays active after a refused one.
    active: Option<ActivePolicy>,
}

#[derive(Debug, Deserialize)]
struct ActivePolicy {
    generation: u64,
    digest: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ErrorBody { error, message, .. } = &self.body;
        write!(f, "{} {error}: {message}", self.status.as_u16())?;
        let named = |setting: &Setting| {
            format!("`{}` ({} / {})", setting.key, setting.flag(), setting.env())
        };
        match (self.status, error.as_str()) {
            (StatusCode::UNAUTHORIZED, _) => match self.token_from {
                None => write!(
                    f,
                    "; give the host's admin token with {} or {}",
                    named(&settings::ADMIN_TOKEN),
                    named(&settings::ADMIN_TOKEN_FILE)
                ),
                Some(setting) => write!(
                    f,
                    "; the token given by {} is not the host's",
                    named(setting)
                ),
            },
            (StatusCode::FORBIDDEN, "admin_disabled") => write!(
                f,
                "; start the host with {} or {}",
                named(&settings::ADMIN_TOKEN),
                named(&settings::ADMIN_TOKEN_FILE)
            ),
            (StatusCode::NOT_FOUND, "no_shadow") => {
                f.write_str("; load one with `regcache policy push FILE --shadow`")
            }
            _ => match self.body.details.as_ref().and_then(|d| d.active.as_ref()) {
                Some(active) => write!(
                    f,
                    "; generation {} (sha256:{}) stays active",
                    active.generation, active.digest
                ),
                None => Ok(()),
            },
        }
    }
}

/// A host to ask, found through the host's settings.
struct Client {
    addr: SocketAddr,
    /// The `Authorization` header's value, and the setting that gave the token.
    token: Option<(HeaderValue, &'static Setting)>,
    timeout: Duration,
}

impl Client {
    /// Reads the settings (and the token's file, if that is how it is given).
    fn new(HostArgs { settings, timeout }: HostArgs) -> Result<Client, Failure> {
        let layer = settings.layer()?;
        let addr = address_to_ask(layer.listen()?)?;
        let token = match layer.admin_token()? {
            None => None,
            Some(secret) => {
                let setting = match secret {
                    Secret::Inline(_) => &settings::ADMIN_TOKEN,
                    Secret::File(_) => &settings::ADMIN_TOKEN_FILE,
                };
                let token = secret.read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)?;
                let header = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    ConfigError::new(setting.key, "holds a character an HTTP header cannot")
                })?;
                Some((header, setting))
            }
        };
        Ok(Client {
            addr,
            token,
            timeout: Duration::from_secs(timeout),
        })
    }

    /// Asks for a JSON answer and prints it.
    fn json(&self, method: Method, target: &str, body: Body) -> Result<(), Failure> {
        let (status, answer) = self.exchange(method, target, body, async |response| {
            let status = response.status();
            let mut answer = Vec::new();
            self.read_body(response.into_body(), MAX_ANSWER, |chunk| {
                answer.extend_from_slice(chunk)
            })
            .await?;
            Ok((status, answer))
        })?;
        let value: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|_| Failure::NotTheHost {
                addr: self.addr,
                status,
                what: "a body that is not JSON".into(),
            })?;
        let text = serde_json::to_string_pretty(&value).expect("a JSON value serializes");
        writeln!(io::stdout().lock(), "{text}")
            .map_err(|error| Failure::Output { path: None, error })
    }

    /// Copies the recording to `output` (stdout without one) as it comes. A file is written
    /// beside `output` and renamed onto it once whole: a failure leaves an existing file as it
    /// was.
    fn recording(&self, output: Option<&Path>) -> Result<(), Failure> {
        let failed_output = |error| Failure::Output {
            path: output.map(Path::to_path_buf),
            error,
        };
        let partial = output.map(|path| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".partial.{}", std::process::id()));
            PathBuf::from(name)
        });
        let mut sink: Box<dyn Write> = match &partial {
            Some(path) => Box::new(BufWriter::new(File::create(path).map_err(failed_output)?)),
            None => Box::new(io::stdout().lock()),
        };
        let copied = self.exchange(
            Method::GET,
            "/v1/policy/recording",
            Body::empty(),
            async |response| {
                if !has_content_type(&response, "application/x-ndjson") {
                    return Err(Failure::NotTheHost {
                        addr: self.addr,
                        status: response.status(),
                        what: "a body that is not JSON lines".into(),
                    });
                }
                let mut written = Ok(());
                let mut lines = 0;
                // The host holds the whole recording in memory and sends it at once: its size
                // is bounded there (policy.record.ring), and its time here (--timeout).
                self.read_body(response.into_body(), usize::MAX, |chunk| {
                    if written.is_ok() {
                        lines += chunk.iter().filter(|&&b| b == b'\n').count();
                        written = sink.write_all(chunk);
                    }
                })
                .await?;
                Ok(written.and_then(|()| sink.flush()).map(|()| lines))
            },
        );
        drop(sink);
        let lines = copied
            .and_then(|written| written.map_err(failed_output))
            .and_then(|lines| match (&partial, output) {
                (Some(partial), Some(path)) => std::fs::rename(partial, path)
                    .map(|()| lines)
                    .map_err(failed_output),
                _ => Ok(lines),
            })
            .inspect_err(|_| {
                if let Some(partial) = &partial {
                    let _ = std::fs::remove_file(partial);
                }
            })?;
        let to = output.map_or("stdout".into(), |p| p.display().to_string());
        eprintln!("{lines} recorded questions written to {to}");
        Ok(())
    }

    /// One request and its answer, read by `read` when its status is a success (an error
    /// answer becomes a [`Failure::Refused`]), all within the timeout.
    fn exchange<T>(
        &self,
        method: Method,
        target: &str,
        body: Body,
        read: impl AsyncFnOnce(Response<Incoming>) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let mut request = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, self.addr.to_string())
            .body(body)
            .expect("a request of a known method and path");
        if let Some((token, _)) = &self.token {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, token.clone());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Failure::Runtime)?;
        runtime.block_on(async {
            tokio::time::timeout(self.timeout, async {
                let response = self.send(request).await?;
                let status = response.status();
                if status.is_success() {
                    return read(response).await;
                }
                let json = has_content_type(&response, "application/json");
                let mut answer = Vec::new();
                self.read_body(response.into_body(), MAX_ERROR_ANSWER, |chunk| {
                    answer.extend_from_slice(chunk)
                })
                .await?;
                let error = json
                    .then(|| serde_json::from_slice(&answer).ok())
                    .flatten()
                    .ok_or_else(|| Failure::NotTheHost {
                        addr: self.addr,
                        status,
                        what: "an error that is not the host's JSON".into(),
                    })?;
                Err(Failure::Refused(Refusal {
                    status,
                    body: error,
                    token_from: self.token.as_ref().map(|(_, setting)| *setting),
                }))
            })
            .await
            .unwrap_or(Err(Failure::TimedOut {
                addr: self.addr,
                after: self.timeout,
            }))
        })
    }

    /// Connects and sends `request`: the answer's head.
    async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, Failure> {
        let addr = self.addr;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            .map_err(|error| Failure::Unreachable { addr, error })?;
        let broken = |error| Failure::Broken { addr, error };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(broken)?;
        // The connection's own task: it moves the bytes while `send_request` waits. Its end
        // (or its error) is also seen by the request, so it needs no handling of its own.
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(broken)
    }

    /// Hands each chunk of `body` to `sink`, refusing a body longer than `max` bytes in all.
    async fn read_body(
        &self,
        mut body: Incoming,
        max: usize,
        mut sink: impl FnMut(&Bytes),
    ) -> Result<(), Failure> {
        let mut total = 0usize;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|error| Failure::Broken {
                addr: self.addr,
                error,
            })?;
            // Trailers, the other kind of frame, say nothing a client here needs.
            if let Ok(chunk) = frame.into_data() {
                total = total.saturating_add(chunk.len());
                if total > max {
                    return Err(Failure::TooLong {
                        addr: self.addr,
                        max,
                    });
                }
                sink(&chunk);
            }
        }
        Ok(())
    }
}

/// Where to ask a host that listens at `listen`: on loopback if it listens on every address.
fn address_to_ask(listen: SocketAddr) -> Result<SocketAddr, ConfigError> {
    if listen.port() == 0 {
        return Err(ConfigError::new(
            settings::LISTEN.key,
            "is port 0, which a host replaces with a free port it logs: give that address",
        ));
    }
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, listen.port()))
}

fn has_content_type(response: &Response<Incoming>, expected: &str) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn a_host_on_every_address_is_asked_on_loopback() {
        let asked = |listen: &str| address_to_ask(listen.parse().unwrap());
        assert_eq!(asked("0.0.0.0:7070").unwrap().to_string(), "127.0.0.1:7070");
        assert_eq!(asked("[::]:7070").unwrap().to_string(), "[::1]:7070");
        assert_eq!(asked("10.1.2.3:7070").unwrap().to_string(), "10.1.2.3:7070");
        let err = asked("127.0.0.1:0").unwrap_err();
        assert_eq!(err.field, "listen");
        assert!(err.message.contains("port 0"), "{err}");
    }

    #[test]
    fn a_query_component_escapes_all_but_unreserved_bytes() {
        assert_eq!(percent_encoded("ttl-ms"), "ttl-ms");
        assert_eq!(percent_encoded("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}

//! Authentication as etcd does it (a user and password for a token, the token on every call),
//! without an etcd round trip per client: a (user, password) pair is checked against etcd once,
//! and the verdict remembered for the credential TTL, keyed by a salted hash (the password
//! itself is never kept). Concurrent first logins with one credential share one check, so 500
//! processes starting together with one credential cost etcd one `Authenticate`.
//!
//! While etcd cannot answer, a credential it accepted before is still accepted (its verdict may
//! have run out): a process restarting during an outage can register, as one that kept running
//! can renew. A credential never accepted cannot log in until etcd answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::convert::Infallible;
use std::task::{Context, Poll};

use etcd_client::proto::{PbAuthenticateRequest, PbAuthenticateResponse};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tonic::Status;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};

use super::stats::{EtcdApiStats, Stat};
use super::{Endpoint, status};
use crate::registry::{Registry, Verdict};

/// How long a token lives without use: etcd's simple tokens' default.
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// How long a refused credential is remembered: long enough that a client retrying a wrong
/// password in a loop costs etcd little, short enough that a password just set works soon.
const REFUSED_TTL: Duration = Duration::from_secs(5);

/// Verdicts kept at most; past it, expired ones are dropped (refusals first, acceptances being
/// what outages are served from), and if none has expired the new verdict is not kept.
const MAX_VERDICTS: usize = 100_000;

/// Credentials checked with etcd at once, over all clients: wrong passwords in bulk must not
/// swamp etcd (each costs it a bcrypt) or the host's own connection to it.
const MAX_CHECKS_IN_FLIGHT: usize = 4;

/// How long a login waits for its turn to be checked with etcd.
const CHECK_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// How long an earlier acceptance is taken again while etcd cannot answer, so that the logins
/// waiting behind the one that asked do not each wait for etcd in turn.
const OUTAGE_VERDICT_TTL: Duration = Duration::from_secs(5);

/// The gRPC metadata key of etcd's token.
const TOKEN_KEY: &str = "token";

type CredentialKey = [u8; 32];

struct Remembered {
    valid: bool,
    until: Instant,
}

/// The endpoint's authentication.
pub(super) struct Auth {
    /// etcd's authentication is on: clients need a token.
    required: bool,
    registry: Arc<dyn Registry>,
    credential_ttl: Duration,
    salt: [u8; 16],
    verdicts: Mutex<HashMap<CredentialKey, Remembered>>,
    /// One check in flight per credential.
    checks: Mutex<HashMap<CredentialKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Checks in flight over all credentials.
    checking: tokio::sync::Semaphore,
    tokens: Mutex<Tokens>,
    stats: Arc<EtcdApiStats>,
}

impl Auth {
    pub(super) fn new(
        required: bool,
        registry: Arc<dyn Registry>,
        credential_ttl: Duration,
        stats: Arc<EtcdApiStats>,
    ) -> Self {
        Auth {
            required,
            registry,
            credential_ttl,
            salt: rand::random(),
            verdicts: Mutex::default(),
            checks: Mutex::default(),
            checking: tokio::sync::Semaphore::new(MAX_CHECKS_IN_FLIGHT),
            tokens: Mutex::default(),
            stats,
        }
    }

    /// etcd's `Authenticate`: a token for a valid user and password.
    pub(super) async fn authenticate(&self, user: &str, password: &str) -> Result<String, Status> {
        if !self.required {
            return Err(status::auth_not_enabled());
        }
        if user.is_empty() {
            return Err(status::user_empty());
        }
        let key = self.credential_key(user, password);
        if !self.verified(key, user, password).await? {
            self.stats.inc(Stat::LoginsRefused);
            return Err(status::auth_failed());
        }
        Ok(self.tokens.lock().unwrap().issue(key, Instant::now()))
    }

    /// Whether the credential is valid: the remembered verdict, or etcd's, asked once for all
    /// concurrent callers.
    async fn verified(
        &self,
        key: CredentialKey,
        user: &str,
        password: &str,
    ) -> Result<bool, Status> {
        if let Some(valid) = self.remembered(key, Instant::now()) {
            self.stats.inc(Stat::LoginsRemembered);
            return Ok(valid);
        }
        let check = self.checks.lock().unwrap().entry(key).or_default().clone();
        // Whoever leaves (answered, or its caller gone) takes the entry out: the map holds
        // only credentials being checked.
        let _leaving = CheckEntry {
            checks: &self.checks,
            key,
        };
        let _turn = check.lock().await;
        // The caller ahead may have asked etcd meanwhile.
        if let Some(valid) = self.remembered(key, Instant::now()) {
            self.stats.inc(Stat::LoginsRemembered);
            return Ok(valid);
        }
        let Ok(Ok(_permit)) = tokio::time::timeout(CHECK_QUEUE_WAIT, self.checking.acquire()).await
        else {
            return Err(Status::unavailable(
                "regcache: too many logins are being checked with etcd; try again",
            ));
        };
        self.stats.inc(Stat::LoginsCheckedWithEtcd);
        self.ask_registry(key, user, password).await
    }

    async fn ask_registry(
        &self,
        key: CredentialKey,
        user: &str,
        password: &str,
    ) -> Result<bool, Status> {
        match self.registry.verify_credentials(user, password).await {
            Ok(Verdict::Valid) => {
                self.remember(key, true, self.credential_ttl);
                Ok(true)
            }
            Ok(Verdict::Refused) => {
                self.remember(key, false, REFUSED_TTL);
                Ok(false)
            }
            Ok(Verdict::AuthDisabled) => Err(status::auth_not_enabled()),
            Err(e) if e.kind.is_outage() => {
                let accepted_before = self
                    .verdicts
                    .lock()
                    .unwrap()
                    .get(&key)
                    .is_some_and(|r| r.valid);
                if accepted_before {
                    tracing::debug!(error = %e, "etcd cannot check a credential; it was valid before");
                    self.remember(key, true, OUTAGE_VERDICT_TTL);
                    Ok(true)
                } else {
                    Err(status::registry(&e))
                }
            }
            Err(e) => Err(status::registry(&e)),
        }
    }

    fn remembered(&self, key: CredentialKey, now: Instant) -> Option<bool> {
        let verdicts = self.verdicts.lock().unwrap();
        verdicts
            .get(&key)
            .filter(|r| r.until > now)
            .map(|r| r.valid)
    }

    fn remember(&self, key: CredentialKey, valid: bool, ttl: Duration) {
        let now = Instant::now();
        let mut verdicts = self.verdicts.lock().unwrap();
        if verdicts.len() >= MAX_VERDICTS {
            // Expired refusals go; expired acceptances are kept for outages while there is room.
            verdicts.retain(|_, r| r.until > now || r.valid);
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.retain(|_, r| r.until > now);
            }
        }
        if verdicts.len() < MAX_VERDICTS {
            verdicts.insert(
                key,
                Remembered {
                    valid,
                    until: now + ttl,
                },
            );
        }
    }

    /// Checks the token of a call, as etcd does on every call when its authentication is on.
    pub(super) fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        if !self.required {
            return Ok(());
        }
        let Some(token) = metadata.get(TOKEN_KEY) else {
            return Err(status::user_empty());
        };
        let token = token.to_str().map_err(|_| status::invalid_token())?;
        if self.tokens.lock().unwrap().use_token(token, Instant::now()) {
            Ok(())
        } else {
            Err(status::invalid_token())
        }
    }

    fn credential_key(&self, user: &str, password: &str) -> CredentialKey {
        let mut hash = Sha256::new();
        hash.update(self.salt);
        // Lengths first, so that no two (user, password) pairs hash the same bytes.
        hash.update((user.len() as u64).to_le_bytes());
        hash.update(user.as_bytes());
        hash.update(password.as_bytes());
        hash.finalize().into()
    }
}

/// Removes a credential's entry from the map of checks in flight when its caller leaves.
struct CheckEntry<'a> {
    checks: &'a Mutex<HashMap<CredentialKey, Arc<tokio::sync::Mutex<()>>>>,
    key: CredentialKey,
}

impl Drop for CheckEntry<'_> {
    fn drop(&mut self) {
        self.checks.lock().unwrap().remove(&self.key);
    }
}

/// The tokens issued: one per valid credential at a time, shared by its clients (etcd would
/// issue one per login; any of them works the same), so the table is bounded by the
/// credentials etcd accepts, not by how often clients log in.
#[derive(Default)]
struct Tokens {
    by_token: HashMap<String, (CredentialKey, Instant)>,
    by_credential: HashMap<CredentialKey, String>,
}

impl Tokens {
    /// The credential's token, renewed, or a new one.
    fn issue(&mut self, key: CredentialKey, now: Instant) -> String {
        if let Some(token) = self.by_credential.get(&key).cloned()
            && self.use_token(&token, now)
        {
            return token;
        }
        let token = format!("regcache.{:032x}", rand::random::<u128>());
        if let Some(old) = self.by_credential.insert(key, token.clone()) {
            self.by_token.remove(&old);
        }
        self.by_token.insert(token.clone(), (key, now + TOKEN_TTL));
        token
    }

    /// Whether `token` is live; a use keeps it so for another [`TOKEN_TTL`].
    fn use_token(&mut self, token: &str, now: Instant) -> bool {
        match self.by_token.get_mut(token) {
            Some((_, expires)) if *expires > now => {
                *expires = now + TOKEN_TTL;
                true
            }
            Some(&mut (key, _)) => {
                self.by_token.remove(token);
                self.by_credential.remove(&key);
                false
            }
            None => false,
        }
    }
}

/// etcd's Auth service, of which the endpoint serves `Authenticate`; user and role management
/// belong to etcd. Written out rather than through the generated trait: the client crate does
/// not export every message that trait names.
#[derive(Clone)]
pub(super) struct AuthService(Endpoint);

impl AuthService {
    pub(super) fn new(endpoint: Endpoint) -> Self {
        AuthService(endpoint)
    }
}

impl NamedService for AuthService {
    const NAME: &'static str = "etcdserverpb.Auth";
}

impl<B> Service<http::Request<B>> for AuthService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let endpoint = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != "/etcdserverpb.Auth/Authenticate" {
                let refusal =
                    status::unserved("user and role management", endpoint.layout.prefix());
                return Ok(refusal.into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(Authenticate(endpoint), request).await)
        })
    }
}

/// The `Authenticate` call.
struct Authenticate(Endpoint);

impl UnaryService<PbAuthenticateRequest> for Authenticate {
    type Response = PbAuthenticateResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, Status>;

    fn call(&mut self, request: tonic::Request<PbAuthenticateRequest>) -> Self::Future {
        let endpoint = self.0.clone();
        Box::pin(async move {
            let request = request.into_inner();
            let token = endpoint
                .auth
                .authenticate(&request.name, &request.password)
                .await?;
            Ok(tonic::Response::new(PbAuthenticateResponse {
                header: endpoint.header(),
                token,
            }))
        })
    }
}

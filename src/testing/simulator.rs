//! The provider simulator: a token endpoint on loopback that behaves like a strict
//! provider.

// Handlers answer early with a ready response; its size does not matter here.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;
use url::Url;

use crate::clock::{Clock, SystemClock};
use crate::provider::ProviderProfile;

/// Which provider's wire format and rules the simulator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// RFC 6749: form body, client credentials in the body, JSON response.
    Generic,
    /// Lucid: JSON body, `expires` in epoch ms, `scopes` array, lowercase `bearer`; a
    /// refresh kills the previous access token.
    Lucid,
    /// HighQ: form body, `<TokenResponse>` XML with string numbers (or JSON, see
    /// [`SimulatorBuilder::highq_json`]), `refresh_token_expires_in`; 403 for bad tokens
    /// on the API.
    HighQ,
    /// Autodesk v2: form body, Basic client auth (credentials in both places = 400),
    /// optional `scope` narrowing.
    Autodesk,
}

/// A fault injected into one token request, before the grant is touched: the refresh
/// token presented stays valid, as with a failing gateway in front of a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this server error status.
    ServerError(u16),
    /// Answer 429 with `Retry-After` (HighQ mode: `X-Ratelimit-Reset`) of this many seconds.
    RateLimited(u64),
    /// Wait this long, then answer 503 (a client with a shorter timeout sees a timeout).
    Hang(Duration),
    /// Answer 200 with a body that is not a token response.
    Garbage,
    /// Answer 200 with a token response cut in half.
    Truncated,
    /// Answer 502 with an HTML error page.
    HtmlError,
    /// Answer 200 with an empty body.
    Empty,
}

/// What the simulator has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Token requests received, faults included.
    pub requests: u64,
    /// Successful refreshes (each rotated the refresh token).
    pub refreshes: u64,
    /// Refresh tokens presented again after they had been used.
    pub reuse_attempts: u64,
    /// Grants revoked because of reuse.
    pub revoked_grants: u64,
    /// Requests answered `invalid_grant`.
    pub invalid_grant: u64,
    /// Requests answered with an injected fault.
    pub faults: u64,
    /// Requests answered 4xx for bad client authentication or a malformed request.
    pub rejected_requests: u64,
}

/// Configures a [`Simulator`].
#[derive(Debug)]
pub struct SimulatorBuilder {
    mode: Mode,
    client_id: String,
    client_secret: Option<String>,
    access_lifetime: Duration,
    refresh_lifetime: Option<Duration>,
    response_delay: Duration,
    fault_rate: f64,
    fault_mix: Vec<Fault>,
    seed: u64,
    clock: Arc<dyn Clock>,
    highq_json: bool,
}

impl SimulatorBuilder {
    /// The client id the endpoint accepts. Default `"sim-client"`.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// The client secret the endpoint requires; `None` accepts public clients (id only).
    /// Default `Some("sim-secret")`.
    pub fn client_secret(mut self, secret: Option<&str>) -> Self {
        self.client_secret = secret.map(str::to_owned);
        self
    }

    /// The lifetime of issued access tokens. Default 1 hour.
    pub fn access_lifetime(mut self, lifetime: Duration) -> Self {
        self.access_lifetime = lifetime;
        self
    }

    /// The lifetime of issued refresh tokens (expired ones are `invalid_grant`); every
    /// rotation issues a token with a fresh lifetime. Default: the mode's provider's
    /// (Lucid 180 days, HighQ 1 year, Autodesk 15 days), none in generic mode.
    pub fn refresh_lifetime(mut self, lifetime: Duration) -> Self {
        self.refresh_lifetime = Some(lifetime);
        self
    }

    /// Issued refresh tokens never expire.
    pub fn no_refresh_expiry(mut self) -> Self {
        self.refresh_lifetime = None;
        self
    }

    /// Delay every successful token response by this long, after the grant rotated (the
    /// new tokens then exist only in the response on its way).
    pub fn response_delay(mut self, delay: Duration) -> Self {
        self.response_delay = delay;
        self
    }

    /// Inject a fault from `mix` into each request with probability `rate` (seeded).
    pub fn faults(mut self, rate: f64, mix: Vec<Fault>, seed: u64) -> Self {
        self.fault_rate = rate;
        self.fault_mix = mix;
        self.seed = seed;
        self
    }

    /// The clock for token validity on the API endpoint and refresh-token lifetimes.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// HighQ mode answers JSON instead of XML.
    pub fn highq_json(mut self, json: bool) -> Self {
        self.highq_json = json;
        self
    }

    /// Binds `127.0.0.1` on a free port and starts serving in the current tokio runtime.
    pub async fn start(self) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode: self.mode,
            client_id: self.client_id,
            client_secret: self.client_secret,
            access_lifetime: self.access_lifetime,
            refresh_lifetime: self.refresh_lifetime,
            response_delay: self.response_delay,
            highq_json: self.highq_json,
            clock: self.clock,
            state: Mutex::new(SimState {
                fault_rate: self.fault_rate,
                fault_mix: self.fault_mix,
                rng: Some(StdRng::seed_from_u64(self.seed)),
                ..SimState::default()
            }),
        });
        let app = Router::new()
            .route(token_path(self.mode), post(token_endpoint))
            .route(API_PATH, get(api_endpoint))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Simulator {
            addr,
            shared,
            server,
        })
    }
}

const API_PATH: &str = "/api/me";
/// HighQ mode's instance: the base URL is `http://127.0.0.1:{port}/collaborate/`.
const HIGHQ_INSTANCE_PATH: &str = "/collaborate/";

/// The token endpoint's path, as the mode's provider spells it.
fn token_path(mode: Mode) -> &'static str {
    match mode {
        Mode::Generic | Mode::Lucid => "/oauth2/token",
        Mode::HighQ => "/collaborate/api/oauth2/token",
        Mode::Autodesk => "/authentication/v2/token",
    }
}

/// A token endpoint on loopback that issues rotating, single-use refresh tokens and, like
/// real servers with reuse detection, revokes the whole grant when a used refresh token
/// comes back. It counts everything ([`Simulator::counters`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tokenkeeper::testing::{Mode, Simulator};
/// use tokenkeeper::{RefreshingTokenSource, TokenSource};
///
/// let sim = Simulator::builder(Mode::Lucid).start().await?;
/// let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
///     .initial_refresh_token(sim.issue_grant())
///     .build()?;
/// source.access_token().await?;
/// assert_eq!(sim.counters().refreshes, 1);
/// # Ok(())
/// # }
/// ```
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("mode", &self.shared.mode)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const DAY: u64 = 24 * 3600;

fn default_refresh_lifetime(mode: Mode) -> Option<Duration> {
    match mode {
        Mode::Generic => None,
        Mode::Lucid => Some(Duration::from_secs(180 * DAY)),
        Mode::HighQ => Some(Duration::from_secs(365 * DAY)),
        Mode::Autodesk => Some(Duration::from_secs(15 * DAY)),
    }
}

impl Simulator {
    /// Starts configuring a simulator speaking `mode`.
    pub fn builder(mode: Mode) -> SimulatorBuilder {
        SimulatorBuilder {
            mode,
            client_id: "sim-client".into(),
            client_secret: Some("sim-secret".into()),
            access_lifetime: Duration::from_secs(3600),
            refresh_lifetime: default_refresh_lifetime(mode),
            response_delay: Duration::ZERO,
            fault_rate: 0.0,
            fault_mix: Vec::new(),
            seed: 0,
            clock: Arc::new(SystemClock),
            highq_json: false,
        }
    }

    /// The token endpoint's URL, at the mode's provider's path (`/oauth2/token`,
    /// HighQ `/collaborate/api/oauth2/token`, Autodesk `/authentication/v2/token`).
    pub fn token_url(&self) -> Url {
        self.url(token_path(self.shared.mode))
    }

    /// A protected API endpoint: 200 with the caller's grant for a valid bearer token,
    /// else 401 (HighQ mode: 403).
    pub fn api_url(&self) -> Url {
        self.url(API_PATH)
    }

    /// The simulator's base URL; in HighQ mode the instance base URL
    /// (`http://127.0.0.1:{port}/collaborate/`), from which
    /// [`ProviderProfile::highq`] derives the token URL.
    pub fn base_url(&self) -> Url {
        match self.shared.mode {
            Mode::HighQ => self.url(HIGHQ_INSTANCE_PATH),
            _ => self.url("/"),
        }
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("http://{}{path}", self.addr)).expect("a loopback URL parses")
    }

    /// The profile of this mode's provider, pointed at the simulator.
    pub fn profile(&self) -> ProviderProfile {
        match self.shared.mode {
            Mode::Generic => ProviderProfile::generic(self.token_url()),
            Mode::Lucid => ProviderProfile::lucid().with_token_url(self.token_url()),
            Mode::HighQ => ProviderProfile::highq(self.base_url()),
            Mode::Autodesk => ProviderProfile::autodesk().with_token_url(self.token_url()),
        }
    }

    /// Client credentials the simulator accepts.
    pub fn credentials(&self) -> crate::ClientCredentials {
        match &self.shared.client_secret {
            Some(secret) => crate::ClientCredentials::new(&self.shared.client_id, secret),
            None => crate::ClientCredentials::public(&self.shared.client_id),
        }
    }

    /// Creates a grant (a user's consent) and returns its first refresh token.
    pub fn issue_grant(&self) -> String {
        let mut state = self.shared.state();
        let now = self.shared.clock.now();
        let grant = state.grants.len();
        state.grants.push(Grant {
            revoked: false,
            scopes: vec!["data:read".into(), "data:write".into()],
        });
        state.new_refresh_token(self.shared.mode, grant, now, self.shared.refresh_lifetime)
    }

    /// Everything counted so far.
    pub fn counters(&self) -> Counters {
        self.shared.state().counters
    }

    /// Answers the next requests with these faults, in order, before any random ones.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().queued_faults.extend(faults);
    }

    /// Changes the random fault rate (0 stops random faults).
    pub fn set_fault_rate(&self, rate: f64) {
        self.shared.state().fault_rate = rate;
    }

    /// Revokes every grant, as a user disconnecting the application would.
    pub fn revoke_all(&self) {
        let mut state = self.shared.state();
        for grant in &mut state.grants {
            grant.revoked = true;
        }
    }

    /// The refresh token currently valid for grant number `grant` (0 for the first).
    pub fn current_refresh_token(&self, grant: usize) -> Option<String> {
        let state = self.shared.state();
        state
            .refresh_tokens
            .iter()
            .find(|(_, r)| r.grant == grant && !r.used)
            .map(|(token, _)| token.clone())
    }
}

struct Shared {
    mode: Mode,
    client_id: String,
    client_secret: Option<String>,
    access_lifetime: Duration,
    refresh_lifetime: Option<Duration>,
    response_delay: Duration,
    highq_json: bool,
    clock: Arc<dyn Clock>,
    state: Mutex<SimState>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct SimState {
    counters: Counters,
    grants: Vec<Grant>,
    refresh_tokens: HashMap<String, IssuedRefresh>,
    access_tokens: HashMap<String, IssuedAccess>,
    queued_faults: VecDeque<Fault>,
    fault_rate: f64,
    fault_mix: Vec<Fault>,
    rng: Option<StdRng>,
    serial: u64,
}

struct Grant {
    revoked: bool,
    scopes: Vec<String>,
}

struct IssuedRefresh {
    grant: usize,
    used: bool,
    expires_at: Option<OffsetDateTime>,
}

struct IssuedAccess {
    grant: usize,
    expires_at: OffsetDateTime,
    revoked: bool,
}

impl SimState {
    fn token(&mut self, prefix: &str) -> String {
        self.serial += 1;
        let noise: u64 = match &mut self.rng {
            Some(rng) => rng.random(),
            None => rand::rng().random(),
        };
        format!("{prefix}{:06}-{noise:016x}", self.serial)
    }

    fn new_refresh_token(
        &mut self,
        mode: Mode,
        grant: usize,
        now: OffsetDateTime,
        lifetime: Option<Duration>,
    ) -> String {
        // Lucid's tokens both start `oauth2-`.
        let token = self.token(if mode == Mode::Lucid {
            "oauth2-rt-"
        } else {
            "sim-rt-"
        });
        self.refresh_tokens.insert(
            token.clone(),
            IssuedRefresh {
                grant,
                used: false,
                expires_at: lifetime.map(|l| now + l),
            },
        );
        token
    }

    fn next_fault(&mut self) -> Option<Fault> {
        if let Some(fault) = self.queued_faults.pop_front() {
            return Some(fault);
        }
        if self.fault_rate <= 0.0 || self.fault_mix.is_empty() {
            return None;
        }
        let rng = self.rng.get_or_insert_with(|| StdRng::seed_from_u64(0));
        if rng.random_bool(self.fault_rate.min(1.0)) {
            let i = rng.random_range(0..self.fault_mix.len());
            Some(self.fault_mix[i].clone())
        } else {
            None
        }
    }
}

/// The fields of a refresh request, whatever its encoding.
struct RefreshRequest {
    fields: HashMap<String, String>,
    basic: Option<(String, String)>,
}

async fn token_endpoint(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = {
        let mut state = sim.state();
        state.counters.requests += 1;
        let fault = state.next_fault();
        if fault.is_some() {
            state.counters.faults += 1;
        }
        fault
    };
    if let Some(fault) = fault {
        return fault_response(&sim, fault).await;
    }
    let request = match parse_request(&sim, &headers, &body) {
        Ok(r) => r,
        Err(response) => {
            sim.state().counters.rejected_requests += 1;
            return response;
        }
    };
    if let Err(response) = check_client(&sim, &request) {
        sim.state().counters.rejected_requests += 1;
        return response;
    }
    if request.fields.get("grant_type").map(String::as_str) != Some("refresh_token") {
        sim.state().counters.rejected_requests += 1;
        return oauth_error(
            &sim,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only refresh_token",
        );
    }
    let Some(presented) = request.fields.get("refresh_token").cloned() else {
        sim.state().counters.rejected_requests += 1;
        return oauth_error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "refresh_token missing",
        );
    };
    let requested_scope = request.fields.get("scope").cloned();
    let issued = match rotate(&sim, &presented, requested_scope.as_deref()) {
        Ok(issued) => issued,
        Err(response) => return response,
    };
    if !sim.response_delay.is_zero() {
        tokio::time::sleep(sim.response_delay).await;
    }
    token_response(&sim, issued)
}

struct Issued {
    access_token: String,
    refresh_token: String,
    grant: usize,
    scopes: Vec<String>,
    now: OffsetDateTime,
}

/// Checks the presented refresh token and rotates the grant: the heart of the simulator.
fn rotate(sim: &Shared, presented: &str, scope: Option<&str>) -> Result<Issued, Response> {
    let now = sim.clock.now();
    let mut state = sim.state();
    let Some(issued) = state.refresh_tokens.get(presented) else {
        state.counters.invalid_grant += 1;
        drop(state);
        return Err(oauth_error(
            sim,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown refresh token",
        ));
    };
    let grant = issued.grant;
    let used = issued.used;
    let expired = issued.expires_at.is_some_and(|at| now >= at);
    if used {
        // Reuse detection: the whole grant dies, as with oidc-provider, Auth0, Okta.
        state.counters.reuse_attempts += 1;
        if !state.grants[grant].revoked {
            state.grants[grant].revoked = true;
            state.counters.revoked_grants += 1;
        }
    }
    if used || expired || state.grants[grant].revoked {
        state.counters.invalid_grant += 1;
        drop(state);
        return Err(oauth_error(
            sim,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "refresh token is invalid, expired or revoked",
        ));
    }
    let granted = state.grants[grant].scopes.clone();
    let scopes = match scope {
        Some(requested) => {
            let requested: Vec<String> = requested.split_whitespace().map(str::to_owned).collect();
            if requested.iter().any(|s| !granted.contains(s)) {
                drop(state);
                return Err(oauth_error(
                    sim,
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    "scope exceeds the grant",
                ));
            }
            requested
        }
        None => granted,
    };
    if let Some(issued) = state.refresh_tokens.get_mut(presented) {
        issued.used = true;
    }
    if sim.mode == Mode::Lucid {
        // Lucid: a refresh kills the grant's previous access tokens.
        for access in state
            .access_tokens
            .values_mut()
            .filter(|a| a.grant == grant)
        {
            access.revoked = true;
        }
    }
    let refresh_token = state.new_refresh_token(sim.mode, grant, now, sim.refresh_lifetime);
    let access_token = state.token(if sim.mode == Mode::Lucid {
        "oauth2-at-"
    } else {
        "sim-at-"
    });
    state.access_tokens.insert(
        access_token.clone(),
        IssuedAccess {
            grant,
            expires_at: now + sim.access_lifetime,
            revoked: false,
        },
    );
    state.counters.refreshes += 1;
    Ok(Issued {
        access_token,
        refresh_token,
        grant,
        scopes,
        now,
    })
}

fn parse_request(
    sim: &Shared,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<RefreshRequest, Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let fields: HashMap<String, String> = match sim.mode {
        Mode::Lucid => {
            if !content_type.starts_with("application/json") {
                return Err(oauth_error(
                    sim,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "JSON body required",
                ));
            }
            let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
                return Err(oauth_error(
                    sim,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "malformed JSON",
                ));
            };
            map.into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
                .collect()
        }
        _ => {
            if !content_type.starts_with("application/x-www-form-urlencoded") {
                let status = if sim.mode == Mode::Autodesk {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE
                } else {
                    StatusCode::BAD_REQUEST
                };
                return Err(oauth_error(
                    sim,
                    status,
                    "invalid_request",
                    "form body required",
                ));
            }
            url::form_urlencoded::parse(body).into_owned().collect()
        }
    };
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(decode_basic);
    Ok(RefreshRequest { fields, basic })
}

fn decode_basic(encoded: &str) -> Option<(String, String)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((decode(id)?, decode(secret)?))
}

/// Client authentication as the mode's provider checks it.
fn check_client(sim: &Shared, request: &RefreshRequest) -> Result<(), Response> {
    let body_id = request.fields.get("client_id");
    let body_secret = request.fields.get("client_secret");
    let invalid_client = |status| {
        oauth_error(
            sim,
            status,
            "invalid_client",
            "client authentication failed",
        )
    };
    let (id, secret) = match (&request.basic, body_id) {
        (Some(_), Some(_)) if sim.mode == Mode::Autodesk => {
            return Err(oauth_error(
                sim,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "client credentials in both header and body",
            ));
        }
        (Some((id, secret)), None) => (id.clone(), Some(secret.clone())),
        (None, Some(id)) => (id.clone(), body_secret.cloned()),
        (Some((id, secret)), Some(_)) => (id.clone(), Some(secret.clone())),
        (None, None) => return Err(invalid_client(StatusCode::UNAUTHORIZED)),
    };
    if matches!(sim.mode, Mode::Lucid | Mode::HighQ) && request.basic.is_some() {
        // These providers read the client credentials from the body only.
        return Err(invalid_client(StatusCode::UNAUTHORIZED));
    }
    if sim.mode == Mode::Autodesk && request.basic.is_none() && body_secret.is_some() {
        return Err(oauth_error(
            sim,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "confidential clients use Basic authentication",
        ));
    }
    if id != sim.client_id || secret.as_deref() != sim.client_secret.as_deref() {
        return Err(invalid_client(StatusCode::UNAUTHORIZED));
    }
    Ok(())
}

fn token_response(sim: &Shared, issued: Issued) -> Response {
    let lifetime = sim.access_lifetime.as_secs();
    let refresh_lifetime = sim
        .refresh_lifetime
        .unwrap_or(Duration::from_secs(365 * DAY))
        .as_secs();
    match sim.mode {
        Mode::Generic => json_response(json!({
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "refresh_token": issued.refresh_token,
            "scope": issued.scopes.join(" "),
        })),
        Mode::Lucid => {
            let expires_ms = (issued.now + sim.access_lifetime).unix_timestamp_nanos() / 1_000_000;
            json_response(json!({
                "access_token": issued.access_token,
                "refresh_token": issued.refresh_token,
                "expires_in": lifetime,
                "expires": expires_ms as i64,
                "scopes": issued.scopes,
                "token_type": "bearer",
                "client_id": sim.client_id,
                "user_id": 1000 + issued.grant,
            }))
        }
        Mode::Autodesk => json_response(json!({
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": lifetime.saturating_sub(1),
            "refresh_token": issued.refresh_token,
        })),
        Mode::HighQ if sim.highq_json => json_response(json!({
            "access_token": issued.access_token,
            "token_type": "bearer",
            "expires_in": lifetime.to_string(),
            "refresh_token": issued.refresh_token,
            "refresh_token_expires_in": refresh_lifetime.to_string(),
            "useremail": format!("user{}@example.com", issued.grant),
        })),
        Mode::HighQ => xml_response(
            StatusCode::OK,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<TokenResponse><access_token>{}</access_token><expires_in>{lifetime}</expires_in><refresh_token>{}</refresh_token><refresh_token_expires_in>{refresh_lifetime}</refresh_token_expires_in><token_type>bearer</token_type><useremail>user{}@example.com</useremail></TokenResponse>",
                issued.access_token, issued.refresh_token, issued.grant
            ),
        ),
    }
}

async fn fault_response(sim: &Shared, fault: Fault) -> Response {
    match fault {
        Fault::ServerError(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, "server error").into_response()
        }
        Fault::RateLimited(seconds) => {
            let mut response = oauth_error(
                sim,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "slow down",
            );
            let headers = response.headers_mut();
            if sim.mode == Mode::HighQ {
                let reset = sim.clock.now().unix_timestamp() + seconds as i64;
                headers.insert("X-Ratelimit-Reset", HeaderValue::from(reset));
            } else {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            response
        }
        Fault::Hang(duration) => {
            tokio::time::sleep(duration).await;
            (StatusCode::SERVICE_UNAVAILABLE, "gave up").into_response()
        }
        Fault::Garbage => json_response(json!({"unexpected": [1, 2, 3]})),
        Fault::Truncated => {
            let mut response = Response::new(Body::from("{\"access_token\":\"sim-at-trunc"));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Fault::HtmlError => {
            let mut response = Response::new(Body::from(
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            ));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            response
        }
        Fault::Empty => StatusCode::OK.into_response(),
    }
}

async fn api_endpoint(State(sim): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned);
    let now = sim.clock.now();
    let grant = {
        let state = sim.state();
        bearer.and_then(|token| {
            state
                .access_tokens
                .get(&token)
                .filter(|a| !a.revoked && now < a.expires_at && !state.grants[a.grant].revoked)
                .map(|a| a.grant)
        })
    };
    match grant {
        Some(grant) => json_response(json!({ "grant": grant })),
        None if sim.mode == Mode::HighQ => (StatusCode::FORBIDDEN, "Access denied").into_response(),
        None => (StatusCode::UNAUTHORIZED, "invalid token").into_response(),
    }
}

fn oauth_error(sim: &Shared, status: StatusCode, code: &str, description: &str) -> Response {
    match sim.mode {
        Mode::HighQ if !sim.highq_json => xml_response(
            status,
            format!(
                "<?xml version=\"1.0\"?><ErrorResponse><error>{code}</error><error_description>{description}</error_description></ErrorResponse>"
            ),
        ),
        Mode::Autodesk if code != "invalid_grant" => {
            let mut response = json_response(json!({
                "developerMessage": description,
                "userMessage": "",
                "errorCode": code,
            }));
            *response.status_mut() = status;
            response
        }
        _ => {
            let mut response =
                json_response(json!({"error": code, "error_description": description}));
            *response.status_mut() = status;
            response
        }
    }
}

fn json_response(body: Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn xml_response(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    response
}

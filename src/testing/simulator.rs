//! The provider simulator: a token endpoint on loopback that behaves like a strict
//! provider, with an auto-consenting authorization endpoint, the device authorization
//! grant (RFC 8628) and token revocation (RFC 7009).

// Handlers answer early with a ready response; its size does not matter here.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;
use url::Url;

use crate::clock::{Clock, SystemClock};
use crate::provider::{BodyEncoding, ProviderProfile};

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
    /// Requests answered 4xx for bad client authentication or a malformed request (at
    /// any endpoint; a rejected authorization request too).
    pub rejected_requests: u64,
    /// Authorization requests answered with a code (auto-consent).
    pub authorizations: u64,
    /// Authorization codes exchanged for tokens.
    pub code_exchanges: u64,
    /// Code exchanges whose PKCE `code_verifier` matched the S256 challenge.
    pub pkce_verified: u64,
    /// Authorization codes presented again after they had been exchanged (the grant
    /// issued from the code is then revoked).
    pub code_reuse: u64,
    /// Device authorization requests answered with a device code.
    pub device_authorizations: u64,
    /// Device-code polls at the token endpoint, whatever their answer.
    pub device_polls: u64,
    /// Device-code polls answered `slow_down`.
    pub slow_downs: u64,
    /// Revocation requests accepted (unknown tokens included, as RFC 7009 answers them).
    pub revocations: u64,
}

/// Configures a [`Simulator`]. Its `Debug` hides the client secret.
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
    redirect_uris: Vec<String>,
    echo_state: bool,
    deny_consent: bool,
    code_lifetime: Duration,
    device_interval: Duration,
    device_code_lifetime: Duration,
    device_auto_approve_after: Option<u32>,
    port: u16,
}

impl fmt::Debug for SimulatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorBuilder")
            .field("mode", &self.mode)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("access_lifetime", &self.access_lifetime)
            .field("refresh_lifetime", &self.refresh_lifetime)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
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

    /// Registers redirect URIs: the authorization endpoint then accepts exactly these
    /// (string equality). With none registered (the default) it accepts any loopback
    /// `http` URI (`127.0.0.1`, `localhost`, `[::1]`, any port and path) and any `https`
    /// URI. May be called more than once.
    pub fn redirect_uris(mut self, uris: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.redirect_uris.extend(uris.into_iter().map(Into::into));
        self
    }

    /// Whether the authorization endpoint echoes `state` on its redirect. Default `true`;
    /// `false` behaves like servers that drop it (HighQ's may).
    pub fn echo_state(mut self, echo: bool) -> Self {
        self.echo_state = echo;
        self
    }

    /// When `true`, the authorization endpoint redirects with `error=access_denied` instead
    /// of a code, as if the person had refused consent. Default `false`.
    pub fn deny_consent(mut self, deny: bool) -> Self {
        self.deny_consent = deny;
        self
    }

    /// How long an authorization code may be exchanged, by the simulator's clock.
    /// Default 60 seconds.
    pub fn code_lifetime(mut self, lifetime: Duration) -> Self {
        self.code_lifetime = lifetime;
        self
    }

    /// The device-code polling interval announced and enforced (whole seconds, at least
    /// 1; polling sooner is answered `slow_down`). Default 5 seconds.
    pub fn device_interval(mut self, interval: Duration) -> Self {
        self.device_interval = interval;
        self
    }

    /// How long a device code stays valid, by the simulator's clock (`expired_token`
    /// after). Default 600 seconds.
    pub fn device_code_lifetime(mut self, lifetime: Duration) -> Self {
        self.device_code_lifetime = lifetime;
        self
    }

    /// Approves each device code by itself on its `polls`-th poll (polls answered
    /// `slow_down` do not count; 0 counts as 1), so that tests need not call
    /// [`Simulator::approve_device`]. Default: never.
    pub fn device_auto_approve_after(mut self, polls: u32) -> Self {
        self.device_auto_approve_after = Some(polls.max(1));
        self
    }

    /// The port to listen on (`127.0.0.1` only). Default 0: any free port (see
    /// [`Simulator::token_url`] and the other URLs for the one chosen).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Binds `127.0.0.1` on the port (default: a free one) and starts serving in the
    /// current tokio runtime. Fails when the port is taken.
    pub async fn start(self) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        let addr = listener.local_addr()?;
        let device_interval = time::Duration::seconds(
            i64::try_from(self.device_interval.as_secs().max(1)).unwrap_or(i64::MAX),
        );
        let shared = Arc::new(Shared {
            addr,
            redirect_uris: self.redirect_uris,
            echo_state: self.echo_state,
            deny_consent: self.deny_consent,
            code_lifetime: self.code_lifetime,
            device_interval,
            device_code_lifetime: self.device_code_lifetime,
            device_auto_approve_after: self.device_auto_approve_after,
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
        let mut app = Router::new()
            .route(token_path(self.mode), post(token_endpoint))
            .route(authorization_path(self.mode), get(authorize_endpoint))
            .route(DEVICE_AUTHORIZATION_PATH, post(device_endpoint))
            .route(DEVICE_VERIFICATION_PATH, get(device_verification_page))
            .route(API_PATH, get(api_endpoint));
        if self.mode == Mode::Lucid {
            // Lucid's legacy refresh path takes every grant type too.
            app = app.route(LUCID_LEGACY_REFRESH_PATH, post(token_endpoint));
        }
        if let Some(path) = revocation_path(self.mode) {
            app = app.route(path, post(revoke_endpoint));
        }
        let app = app.with_state(Arc::clone(&shared));
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

/// Lucid's legacy refresh endpoint, routed to the token endpoint in Lucid mode.
const LUCID_LEGACY_REFRESH_PATH: &str = "/oauth2/refreshToken";
/// The device authorization endpoint (RFC 8628), in every mode.
const DEVICE_AUTHORIZATION_PATH: &str = "/oauth2/device";
/// The device flow's verification page (`verification_uri`).
const DEVICE_VERIFICATION_PATH: &str = "/device";
/// The device-code grant type (RFC 8628 3.4).
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The token endpoint's path, as the mode's provider spells it.
fn token_path(mode: Mode) -> &'static str {
    match mode {
        Mode::Generic | Mode::Lucid => "/oauth2/token",
        Mode::HighQ => "/collaborate/api/oauth2/token",
        Mode::Autodesk => "/authentication/v2/token",
    }
}

/// The authorization endpoint's path, as the mode's provider spells it.
fn authorization_path(mode: Mode) -> &'static str {
    match mode {
        Mode::Generic | Mode::Lucid => "/oauth2/authorize",
        Mode::HighQ => "/collaborate/authorize.action",
        Mode::Autodesk => "/authentication/v2/authorize",
    }
}

/// The revocation endpoint's path; HighQ has none.
fn revocation_path(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Generic => Some("/oauth2/revoke"),
        Mode::Lucid => Some("/oauth2/token/revoke"),
        Mode::HighQ => None,
        Mode::Autodesk => Some("/authentication/v2/revoke"),
    }
}

/// The scopes of a grant when none were asked for.
fn default_scopes() -> Vec<String> {
    vec!["data:read".into(), "data:write".into()]
}

/// A token endpoint on loopback that issues rotating, single-use refresh tokens and, like
/// real servers with reuse detection, revokes the whole grant when a used refresh token
/// comes back. It counts everything ([`Simulator::counters`]).
///
/// Grants come from [`Simulator::issue_grant`], or as a real client gets them: the
/// authorization-code grant at [`Simulator::authorization_url`] (consent is automatic;
/// PKCE S256 is checked when a challenge is sent), or the device authorization grant
/// (RFC 8628) at [`Simulator::device_authorization_url`] (approve with
/// [`Simulator::approve_device`] or [`SimulatorBuilder::device_auto_approve_after`]).
/// Tokens are revoked (the whole grant) at [`Simulator::revocation_url`].
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
            redirect_uris: Vec::new(),
            echo_state: true,
            deny_consent: false,
            code_lifetime: Duration::from_secs(60),
            device_interval: Duration::from_secs(5),
            device_code_lifetime: Duration::from_secs(600),
            device_auto_approve_after: None,
            port: 0,
        }
    }

    /// The token endpoint's URL, at the mode's provider's path (`/oauth2/token`,
    /// HighQ `/collaborate/api/oauth2/token`, Autodesk `/authentication/v2/token`).
    pub fn token_url(&self) -> Url {
        self.url(token_path(self.shared.mode))
    }

    /// A protected API endpoint: 200 with the caller's grant and the token's scopes
    /// (`{"grant": 0, "scope": "data:read data:write"}`) for a valid bearer token, else
    /// 401 (HighQ mode: 403). With `?scope=a+b`, a valid token lacking one of these
    /// scopes is answered 403 `insufficient_scope` (RFC 6750).
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

    /// The authorization endpoint (auto-consent), at the mode's provider's path
    /// (`/oauth2/authorize`, HighQ `/collaborate/authorize.action`, Autodesk
    /// `/authentication/v2/authorize`). It redirects with a single-use code, or with
    /// `error=access_denied` when [`SimulatorBuilder::deny_consent`] is set.
    pub fn authorization_url(&self) -> Url {
        self.url(authorization_path(self.shared.mode))
    }

    /// The device authorization endpoint (RFC 8628), `/oauth2/device` in every mode.
    pub fn device_authorization_url(&self) -> Url {
        self.url(DEVICE_AUTHORIZATION_PATH)
    }

    /// The revocation endpoint (RFC 7009): `/oauth2/revoke`, Lucid `/oauth2/token/revoke`,
    /// Autodesk `/authentication/v2/revoke`; `None` in HighQ mode, which has none.
    pub fn revocation_url(&self) -> Option<Url> {
        revocation_path(self.shared.mode).map(|path| self.url(path))
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("http://{}{path}", self.addr)).expect("a loopback URL parses")
    }

    /// The profile of this mode's provider, pointed at the simulator: its token,
    /// authorization, device authorization and revocation URLs (none in HighQ mode).
    pub fn profile(&self) -> ProviderProfile {
        let mut profile = match self.shared.mode {
            Mode::Generic => ProviderProfile::generic(self.token_url()),
            Mode::Lucid => ProviderProfile::lucid().with_token_url(self.token_url()),
            Mode::HighQ => ProviderProfile::highq(self.base_url()),
            Mode::Autodesk => ProviderProfile::autodesk().with_token_url(self.token_url()),
        };
        profile.authorization_url = Some(self.authorization_url());
        profile.device_authorization_url = Some(self.device_authorization_url());
        profile.revocation_url = self.revocation_url();
        profile
    }

    /// Client credentials the simulator accepts.
    pub fn credentials(&self) -> crate::ClientCredentials {
        match &self.shared.client_secret {
            Some(secret) => crate::ClientCredentials::new(&self.shared.client_id, secret),
            None => crate::ClientCredentials::public(&self.shared.client_id),
        }
    }

    /// Creates a grant (a user's consent) with the default scopes (`data:read
    /// data:write`) and returns its first refresh token.
    pub fn issue_grant(&self) -> String {
        self.issue_grant_with_scopes(default_scopes())
    }

    /// Creates a grant (a user's consent) to these scopes and returns its first refresh
    /// token. Its refreshes may ask for a subset (`invalid_scope` beyond it), and its
    /// access tokens pass the API endpoint's `?scope=` check for these scopes only.
    pub fn issue_grant_with_scopes(
        &self,
        scopes: impl IntoIterator<Item = impl Into<String>>,
    ) -> String {
        let scopes = scopes.into_iter().map(Into::into).collect();
        let mut state = self.shared.state();
        let now = self.shared.clock.now();
        let grant = state.new_grant(scopes);
        state.new_refresh_token(self.shared.mode, grant, now, self.shared.refresh_lifetime)
    }

    /// The scopes grant number `grant` was consented to; `None` for a grant that does
    /// not exist.
    pub fn grant_scopes(&self, grant: usize) -> Option<Vec<String>> {
        self.shared
            .state()
            .grants
            .get(grant)
            .map(|g| g.scopes.clone())
    }

    /// How many grants exist (revoked ones included); grants are numbered from 0 in the
    /// order they were created.
    pub fn grants(&self) -> usize {
        self.shared.state().grants.len()
    }

    /// Whether grant number `grant` has been revoked (reuse, revocation, a reused
    /// authorization code, [`Simulator::revoke_all`]); `false` for a grant that does not
    /// exist.
    pub fn grant_revoked(&self, grant: usize) -> bool {
        self.shared
            .state()
            .grants
            .get(grant)
            .is_some_and(|g| g.revoked)
    }

    /// Approves the pending device authorization with this user code (case and dashes
    /// ignored): its next poll gets tokens. `false` when no pending, unexpired
    /// authorization has this code.
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.decide_device(user_code, DeviceStatus::Approved)
    }

    /// Denies the pending device authorization with this user code: its next poll gets
    /// `access_denied`. `false` when no pending, unexpired authorization has this code.
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.decide_device(user_code, DeviceStatus::Denied)
    }

    fn decide_device(&self, user_code: &str, decision: DeviceStatus) -> bool {
        let now = self.shared.clock.now();
        let wanted = normalize_user_code(user_code);
        let mut state = self.shared.state();
        match state.devices.values_mut().find(|d| {
            normalize_user_code(&d.user_code) == wanted
                && d.status == DeviceStatus::Pending
                && now < d.expires_at
        }) {
            Some(device) => {
                device.status = decision;
                true
            }
            None => false,
        }
    }

    /// Answers the next device-code poll `slow_down`, however long after the previous
    /// one it comes (its device code's interval then grows by 5 seconds, as always).
    pub fn slow_down_next(&self) {
        self.shared.state().slow_down_next = true;
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
    addr: SocketAddr,
    redirect_uris: Vec<String>,
    echo_state: bool,
    deny_consent: bool,
    code_lifetime: Duration,
    device_interval: time::Duration,
    device_code_lifetime: Duration,
    device_auto_approve_after: Option<u32>,
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

    /// Whether the authorization endpoint may redirect to `uri`.
    fn redirect_uri_acceptable(&self, uri: &str) -> bool {
        // A fragment is never allowed (RFC 6749 3.1.2); the URI goes into a header.
        if uri.contains('#') || HeaderValue::from_str(uri).is_err() {
            return false;
        }
        if !self.redirect_uris.is_empty() {
            return self.redirect_uris.iter().any(|r| r == uri);
        }
        let Ok(url) = Url::parse(uri) else {
            return false;
        };
        match url.scheme() {
            "https" => url.host().is_some(),
            "http" => match url.host() {
                Some(url::Host::Ipv4(ip)) => ip == Ipv4Addr::LOCALHOST,
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(host)) => host == "localhost",
                None => false,
            },
            _ => false,
        }
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
    codes: HashMap<String, IssuedCode>,
    devices: HashMap<String, DeviceAuthorization>,
    slow_down_next: bool,
}

struct Grant {
    revoked: bool,
    scopes: Vec<String>,
}

/// An authorization code and what it is bound to.
#[derive(Clone)]
struct IssuedCode {
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    /// The PKCE S256 challenge, when one was sent.
    challenge: Option<String>,
    expires_at: OffsetDateTime,
    /// The grant issued when the code was exchanged: the code is used.
    redeemed: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceStatus {
    Pending,
    Approved,
    Denied,
    /// Approved, and tokens issued.
    Redeemed,
}

/// A device authorization (RFC 8628), keyed by its device code.
struct DeviceAuthorization {
    user_code: String,
    client_id: String,
    scopes: Vec<String>,
    expires_at: OffsetDateTime,
    /// The current polling interval (grows by 5 seconds with each `slow_down`).
    interval: time::Duration,
    last_poll: Option<OffsetDateTime>,
    /// Polls not answered `slow_down`, for auto-approval.
    polls: u32,
    status: DeviceStatus,
}

/// Upper case, without dashes or spaces: how user codes are compared (RFC 8628 6.1).
fn normalize_user_code(code: &str) -> String {
    code.chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect()
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
    /// What the token may do (the API endpoint's `?scope=` checks it).
    scopes: Vec<String>,
}

impl SimState {
    fn new_grant(&mut self, scopes: Vec<String>) -> usize {
        self.grants.push(Grant {
            revoked: false,
            scopes,
        });
        self.grants.len() - 1
    }

    /// Revokes the grant and its access tokens.
    fn revoke_grant(&mut self, grant: usize) {
        if let Some(g) = self.grants.get_mut(grant) {
            g.revoked = true;
        }
        for access in self.access_tokens.values_mut().filter(|a| a.grant == grant) {
            access.revoked = true;
        }
    }

    /// A new user code, `XXXX-XXXX` from RFC 8628 6.1's 20 consonants.
    fn user_code(&mut self) -> String {
        const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
        loop {
            let rng = self.rng.get_or_insert_with(|| StdRng::seed_from_u64(0));
            let mut code = String::with_capacity(9);
            for i in 0..8 {
                if i == 4 {
                    code.push('-');
                }
                code.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
            }
            if !self.devices.values().any(|d| d.user_code == code) {
                return code;
            }
        }
    }

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
    let issued = match request.fields.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {
            let Some(presented) = request.fields.get("refresh_token").cloned() else {
                return rejected(&sim, "refresh_token missing");
            };
            let requested_scope = request.fields.get("scope").cloned();
            rotate(&sim, &presented, requested_scope.as_deref())
        }
        Some("authorization_code") => exchange_code(&sim, &request.fields),
        Some(DEVICE_CODE_GRANT) => poll_device(&sim, &request.fields),
        _ => {
            sim.state().counters.rejected_requests += 1;
            return oauth_error(
                &sim,
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only refresh_token, authorization_code and device_code",
            );
        }
    };
    let issued = match issued {
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
    state.counters.refreshes += 1;
    Ok(issue_tokens(sim, &mut state, grant, scopes, now))
}

/// Issues a new refresh token and access token for `grant`.
fn issue_tokens(
    sim: &Shared,
    state: &mut SimState,
    grant: usize,
    scopes: Vec<String>,
    now: OffsetDateTime,
) -> Issued {
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
            scopes: scopes.clone(),
        },
    );
    Issued {
        access_token,
        refresh_token,
        grant,
        scopes,
        now,
    }
}

/// A malformed token request: 400 `invalid_request`, counted.
fn rejected(sim: &Shared, description: &str) -> Response {
    sim.state().counters.rejected_requests += 1;
    oauth_error(sim, StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// Answers `invalid_grant`, counted; releases the state first.
fn invalid_grant(sim: &Shared, mut state: MutexGuard<'_, SimState>, description: &str) -> Response {
    state.counters.invalid_grant += 1;
    drop(state);
    oauth_error(sim, StatusCode::BAD_REQUEST, "invalid_grant", description)
}

/// Whether `verifier` is a well-formed PKCE code verifier (RFC 7636 4.1) whose S256
/// challenge is `challenge`.
fn pkce_matches(challenge: &str, verifier: &str) -> bool {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    well_formed
        && oauth2::PkceCodeChallenge::from_code_verifier_sha256(&oauth2::PkceCodeVerifier::new(
            verifier.to_owned(),
        ))
        .as_str()
            == challenge
}

/// The authorization-code grant (RFC 6749 4.1.3, RFC 7636 4.6). A failed exchange
/// (wrong `redirect_uri` or verifier) leaves the code usable; a code presented after it
/// was exchanged revokes the grant issued from it (RFC 6749 4.1.2).
fn exchange_code(sim: &Shared, fields: &HashMap<String, String>) -> Result<Issued, Response> {
    let (Some(code), Some(redirect_uri)) = (fields.get("code"), fields.get("redirect_uri")) else {
        return Err(rejected(sim, "code and redirect_uri are required"));
    };
    let now = sim.clock.now();
    let mut state = sim.state();
    let Some(issued) = state.codes.get(code).cloned() else {
        return Err(invalid_grant(sim, state, "unknown authorization code"));
    };
    if let Some(grant) = issued.redeemed {
        state.counters.code_reuse += 1;
        if !state.grants[grant].revoked {
            state.revoke_grant(grant);
            state.counters.revoked_grants += 1;
        }
        return Err(invalid_grant(
            sim,
            state,
            "authorization code already used: its grant is revoked",
        ));
    }
    if now >= issued.expires_at {
        return Err(invalid_grant(sim, state, "authorization code expired"));
    }
    if issued.client_id != sim.client_id {
        return Err(invalid_grant(
            sim,
            state,
            "authorization code issued to another client",
        ));
    }
    if issued.redirect_uri != *redirect_uri {
        return Err(invalid_grant(sim, state, "redirect_uri mismatch"));
    }
    let verified = match (&issued.challenge, fields.get("code_verifier")) {
        (None, None) => false,
        (Some(challenge), Some(verifier)) if pkce_matches(challenge, verifier) => true,
        (Some(_), _) => {
            return Err(invalid_grant(
                sim,
                state,
                "code_verifier missing or does not match the code_challenge",
            ));
        }
        // A verifier for a code issued without a challenge is a downgrade attempt.
        (None, Some(_)) => {
            return Err(invalid_grant(
                sim,
                state,
                "code_verifier sent for a code issued without code_challenge",
            ));
        }
    };
    let grant = state.new_grant(issued.scopes.clone());
    if let Some(code) = state.codes.get_mut(code) {
        code.redeemed = Some(grant);
    }
    state.counters.code_exchanges += 1;
    if verified {
        state.counters.pkce_verified += 1;
    }
    Ok(issue_tokens(sim, &mut state, grant, issued.scopes, now))
}

/// A device-code poll (RFC 8628 3.4, 3.5).
fn poll_device(sim: &Shared, fields: &HashMap<String, String>) -> Result<Issued, Response> {
    let Some(device_code) = fields.get("device_code") else {
        return Err(rejected(sim, "device_code missing"));
    };
    let now = sim.clock.now();
    let mut guard = sim.state();
    guard.counters.device_polls += 1;
    let state = &mut *guard;
    let Some(device) = state
        .devices
        .get_mut(device_code)
        .filter(|d| d.client_id == sim.client_id)
    else {
        return Err(invalid_grant(sim, guard, "unknown device code"));
    };
    let error = |guard: MutexGuard<'_, SimState>, code: &str, description: &str| {
        drop(guard);
        Err(oauth_error(sim, StatusCode::BAD_REQUEST, code, description))
    };
    if device.status == DeviceStatus::Redeemed {
        return Err(invalid_grant(sim, guard, "device code already used"));
    }
    if now >= device.expires_at {
        return error(guard, "expired_token", "device code expired");
    }
    if device.status == DeviceStatus::Denied {
        return error(guard, "access_denied", "the user denied the authorization");
    }
    let too_early = device
        .last_poll
        .is_some_and(|last| now - last < device.interval);
    device.last_poll = Some(now);
    if too_early || state.slow_down_next {
        state.slow_down_next = false;
        device.interval += time::Duration::seconds(5);
        state.counters.slow_downs += 1;
        return error(guard, "slow_down", "polling too often");
    }
    device.polls = device.polls.saturating_add(1);
    if device.status == DeviceStatus::Pending
        && sim
            .device_auto_approve_after
            .is_some_and(|after| device.polls >= after)
    {
        device.status = DeviceStatus::Approved;
    }
    if device.status == DeviceStatus::Pending {
        return error(
            guard,
            "authorization_pending",
            "the user has not yet approved",
        );
    }
    device.status = DeviceStatus::Redeemed;
    let scopes = device.scopes.clone();
    let grant = guard.new_grant(scopes.clone());
    Ok(issue_tokens(sim, &mut guard, grant, scopes, now))
}

fn parse_request(
    sim: &Shared,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<RefreshRequest, Response> {
    let encoding = if sim.mode == Mode::Lucid {
        BodyEncoding::Json
    } else {
        BodyEncoding::Form
    };
    parse_body(sim, headers, body, encoding)
}

/// Reads a request body in `encoding` and any Basic credentials.
fn parse_body(
    sim: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    encoding: BodyEncoding,
) -> Result<RefreshRequest, Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let fields: HashMap<String, String> = match encoding {
        BodyEncoding::Json => {
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

/// The authorization endpoint: validates the request as RFC 6749 4.1.1 and RFC 7636 4.3
/// say, then consents at once. Errors about the client or the redirect URI are a page
/// (no redirect, RFC 6749 4.1.2.1); the others redirect with `error`.
async fn authorize_endpoint(State(sim): State<Arc<Shared>>, uri: Uri) -> Response {
    let mut params: HashMap<String, String> = HashMap::new();
    let mut repeated: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        // A parameter without a value counts as omitted (RFC 6749 3.1).
        if value.is_empty() {
            continue;
        }
        let name = name.into_owned();
        if params.insert(name.clone(), value.into_owned()).is_some() {
            repeated.push(name);
        }
    }
    let is_repeated = |name: &str| repeated.iter().any(|r| r == name);
    if is_repeated("client_id") || params.get("client_id") != Some(&sim.client_id) {
        return consent_page(&sim, "unknown or missing client_id");
    }
    let redirect_uri = match params.get("redirect_uri") {
        Some(uri) if !is_repeated("redirect_uri") && sim.redirect_uri_acceptable(uri) => {
            uri.clone()
        }
        _ => return consent_page(&sim, "missing or unregistered redirect_uri"),
    };
    let state = params.get("state").filter(|_| sim.echo_state).cloned();
    let fail = |error: &str, description: &str| {
        sim.state().counters.rejected_requests += 1;
        redirect_to(
            &sim,
            &redirect_uri,
            &[("error", error), ("error_description", description)],
            state.as_deref(),
        )
    };
    if !repeated.is_empty() {
        return fail("invalid_request", "a parameter is repeated");
    }
    match params.get("response_type").map(String::as_str) {
        Some("code") => {}
        None => return fail("invalid_request", "response_type missing"),
        Some(_) => return fail("unsupported_response_type", "only response_type=code"),
    }
    let challenge = match (
        params.get("code_challenge"),
        params.get("code_challenge_method").map(String::as_str),
    ) {
        (None, None) => None,
        // An S256 challenge is 43 base64url characters.
        (Some(challenge), Some("S256"))
            if challenge.len() == 43
                && challenge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Some(challenge.clone())
        }
        _ => {
            return fail(
                "invalid_request",
                "code_challenge must be an S256 challenge with code_challenge_method=S256",
            );
        }
    };
    if sim.deny_consent {
        return redirect_to(
            &sim,
            &redirect_uri,
            &[
                ("error", "access_denied"),
                ("error_description", "the user denied consent"),
            ],
            state.as_deref(),
        );
    }
    let scopes = match params.get("scope") {
        Some(scope) => scope.split_whitespace().map(str::to_owned).collect(),
        None => default_scopes(),
    };
    let now = sim.clock.now();
    let code = {
        let mut sim_state = sim.state();
        let code = sim_state.token("sim-ac-");
        sim_state.codes.insert(
            code.clone(),
            IssuedCode {
                client_id: sim.client_id.clone(),
                redirect_uri: redirect_uri.clone(),
                scopes,
                challenge,
                expires_at: now + sim.code_lifetime,
                redeemed: None,
            },
        );
        sim_state.counters.authorizations += 1;
        code
    };
    redirect_to(&sim, &redirect_uri, &[("code", &code)], state.as_deref())
}

/// A 302 to `redirect_uri` with `params` (and `state`) appended to its query.
fn redirect_to(
    sim: &Shared,
    redirect_uri: &str,
    params: &[(&str, &str)],
    state: Option<&str>,
) -> Response {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        query.append_pair(name, value);
    }
    if let Some(state) = state {
        query.append_pair("state", state);
    }
    let separator = if !redirect_uri.contains('?') {
        "?"
    } else if redirect_uri.ends_with(['?', '&']) {
        ""
    } else {
        "&"
    };
    let location = format!("{redirect_uri}{separator}{}", query.finish());
    match HeaderValue::from_str(&location) {
        Ok(location) => {
            let mut response = StatusCode::FOUND.into_response();
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => consent_page(sim, "redirect_uri is not a valid URI"),
    }
}

/// The authorization server's own error page: 400, plain text, no redirect.
fn consent_page(sim: &Shared, message: &str) -> Response {
    sim.state().counters.rejected_requests += 1;
    (
        StatusCode::BAD_REQUEST,
        format!("The authorization request was rejected: {message}."),
    )
        .into_response()
}

/// The device authorization endpoint (RFC 8628 3.1, 3.2): a form body in every mode,
/// with the client authentication of the mode's token endpoint.
async fn device_endpoint(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match parse_body(&sim, &headers, &body, BodyEncoding::Form) {
        Ok(request) => request,
        Err(response) => {
            sim.state().counters.rejected_requests += 1;
            return response;
        }
    };
    if let Err(response) = check_client(&sim, &request) {
        sim.state().counters.rejected_requests += 1;
        return response;
    }
    let scopes = match request.fields.get("scope") {
        Some(scope) => scope.split_whitespace().map(str::to_owned).collect(),
        None => default_scopes(),
    };
    let now = sim.clock.now();
    let (device_code, user_code) = {
        let mut state = sim.state();
        let device_code = state.token("sim-dc-");
        let user_code = state.user_code();
        state.devices.insert(
            device_code.clone(),
            DeviceAuthorization {
                user_code: user_code.clone(),
                client_id: sim.client_id.clone(),
                scopes,
                expires_at: now + sim.device_code_lifetime,
                interval: sim.device_interval,
                last_poll: None,
                polls: 0,
                status: DeviceStatus::Pending,
            },
        );
        state.counters.device_authorizations += 1;
        (device_code, user_code)
    };
    let verification_uri = format!("http://{}{DEVICE_VERIFICATION_PATH}", sim.addr);
    json_response(json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": verification_uri,
        "verification_uri_complete": format!("{verification_uri}?user_code={user_code}"),
        "expires_in": sim.device_code_lifetime.as_secs(),
        "interval": sim.device_interval.whole_seconds(),
    }))
}

/// The device flow's verification page: with a `user_code` it consents at once (denies
/// when [`SimulatorBuilder::deny_consent`] is set), like the authorization endpoint.
async fn device_verification_page(State(sim): State<Arc<Shared>>, uri: Uri) -> Response {
    let user_code = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(name, _)| name == "user_code")
        .map(|(_, value)| value.into_owned());
    let Some(user_code) = user_code else {
        return (StatusCode::OK, "Enter the code shown on your device.").into_response();
    };
    let decision = if sim.deny_consent {
        DeviceStatus::Denied
    } else {
        DeviceStatus::Approved
    };
    let now = sim.clock.now();
    let wanted = normalize_user_code(&user_code);
    let mut state = sim.state();
    match state.devices.values_mut().find(|d| {
        normalize_user_code(&d.user_code) == wanted
            && d.status == DeviceStatus::Pending
            && now < d.expires_at
    }) {
        Some(device) => {
            device.status = decision;
            (StatusCode::OK, "Done: you may return to your device.").into_response()
        }
        None => {
            state.counters.rejected_requests += 1;
            (StatusCode::BAD_REQUEST, "Unknown or expired code.").into_response()
        }
    }
}

/// The revocation endpoint (RFC 7009): a form body with `token` (and an optional
/// `token_type_hint`, not needed to find the token) and the client authentication of the
/// mode's token endpoint. Either token of a grant revokes the whole grant.
async fn revoke_endpoint(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match parse_body(&sim, &headers, &body, BodyEncoding::Form) {
        Ok(request) => request,
        Err(response) => {
            sim.state().counters.rejected_requests += 1;
            return response;
        }
    };
    if let Err(response) = check_client(&sim, &request) {
        sim.state().counters.rejected_requests += 1;
        return response;
    }
    let Some(token) = request.fields.get("token") else {
        return rejected(&sim, "token missing");
    };
    let mut state = sim.state();
    state.counters.revocations += 1;
    let grant = state
        .refresh_tokens
        .get(token)
        .map(|r| r.grant)
        .or_else(|| state.access_tokens.get(token).map(|a| a.grant));
    if let Some(grant) = grant {
        state.revoke_grant(grant);
    }
    // An unknown token is answered 200 too (RFC 7009 2.2).
    StatusCode::OK.into_response()
}

async fn api_endpoint(State(sim): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned);
    let now = sim.clock.now();
    let valid = {
        let state = sim.state();
        bearer.and_then(|token| {
            state
                .access_tokens
                .get(&token)
                .filter(|a| !a.revoked && now < a.expires_at && !state.grants[a.grant].revoked)
                .map(|a| (a.grant, a.scopes.clone()))
        })
    };
    let required: String = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .filter(|(name, _)| name == "scope")
        .map(|(_, value)| value.into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    match valid {
        Some((_, scopes))
            if required
                .split_whitespace()
                .any(|r| !scopes.iter().any(|s| s == r)) =>
        {
            (
                StatusCode::FORBIDDEN,
                [(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                )],
                "insufficient scope",
            )
                .into_response()
        }
        Some((grant, scopes)) => {
            json_response(json!({ "grant": grant, "scope": scopes.join(" ") }))
        }
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

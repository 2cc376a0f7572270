//! Obtaining a grant: the one time a person consents.
//!
//! Three ways, each ending in a [`Grant`] that is saved into a source's store under its
//! lease with the compare-and-swap ([`Grant::save`], [`Grant::into_source`]), replacing
//! whatever the key held (a dead grant, say):
//!
//! - [`Consent::authorization_code`] then [`AuthorizationCode::listen`]: a loopback
//!   listener on `127.0.0.1` (an ephemeral port, or a fixed port or range for providers
//!   that need the redirect URI registered exactly), started before the URL exists; the
//!   person opens the URL, consents, and the browser's redirect brings the code back.
//!   Only the callback path answers; `state` is compared in constant time; the code is
//!   exchanged once, then the listener closes.
//! - [`AuthorizationCode::paste`]: for headless machines and for Lucid's copy-code page:
//!   the person pastes the redirect URL (its `state` is checked) or the bare code.
//! - [`Consent::device`]: the device authorization grant (RFC 8628) for providers with a
//!   device endpoint: the person enters a short code on another device.
//!
//! The authorization URL is built by the `oauth2` crate (CSRF `state`, PKCE S256 where the
//! profile says the server supports it, scopes); the code exchange is this crate's own
//! token request, which speaks each provider's body encoding and client authentication
//! (Lucid: JSON; HighQ: form with id and secret; Autodesk: form with Basic authentication
//! and `code_verifier`). Codes, verifiers and `state` never reach a log line, an error
//! message or `Debug`; the verifier goes to the token endpoint only.
//!
//! ```no_run
//! # async fn run() -> Result<(), tokenkeeper::Error> {
//! use tokenkeeper::consent::Consent;
//! use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource};
//!
//! let (profile, credentials) = (ProviderProfile::autodesk(), ClientCredentials::new("id", "secret"));
//! let consent = Consent::authorization_code(profile.clone(), credentials.clone())?
//!     .port(8080) // the redirect URI registered with the provider: http://127.0.0.1:8080/callback
//!     .listen()
//!     .await?;
//! eprintln!("Open {}", consent.url());
//! let grant = consent.finish().await?;
//! let source = grant
//!     .into_source(
//!         RefreshingTokenSource::builder(profile, credentials)
//!             .store(FileStore::new("tokens"))
//!             .key("autodesk:me"),
//!     )
//!     .await?;
//! # let _ = source;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use oauth2::{AuthUrl, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

use crate::error::{ConsentFailure, Error, ProviderError, TransientKind};
use crate::http::{GrantRequest, RefreshFailure, TokenEndpoint};
use crate::protocol::merge;
use crate::provider::ProviderProfile;
use crate::refresh::{Builder, RefreshingTokenSource};
use crate::secret::ClientCredentials;
use crate::token::TokenSet;

/// How long a person has to consent, by default.
pub const DEFAULT_CONSENT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The loopback callback path, by default.
pub const DEFAULT_CALLBACK_PATH: &str = "/callback";
/// The most bytes of a callback request read (its request line and headers).
const MAX_CALLBACK_REQUEST: usize = 16 * 1024;
/// How long one browser connection may take to send its request.
const CALLBACK_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where every consent flow starts.
#[derive(Debug)]
#[non_exhaustive]
pub struct Consent;

impl Consent {
    /// The authorization-code grant for `profile`'s provider, as `credentials`' client.
    /// Fails with [`Error::Config`] when the profile has no authorization URL or an
    /// endpoint is neither `https` nor loopback.
    pub fn authorization_code(
        profile: ProviderProfile,
        credentials: ClientCredentials,
    ) -> Result<AuthorizationCode, Error> {
        let Some(authorization_url) = profile.authorization_url.clone() else {
            return Err(Error::Config(format!(
                "the {} profile has no authorization URL: set ProviderProfile::authorization_url",
                profile.name
            )));
        };
        check_https("authorization URL", &authorization_url)?;
        let scopes = profile.default_scopes.clone();
        Ok(AuthorizationCode {
            authorization_url,
            scopes,
            ports: 0..=0,
            host: "127.0.0.1".into(),
            path: DEFAULT_CALLBACK_PATH.into(),
            redirect_uri: None,
            timeout: DEFAULT_CONSENT_TIMEOUT,
            extra_params: Vec::new(),
            exchange: Exchange::new(profile, credentials)?,
        })
    }

    /// The device authorization grant (RFC 8628) for `profile`'s provider. Fails with
    /// [`Error::Config`] when the profile has no device authorization URL.
    pub fn device(
        profile: ProviderProfile,
        credentials: ClientCredentials,
    ) -> Result<DeviceFlow, Error> {
        if profile.device_authorization_url.is_none() {
            return Err(Error::Config(format!(
                "the {} profile has no device authorization URL: set ProviderProfile::device_authorization_url",
                profile.name
            )));
        }
        let scopes = profile.default_scopes.clone();
        Ok(DeviceFlow {
            scopes,
            exchange: Exchange::new(profile, credentials)?,
        })
    }
}

fn check_https(what: &str, url: &Url) -> Result<(), Error> {
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        scheme => Err(Error::Config(format!(
            "the {what} must use https (got {scheme}; http is allowed only for loopback hosts)"
        ))),
    }
}

/// The code exchange, shared by every flow: this crate's token request.
struct Exchange {
    endpoint: TokenEndpoint,
}

impl Exchange {
    fn new(profile: ProviderProfile, credentials: ClientCredentials) -> Result<Self, Error> {
        Ok(Self {
            endpoint: TokenEndpoint::new(profile, credentials, None)?,
        })
    }

    fn profile(&self) -> &ProviderProfile {
        self.endpoint.profile()
    }

    /// Presents `grant` once and makes a grant of the answer.
    async fn grant(&self, grant: GrantRequest<'_>) -> Result<Grant, Error> {
        let sent_at = time::OffsetDateTime::now_utc();
        let response =
            self.endpoint
                .request(grant, sent_at)
                .await
                .map_err(|failure| match failure {
                    RefreshFailure::InvalidGrant(provider) => Error::Consent {
                        reason: ConsentFailure::CodeRejected,
                        provider,
                    },
                    RefreshFailure::Other(e) => e,
                })?;
        let set = merge(
            self.profile(),
            &TokenSet::empty(sent_at),
            response,
            sent_at,
            time::OffsetDateTime::now_utc(),
        );
        if set.refresh_token.is_none() {
            return Err(Error::consent(ConsentFailure::NoRefreshToken));
        }
        tracing::info!(provider = %self.profile().name, scopes = ?set.scopes, "consent granted");
        Ok(Grant { set })
    }
}

/// The authorization-code grant, being configured: see [`Consent::authorization_code`].
pub struct AuthorizationCode {
    authorization_url: Url,
    scopes: Vec<String>,
    ports: RangeInclusive<u16>,
    host: String,
    path: String,
    redirect_uri: Option<Url>,
    timeout: Duration,
    extra_params: Vec<(String, String)>,
    exchange: Exchange,
}

impl fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationCode")
            .field("provider", &self.exchange.profile().name)
            .field("authorization_url", &self.authorization_url.as_str())
            .field("scopes", &self.scopes)
            .field("ports", &self.ports)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AuthorizationCode {
    /// The scopes to ask for, instead of the profile's default scopes.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Listens on this port (for a redirect URI registered with a fixed port). Default:
    /// an ephemeral port, which RFC 8252 servers accept for loopback redirects.
    pub fn port(mut self, port: u16) -> Self {
        self.ports = port..=port;
        self
    }

    /// Listens on the first free port of `ports` (for providers that register a few).
    pub fn port_range(mut self, ports: RangeInclusive<u16>) -> Self {
        self.ports = ports;
        self
    }

    /// The host name in the loopback redirect URI: `127.0.0.1` by default (RFC 8252 7.3),
    /// or `localhost` where the provider registered that. The listener binds `127.0.0.1`
    /// either way.
    pub fn redirect_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// The callback path of the loopback redirect URI (default `/callback`).
    pub fn callback_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        self
    }

    /// The redirect URI for [`paste`](Self::paste), when not the profile's copy-code page
    /// (a page registered with the provider that shows the code or the redirect URL).
    pub fn redirect_uri(mut self, uri: Url) -> Self {
        self.redirect_uri = Some(uri);
        self
    }

    /// How long the person has to consent (default 5 minutes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// An extra parameter of the authorization URL (`prompt=consent`, `access_type=offline`...).
    pub fn extra_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_params.push((name.into(), value.into()));
        self
    }

    /// Starts the loopback listener, then builds the authorization URL whose redirect URI
    /// names it. Show [`LoopbackConsent::url`] or [`LoopbackConsent::open_browser`], then
    /// await [`LoopbackConsent::finish`].
    pub async fn listen(self) -> Result<LoopbackConsent, Error> {
        if !["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&self.host))
        {
            return Err(Error::Config(format!(
                "the loopback redirect host must be 127.0.0.1, localhost or [::1], not {:?}: the listener only listens on this machine",
                self.host
            )));
        }
        if !self
            .path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b))
        {
            return Err(Error::Config(format!(
                "the callback path {:?} may hold only letters, digits and / - . _ ~",
                self.path
            )));
        }
        let mut bound = None;
        let mut last_error = None;
        for port in self.ports.clone() {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(listener) => {
                    bound = Some(listener);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let Some(listener) = bound else {
            let why = last_error.map_or_else(
                || "the port range is empty".to_owned(),
                |e| format!("no port of {:?} is free: {e}", self.ports),
            );
            return Err(Error::consent(ConsentFailure::Listener(why)));
        };
        let port = listener
            .local_addr()
            .map_err(|e| Error::consent(ConsentFailure::Listener(e.to_string())))?
            .port();
        let redirect_uri = Url::parse(&format!("http://{}:{port}{}", self.host, self.path))
            .map_err(|e| Error::Config(format!("the loopback redirect URI is invalid: {e}")))?;
        let (path, timeout) = (self.path.clone(), self.timeout);
        let request = self.request(redirect_uri)?;
        Ok(LoopbackConsent {
            listener,
            path,
            timeout,
            request,
        })
    }

    /// The paste flow: no listener. The redirect URI is [`redirect_uri`](Self::redirect_uri)
    /// or the profile's copy-code page (Lucid's shows the code to copy). Show
    /// [`PasteConsent::url`], then give what the person pasted to [`PasteConsent::finish`].
    pub fn paste(self) -> Result<PasteConsent, Error> {
        let redirect_uri = match (
            &self.redirect_uri,
            &self.exchange.profile().copy_code_redirect_uri,
        ) {
            (Some(uri), _) => uri.clone(),
            (None, Some(template)) => {
                let id = self.exchange.endpoint.credentials().id();
                let encoded: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
                Url::parse(&template.replace("{client_id}", &encoded)).map_err(|e| {
                    Error::Config(format!(
                        "the profile's copy-code redirect URI is invalid: {e}"
                    ))
                })?
            }
            (None, None) => {
                return Err(Error::Config(format!(
                    "the {} profile has no copy-code page: set AuthorizationCode::redirect_uri to a redirect URI registered with the provider",
                    self.exchange.profile().name
                )));
            }
        };
        let request = self.request(redirect_uri)?;
        Ok(PasteConsent { request })
    }

    /// The authorization URL (by the `oauth2` crate), its `state` and PKCE verifier.
    fn request(self, redirect_uri: Url) -> Result<Request, Error> {
        const RESERVED: [&str; 7] = [
            "response_type",
            "client_id",
            "redirect_uri",
            "scope",
            "state",
            "code_challenge",
            "code_challenge_method",
        ];
        if let Some((name, _)) = self
            .extra_params
            .iter()
            .find(|(name, _)| RESERVED.contains(&name.as_str()))
        {
            return Err(Error::Config(format!(
                "the authorization parameter {name:?} is set by the flow itself; it cannot be an extra parameter"
            )));
        }
        let profile = self.exchange.profile();
        let client = oauth2::basic::BasicClient::new(ClientId::new(
            self.exchange.endpoint.credentials().id().to_owned(),
        ))
        .set_auth_uri(AuthUrl::from_url(self.authorization_url.clone()))
        .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
        let mut authorize = client
            .authorize_url(CsrfToken::new_random)
            .add_scopes(self.scopes.iter().cloned().map(oauth2::Scope::new));
        for (name, value) in &self.extra_params {
            authorize = authorize.add_extra_param(name.clone(), value.clone());
        }
        let verifier = if profile.pkce {
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            authorize = authorize.set_pkce_challenge(challenge);
            Some(verifier)
        } else {
            None
        };
        let (url, state) = authorize.url();
        Ok(Request {
            url,
            redirect_uri,
            state,
            verifier,
            exchange: Arc::new(self.exchange),
        })
    }
}

/// What an authorization request sent, kept to check and complete its redirect.
struct Request {
    url: Url,
    redirect_uri: Url,
    state: CsrfToken,
    verifier: Option<PkceCodeVerifier>,
    exchange: Arc<Exchange>,
}

/// What a redirect says, once its `state` is judged.
enum Redirect {
    /// A code to exchange.
    Code(String),
    /// An answer from the authorization server (an error, or neither error nor code):
    /// the consent ends with it.
    Failed(Error),
    /// A forged or stale redirect (wrong or missing `state`): refused; the loopback flow
    /// goes on waiting for the real one.
    Forged(ConsentFailure),
}

impl Request {
    /// Judges a redirect's parameters: `state` first (an error redirect with a forged
    /// state is a forgery, not an answer), then the error or the code.
    fn judge(&self, params: &[(String, String)]) -> Redirect {
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        match get("state") {
            Some(state) if constant_time_eq(state.as_bytes(), self.state.secret().as_bytes()) => {}
            Some(_) => return Redirect::Forged(ConsentFailure::StateMismatch),
            None if self.exchange.profile().state_echoed => {
                return Redirect::Forged(ConsentFailure::StateMissing);
            }
            None => {
                tracing::warn!(provider = %self.exchange.profile().name, "the redirect carries no state; accepted because the profile says this server does not echo it (check which account signed in)");
            }
        }
        if let Some(code) = get("error") {
            let provider = Some(ProviderError {
                code: truncate(code, 64),
                description: get("error_description").map(|d| truncate(d, 256)),
            });
            let reason = if code == "access_denied" {
                ConsentFailure::Denied
            } else {
                ConsentFailure::AuthorizationError
            };
            return Redirect::Failed(Error::Consent { reason, provider });
        }
        match get("code").filter(|c| !c.is_empty()) {
            Some(code) => Redirect::Code(code.to_owned()),
            None => Redirect::Failed(Error::consent(ConsentFailure::UnusableInput(
                "the redirect carries neither a code nor an error".into(),
            ))),
        }
    }

    /// Judges a redirect and exchanges its code, once.
    async fn complete(&self, params: &[(String, String)]) -> Result<Grant, Error> {
        match self.judge(params) {
            Redirect::Code(code) => self.exchange_code(&code).await,
            Redirect::Failed(e) => Err(e),
            Redirect::Forged(reason) => Err(Error::consent(reason)),
        }
    }

    async fn exchange_code(&self, code: &str) -> Result<Grant, Error> {
        self.exchange
            .grant(GrantRequest::AuthorizationCode {
                code,
                redirect_uri: self.redirect_uri.as_str(),
                verifier: self.verifier.as_ref().map(|v| v.secret().as_str()),
            })
            .await
    }
}

/// Compares two byte strings in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// At most `max` characters of provider text (from a redirect's query).
fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// A loopback consent in progress: the listener is up. See
/// [`AuthorizationCode::listen`].
pub struct LoopbackConsent {
    listener: TcpListener,
    path: String,
    timeout: Duration,
    request: Request,
}

impl fmt::Debug for LoopbackConsent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackConsent")
            .field("redirect_uri", &self.request.redirect_uri.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl LoopbackConsent {
    /// The authorization URL to open in a browser.
    pub fn url(&self) -> &Url {
        &self.request.url
    }

    /// The redirect URI the listener answers (register it with the provider when it
    /// needs an exact match).
    pub fn redirect_uri(&self) -> &Url {
        &self.request.redirect_uri
    }

    /// Asks the desktop to open the authorization URL ([`open_in_browser`]).
    pub fn open_browser(&self) -> std::io::Result<()> {
        open_in_browser(self.url())
    }

    /// Waits for the browser's redirect to the callback path (other paths get 404 and
    /// the wait goes on), checks it, exchanges its code once and answers the browser with
    /// a short page. The listener closes when this returns: a second callback finds no
    /// one. Fails with [`ConsentFailure::TimedOut`] after the timeout.
    pub async fn finish(self) -> Result<Grant, Error> {
        let LoopbackConsent {
            listener,
            path,
            timeout,
            request,
        } = self;
        let deadline = tokio::time::Instant::now() + timeout;
        // Each connection is read in its own task: an idle one (a browser's preconnect)
        // holds up nobody.
        let (tx, mut callbacks) = tokio::sync::mpsc::channel(8);
        let path = Arc::<str>::from(path);
        let mut refused = None;
        let (mut stream, code) = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (tx, path) = (tx.clone(), Arc::clone(&path));
                        tokio::spawn(async move {
                            if let Some(callback) = read_callback(stream, &path).await {
                                let _ = tx.send(callback).await;
                            }
                        });
                    }
                    // Out of file descriptors, say: no busy loop.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                Some((mut stream, params)) = callbacks.recv() => match request.judge(&params) {
                    Redirect::Code(code) => break (stream, code),
                    Redirect::Failed(e) => {
                        let _ = respond(&mut stream, "400 Bad Request", &failure_page(&e)).await;
                        return Err(e);
                    }
                    Redirect::Forged(reason) => {
                        tracing::warn!(reason = %reason, "refused a redirect to the loopback listener; still waiting for the real one");
                        let e = Error::consent(reason.clone());
                        let _ = respond(&mut stream, "400 Bad Request", &failure_page(&e)).await;
                        refused = Some(reason);
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    // A refused redirect says more than the timeout it led to.
                    return Err(Error::consent(refused.unwrap_or(ConsentFailure::TimedOut)));
                }
            }
        };
        // One code, exchanged once: nobody else is listened to.
        drop(listener);
        let outcome = request.exchange_code(&code).await;
        let (status, page) = match &outcome {
            Ok(_) => (
                "200 OK",
                page(
                    "Signed in",
                    "You can close this window and return to the terminal.",
                ),
            ),
            Err(e) => ("400 Bad Request", failure_page(e)),
        };
        let _ = respond(&mut stream, status, &page).await;
        outcome
    }
}

fn failure_page(e: &Error) -> String {
    page(
        "Sign-in failed",
        &format!("{e}. Return to the terminal for details."),
    )
}

/// Reads one browser request. Requests for other paths (a favicon) are answered 404 and
/// `None` is returned; the callback's query parameters come back with the stream, for
/// the answer.
async fn read_callback(
    mut stream: TcpStream,
    path: &str,
) -> Option<(TcpStream, Vec<(String, String)>)> {
    let mut head = Vec::new();
    let read = async {
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_CALLBACK_REQUEST {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(CALLBACK_READ_TIMEOUT, read)
        .await
        .ok()??;
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let url = Url::parse("http://127.0.0.1").ok()?.join(target).ok();
    match url {
        Some(url) if method == "GET" && url.path() == path => {
            let params = url.query_pairs().into_owned().collect();
            Some((stream, params))
        }
        _ => {
            let _ = respond(&mut stream, "404 Not Found", &page("Not found", "")).await;
            None
        }
    }
}

fn page(title: &str, text: &str) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{0}</title></head><body><h1>{0}</h1><p>{1}</p></body></html>",
        escape(title),
        escape(text)
    )
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Opens `url` with the desktop's default browser (`xdg-open` on Linux and BSD, `open`
/// on macOS, `rundll32` on Windows), without a shell. An error means no browser could
/// be started: show the URL instead.
pub fn open_in_browser(url: &Url) -> std::io::Result<()> {
    use std::process::{Command, Stdio};
    let (program, args): (&str, Vec<&str>) = if cfg!(target_os = "macos") {
        ("open", vec![])
    } else if cfg!(windows) {
        ("rundll32", vec!["url.dll,FileProtocolHandler"])
    } else {
        ("xdg-open", vec![])
    };
    Command::new(program)
        .args(args)
        .arg(url.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
}

/// A paste consent in progress: see [`AuthorizationCode::paste`].
pub struct PasteConsent {
    request: Request,
}

impl fmt::Debug for PasteConsent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasteConsent")
            .field("redirect_uri", &self.request.redirect_uri.as_str())
            .finish_non_exhaustive()
    }
}

impl PasteConsent {
    /// The authorization URL to open in a browser, on any device.
    pub fn url(&self) -> &Url {
        &self.request.url
    }

    /// The redirect URI the provider sends the person to.
    pub fn redirect_uri(&self) -> &Url {
        &self.request.redirect_uri
    }

    /// Completes the consent with what the person pasted: the whole redirect URL (its
    /// `state` is checked, and it must lead to this flow's redirect URI) or the bare code
    /// (as Lucid's copy-code page shows it). The code is exchanged once.
    pub async fn finish(self, pasted: &str) -> Result<Grant, Error> {
        let pasted = pasted.trim();
        if pasted.is_empty() {
            return Err(Error::consent(ConsentFailure::UnusableInput(
                "nothing was pasted".into(),
            )));
        }
        if let Ok(url) = Url::parse(pasted)
            && url.query().is_some()
        {
            let expected = &self.request.redirect_uri;
            let same_place = url.scheme() == expected.scheme()
                && url.host_str() == expected.host_str()
                && url.port_or_known_default() == expected.port_or_known_default()
                && url.path() == expected.path();
            if !same_place {
                return Err(Error::consent(ConsentFailure::UnusableInput(
                    "the pasted URL does not lead to this consent's redirect URI".into(),
                )));
            }
            let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            return self.request.complete(&params).await;
        }
        let bare = pasted.len() <= 4096
            && pasted
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'&' | b'=' | b'#'));
        if !bare {
            return Err(Error::consent(ConsentFailure::UnusableInput(
                "neither a redirect URL with a query nor a bare code".into(),
            )));
        }
        self.request.exchange_code(pasted).await
    }
}

/// The device grant, being configured: see [`Consent::device`].
pub struct DeviceFlow {
    scopes: Vec<String>,
    exchange: Exchange,
}

impl fmt::Debug for DeviceFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceFlow")
            .field("provider", &self.exchange.profile().name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// The device authorization endpoint's answer (RFC 8628 3.2).
#[derive(serde::Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Option<u64>,
    interval: Option<u64>,
}

/// RFC 8628's default polling interval.
const DEVICE_DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// What `slow_down` adds to the interval (RFC 8628 3.5).
const DEVICE_SLOW_DOWN: Duration = Duration::from_secs(5);
/// The longest polling interval (a server asking for more gets this).
const DEVICE_MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The longest a device code is waited for, whatever the server says.
const DEVICE_MAX_LIFETIME: Duration = Duration::from_secs(3600);

impl DeviceFlow {
    /// The scopes to ask for, instead of the profile's default scopes.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Asks the provider for a device code. Show [`DeviceConsent::user_code`] and
    /// [`DeviceConsent::verification_uri`] to the person, then await
    /// [`DeviceConsent::finish`].
    pub async fn start(self) -> Result<DeviceConsent, Error> {
        let scope = (!self.scopes.is_empty()).then(|| self.scopes.join(" "));
        let endpoint = &self.exchange.endpoint;
        let (status, headers, body) = endpoint.device_authorization(scope.as_deref()).await?;
        if !status.is_success() {
            return Err(
                match endpoint.classify_failure(
                    status,
                    &headers,
                    &body,
                    time::OffsetDateTime::now_utc(),
                ) {
                    RefreshFailure::InvalidGrant(provider) => Error::Consent {
                        reason: ConsentFailure::CodeRejected,
                        provider,
                    },
                    RefreshFailure::Other(e) => e,
                },
            );
        }
        let answer: DeviceAuthorization =
            serde_json::from_slice(&body).map_err(|e| Error::InvalidResponse {
                reason: format!(
                    "the device authorization answer is not RFC 8628 JSON: {}",
                    crate::json_error_summary(&e)
                ),
            })?;
        let interval = answer
            .interval
            .map_or(DEVICE_DEFAULT_INTERVAL, Duration::from_secs)
            .clamp(Duration::from_secs(1), DEVICE_MAX_INTERVAL);
        let lifetime = answer
            .expires_in
            .map_or(DEVICE_MAX_LIFETIME, Duration::from_secs)
            .min(DEVICE_MAX_LIFETIME);
        Ok(DeviceConsent {
            device_code: answer.device_code,
            user_code: answer.user_code,
            verification_uri: answer.verification_uri,
            verification_uri_complete: answer.verification_uri_complete,
            interval,
            expires_at: tokio::time::Instant::now() + lifetime,
            exchange: self.exchange,
        })
    }
}

/// A device consent in progress: see [`DeviceFlow::start`].
pub struct DeviceConsent {
    device_code: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    interval: Duration,
    expires_at: tokio::time::Instant,
    exchange: Exchange,
}

impl fmt::Debug for DeviceConsent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConsent")
            .field("verification_uri", &self.verification_uri)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl DeviceConsent {
    /// The code the person enters at [`verification_uri`](Self::verification_uri).
    pub fn user_code(&self) -> &str {
        &self.user_code
    }

    /// Where the person enters the code.
    pub fn verification_uri(&self) -> &str {
        &self.verification_uri
    }

    /// The verification URI with the code filled in, when the server gives one.
    pub fn verification_uri_complete(&self) -> Option<&str> {
        self.verification_uri_complete.as_deref()
    }

    /// Polls the token endpoint at the server's interval until the person approves
    /// (`authorization_pending` waits; `slow_down` adds 5 s to the interval for good; a
    /// network failure doubles it), declines ([`ConsentFailure::Denied`]) or the code
    /// expires ([`ConsentFailure::DeviceCodeExpired`]).
    pub async fn finish(self) -> Result<Grant, Error> {
        let mut interval = self.interval;
        loop {
            let next = tokio::time::Instant::now() + interval;
            if next >= self.expires_at {
                return Err(Error::consent(ConsentFailure::DeviceCodeExpired));
            }
            tokio::time::sleep_until(next).await;
            let error = match self
                .exchange
                .grant(GrantRequest::DeviceCode(&self.device_code))
                .await
            {
                Ok(grant) => return Ok(grant),
                Err(e) => e,
            };
            let code = match &error {
                Error::RequestRejected { provider, .. } => Some(provider.code.as_str()),
                Error::Consent {
                    provider: Some(provider),
                    ..
                }
                | Error::ClientRejected {
                    provider: Some(provider),
                    ..
                } => Some(provider.code.as_str()),
                _ => None,
            };
            match (code, &error) {
                (Some("authorization_pending"), _) => {}
                (Some("expired_token"), _) => {
                    return Err(Error::consent(ConsentFailure::DeviceCodeExpired));
                }
                (Some("access_denied"), _) => {
                    return Err(Error::consent(ConsentFailure::Denied));
                }
                (
                    _,
                    Error::Transient {
                        kind: TransientKind::RateLimited,
                        ..
                    },
                ) => {
                    interval = (interval + DEVICE_SLOW_DOWN).min(DEVICE_MAX_INTERVAL);
                    tracing::debug!(?interval, "the device endpoint asked to slow down");
                }
                (_, e) if e.is_transient() => {
                    interval = (interval * 2).min(DEVICE_MAX_INTERVAL);
                }
                _ => return Err(error),
            }
        }
    }
}

/// A grant a person just consented to: its first token set, with a refresh token. Save
/// it into a source's store ([`save`](Self::save), [`into_source`](Self::into_source)).
/// `Debug` shows no token.
#[derive(Clone, Debug)]
pub struct Grant {
    set: TokenSet,
}

impl Grant {
    /// The token set obtained.
    pub fn token_set(&self) -> &TokenSet {
        &self.set
    }

    /// Saves the grant into `source`'s store under its key, under the lease and with the
    /// compare-and-swap, replacing whatever the key held (a dead grant, another grant).
    /// The source serves its access token at once, without a refresh.
    pub async fn save(self, source: &RefreshingTokenSource) -> Result<(), Error> {
        source.import(self.set).await
    }

    /// Builds the source `builder` describes and [`save`](Self::save)s the grant into it.
    pub async fn into_source(self, builder: Builder) -> Result<RefreshingTokenSource, Error> {
        let source = builder.build()?;
        self.save(&source).await?;
        Ok(source)
    }
}

//! The token-endpoint call: build the refresh request from a profile, send it, read at most
//! `max_response_bytes`, and classify the answer.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use time::OffsetDateTime;

use crate::error::{Error, ProviderError, TransientKind};
use crate::provider::{
    BodyEncoding, ClientAuth, ProviderProfile, TokenResponse, parse_token_response,
};
use crate::provider::{parse_error_untruncated, truncate_error};
use crate::secret::{ClientCredentials, RefreshToken};

/// A client for one provider's token endpoint.
#[derive(Debug)]
pub(crate) struct TokenEndpoint {
    profile: ProviderProfile,
    credentials: ClientCredentials,
    client: reqwest::Client,
}

/// What a token request asks for: the grant it presents.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "consent"), allow(dead_code))]
pub(crate) enum GrantRequest<'a> {
    /// `grant_type=refresh_token`, at the token URL, with the profile's refresh scope.
    Refresh(&'a RefreshToken),
    /// `grant_type=refresh_token` asking for these scopes (a downscoped token).
    RefreshScoped(&'a RefreshToken, &'a [String]),
    /// `grant_type=authorization_code`, at the code-exchange URL.
    AuthorizationCode {
        code: &'a str,
        redirect_uri: &'a str,
        /// The PKCE verifier, when a challenge was sent.
        verifier: Option<&'a str>,
    },
    /// RFC 8628's device grant, at the code-exchange URL.
    DeviceCode(&'a str),
}

impl GrantRequest<'_> {
    /// The secrets this request carries, scrubbed from any error text.
    fn secrets(&self) -> Vec<&str> {
        match *self {
            GrantRequest::Refresh(token) | GrantRequest::RefreshScoped(token, _) => {
                vec![token.secret()]
            }
            GrantRequest::AuthorizationCode { code, verifier, .. } => {
                [Some(code), verifier].into_iter().flatten().collect()
            }
            GrantRequest::DeviceCode(code) => vec![code],
        }
    }
}

/// How many HTTP clients the library has built (see [`crate::testing::http_clients_built`]).
pub(crate) static CLIENTS_BUILT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// A client for `profile`'s endpoints: no redirects, the profile's connect timeout (its
/// request timeout is set on every request), and no proxy when a URL is on loopback.
/// `pooled`: idle connections are kept for the next request (a manager's client);
/// otherwise each connection closes after its answer.
pub(crate) fn client_for(
    profile: &ProviderProfile,
    pooled: bool,
) -> Result<reqwest::Client, Error> {
    // reqwest uses the process's default provider: the build's, unless the application
    // installed its own.
    let _provider = crate::tls::provider();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(profile.connect_timeout);
    if !pooled {
        builder = builder.pool_max_idle_per_host(0);
    }
    if profile.any_url_is_loopback() {
        // A proxy from HTTP_PROXY cannot reach this machine's loopback, and must not
        // carry a code or a secret sent to it in clear.
        builder = builder.no_proxy();
    }
    let client = builder
        .build()
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
    CLIENTS_BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(client)
}

/// The process's shared client for `profile`'s settings (connect timeout, proxy), built
/// once: what a source uses unless given one. Building a client loads the TLS roots (a
/// few milliseconds) and each keeps its own connection pool, so a process with a
/// thousand sources built a thousand of each. Shared, it keeps no idle connection: a
/// pooled connection belongs to the runtime that opened it, and a client shared across
/// runtimes (tests, or an application with several) would hand a later runtime a
/// connection whose runtime is gone. A source refreshes once per token lifetime, so a
/// new connection per refresh costs nothing that matters; a manager, which sweeps many
/// grants, has a pooled client of its own.
pub(crate) fn shared_client(profile: &ProviderProfile) -> Result<reqwest::Client, Error> {
    type Shared = Vec<((std::time::Duration, bool), reqwest::Client)>;
    static SHARED: std::sync::Mutex<Shared> = std::sync::Mutex::new(Vec::new());
    let key = (profile.connect_timeout, profile.any_url_is_loopback());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, client)) = shared.iter().find(|(k, _)| *k == key) {
        return Ok(client.clone());
    }
    let client = client_for(profile, false)?;
    shared.push((key, client.clone()));
    Ok(client)
}

/// A request body that cannot be sent twice: a client that follows redirects (one the
/// application gave, see [`crate::Builder::http_client`]) does not resend it, and with
/// it a refresh token, to a redirect's target (reqwest follows a 307 or 308 only with a
/// body it can replay, and turns a 301, 302 or 303 into a GET without one). Its length
/// is known, so it is sent with a `Content-Length`, not chunked.
fn sealed_body(body: String) -> reqwest::Body {
    reqwest::Body::wrap(body)
}

/// `fields` as a form body (see [`sealed_body`]).
fn sealed_form(
    request: reqwest::RequestBuilder,
    fields: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    request
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(sealed_body(body))
}

/// `url` without its query (which may carry a code or a token) or credentials.
fn redacted_url(url: &url::Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{}{port}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.path()
    )
}

/// How a refresh attempt ended, when it did not succeed.
#[derive(Debug)]
pub(crate) enum RefreshFailure {
    /// The provider says the refresh token is dead (`invalid_grant`).
    InvalidGrant(Option<ProviderError>),
    /// Anything else, already classified.
    Other(Error),
}

impl TokenEndpoint {
    /// The endpoint of `profile`, sending with `client` when given (see
    /// [`crate::Builder::http_client`]), otherwise with the process's shared client for
    /// it ([`shared_client`]).
    pub(crate) fn new(
        profile: ProviderProfile,
        credentials: ClientCredentials,
        client: Option<reqwest::Client>,
    ) -> Result<Self, Error> {
        profile.validate()?;
        let client = match client {
            Some(client) => client,
            None => shared_client(&profile)?,
        };
        Ok(Self {
            profile,
            credentials,
            client,
        })
    }

    pub(crate) fn profile(&self) -> &ProviderProfile {
        &self.profile
    }

    #[cfg_attr(not(feature = "consent"), allow(dead_code))]
    pub(crate) fn credentials(&self) -> &ClientCredentials {
        &self.credentials
    }

    /// Presents `refresh_token` once, asking for `scope` when given (a downscoped token)
    /// or the profile's refresh scope. `now` is the clock's reading as the request is sent
    /// (for rate-limit reset instants).
    pub(crate) async fn refresh(
        &self,
        refresh_token: &RefreshToken,
        scope: Option<&[String]>,
        now: OffsetDateTime,
    ) -> Result<TokenResponse, RefreshFailure> {
        let grant = match scope {
            Some(scope) => GrantRequest::RefreshScoped(refresh_token, scope),
            None => GrantRequest::Refresh(refresh_token),
        };
        self.request(grant, now).await
    }

    /// Sends one token request for `grant` and classifies the answer.
    pub(crate) async fn request(
        &self,
        grant: GrantRequest<'_>,
        now: OffsetDateTime,
    ) -> Result<TokenResponse, RefreshFailure> {
        let (status, headers, body) = self
            .send(self.build_request(grant))
            .await
            .map_err(RefreshFailure::Other)?;
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.classify(
            status,
            &headers,
            content_type.as_deref(),
            &body,
            &grant.secrets(),
            now,
        )
    }

    /// Sends `request` and reads at most `max_response_bytes` of its answer.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), Error> {
        // The profile's timeout on every request, whatever client sends it.
        let request = request
            .timeout(self.profile.request_timeout)
            .build()
            .map_err(|e| transport_error(e, TransientKind::Connect))?;
        let sent_to = request.url().clone();
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| transport_error(e, TransientKind::Connect))?;
        if response.url() != &sent_to {
            // Only a client given by the application can follow a redirect (the library's
            // never do), and only a 301, 302 or 303: the body cannot be sent twice
            // (`sealed_body`), so the client follows those as a GET without it and gives
            // up on a 307 or 308. No token went to the redirect's target, and the
            // endpoint that redirected presented nothing: the answer is refused.
            return Err(Error::Config(format!(
                "the token endpoint redirected to {} and the HTTP client followed (without the \
                 request's body): build the client with `redirect(reqwest::redirect::Policy::none())`, \
                 and check the profile's URL",
                redacted_url(response.url())
            )));
        }
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_capped(response, self.profile.max_response_bytes).await?;
        Ok((status, headers, body))
    }

    /// A form POST to `url` with the client's authentication (per the profile), for the
    /// endpoints that always take a form body (revocation, device authorization).
    fn authenticated_form<'f>(
        &'f self,
        url: &url::Url,
        mut fields: Vec<(&'f str, &'f str)>,
    ) -> reqwest::RequestBuilder {
        let request = self.authenticate(self.client.post(url.clone()), &mut fields);
        sealed_form(self.with_headers(request), &fields)
    }

    /// Revokes `token` (RFC 7009) at the profile's revocation endpoint. `hint` is
    /// `refresh_token` or `access_token`. Unknown tokens are revoked by definition (the
    /// server answers 200).
    pub(crate) async fn revoke(
        &self,
        token: &str,
        hint: &str,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let Some(url) = &self.profile.revocation_url else {
            return Err(Error::Config(format!(
                "the {} profile has no revocation endpoint",
                self.profile.name
            )));
        };
        let request =
            self.authenticated_form(url, vec![("token", token), ("token_type_hint", hint)]);
        let (status, headers, body) = self.send(request).await?;
        if status.is_success() {
            return Ok(());
        }
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        match self.classify(status, &headers, content_type, &body, &[token], now) {
            Ok(_) => Ok(()),
            Err(RefreshFailure::Other(e)) => Err(e),
            // `invalid_grant` from a revocation endpoint: the token is dead already.
            Err(RefreshFailure::InvalidGrant(_)) => Ok(()),
        }
    }

    /// Asks the device authorization endpoint (RFC 8628 3.1) for a device code.
    #[cfg_attr(not(feature = "consent"), allow(dead_code))]
    pub(crate) async fn device_authorization(
        &self,
        scope: Option<&str>,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), Error> {
        let Some(url) = &self.profile.device_authorization_url else {
            return Err(Error::Config(format!(
                "the {} profile has no device authorization endpoint",
                self.profile.name
            )));
        };
        let mut fields = Vec::new();
        if let Some(scope) = scope {
            fields.push(("scope", scope));
        }
        self.send(self.authenticated_form(url, fields)).await
    }

    /// Classifies an answer that is not a success, for callers outside the token grant
    /// (the device authorization endpoint).
    #[cfg_attr(not(feature = "consent"), allow(dead_code))]
    pub(crate) fn classify_failure(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        now: OffsetDateTime,
    ) -> RefreshFailure {
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        match self.classify(status, headers, content_type, body, &[], now) {
            Ok(_) => RefreshFailure::Other(Error::InvalidResponse {
                reason: format!("HTTP {}: an unexpected token response", status.as_u16()),
            }),
            Err(failure) => failure,
        }
    }

    /// The client's authentication, per the profile: in `fields`, or as a Basic header.
    fn authenticate<'f>(
        &'f self,
        mut request: reqwest::RequestBuilder,
        fields: &mut Vec<(&'f str, &'f str)>,
    ) -> reqwest::RequestBuilder {
        match (self.credentials.secret(), self.profile.client_auth) {
            (None, _) => fields.push(("client_id", self.credentials.id())),
            (Some(secret), ClientAuth::RequestBody) => {
                fields.push(("client_id", self.credentials.id()));
                fields.push(("client_secret", secret.secret()));
            }
            (Some(secret), ClientAuth::BasicAuth) => {
                // RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request = request
                    .basic_auth(encode(self.credentials.id()), Some(encode(secret.secret())));
            }
        }
        request
    }

    fn with_headers(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        for (name, value) in &self.profile.request_headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request
    }

    fn build_request(&self, grant: GrantRequest<'_>) -> reqwest::RequestBuilder {
        let profile = &self.profile;
        let (url, mut fields, scope) = match grant {
            GrantRequest::Refresh(token) => (
                &profile.token_url,
                vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.secret()),
                ],
                profile.refresh_scope.as_deref(),
            ),
            GrantRequest::RefreshScoped(token, scope) => (
                &profile.token_url,
                vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.secret()),
                ],
                Some(scope),
            ),
            GrantRequest::AuthorizationCode {
                code,
                redirect_uri,
                verifier,
            } => {
                let mut fields = vec![
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                ];
                if let Some(verifier) = verifier {
                    fields.push(("code_verifier", verifier));
                }
                (profile.code_exchange_url(), fields, None)
            }
            GrantRequest::DeviceCode(code) => (
                profile.code_exchange_url(),
                vec![
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", code),
                ],
                None,
            ),
        };
        let request = self.authenticate(self.client.post(url.clone()), &mut fields);
        let request = self.with_headers(request);
        match profile.body_encoding {
            BodyEncoding::Form => {
                let joined = scope.map(|s| s.join(" "));
                if let Some(joined) = &joined {
                    fields.push(("scope", joined));
                }
                sealed_form(request, &fields)
            }
            BodyEncoding::Json => {
                let mut body: serde_json::Map<String, serde_json::Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into()))
                    .collect();
                if let Some(scope) = scope {
                    body.insert("scope".into(), scope.to_vec().into());
                }
                let body = serde_json::Value::Object(body).to_string();
                request
                    .header(CONTENT_TYPE, "application/json")
                    .body(sealed_body(body))
            }
        }
    }

    fn classify(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        content_type: Option<&str>,
        body: &[u8],
        secrets: &[&str],
        now: OffsetDateTime,
    ) -> Result<TokenResponse, RefreshFailure> {
        let profile = &self.profile;
        if status.is_success() {
            return match parse_token_response(profile, content_type, body) {
                Ok(response) => Ok(response),
                // Some servers answer 200 with an OAuth error body: classify it as one.
                Err(e) => match parse_error_untruncated(content_type, body) {
                    Some(provider) => {
                        Err(self.classify_error(status, Some(provider), secrets, None))
                    }
                    None => Err(RefreshFailure::Other(Error::InvalidResponse {
                        reason: format!("HTTP {}: {}", status.as_u16(), e.0),
                    })),
                },
            };
        }
        let retry_after = retry_after(headers, profile.rate_limit_reset_header.as_deref(), now);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(RefreshFailure::Other(Error::transient(
                TransientKind::RateLimited,
                retry_after,
            )));
        }
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            return Err(RefreshFailure::Other(Error::transient(
                TransientKind::ServerError(status.as_u16()),
                retry_after,
            )));
        }
        if status.is_redirection() {
            return Err(RefreshFailure::Other(Error::InvalidResponse {
                reason: format!(
                    "HTTP {}: the token endpoint redirected; redirects are refused",
                    status.as_u16()
                ),
            }));
        }
        let provider = parse_error_untruncated(content_type, body);
        Err(self.classify_error(status, provider, secrets, retry_after))
    }

    /// Classifies an error answer by its OAuth error code first, then by its status.
    fn classify_error(
        &self,
        status: StatusCode,
        provider: Option<ProviderError>,
        secrets: &[&str],
        retry_after: Option<Duration>,
    ) -> RefreshFailure {
        let profile = &self.profile;
        let provider = provider.map(|e| self.scrub(e, secrets));
        let code = provider.as_ref().map(|p| p.code.as_str());
        let matches = |codes: &[String]| code.is_some_and(|c| codes.iter().any(|k| k == c));
        // RFC 6749's "try again later" codes, whatever the status they came with.
        match code {
            Some("temporarily_unavailable" | "server_error") => {
                return RefreshFailure::Other(Error::transient(
                    TransientKind::ServerError(status.as_u16()),
                    retry_after,
                ));
            }
            Some("slow_down") => {
                return RefreshFailure::Other(Error::transient(
                    TransientKind::RateLimited,
                    retry_after,
                ));
            }
            _ => {}
        }
        if matches(&profile.reauthorization_codes) {
            return RefreshFailure::InvalidGrant(provider);
        }
        if matches(&profile.client_rejected_codes)
            || profile.client_rejected_statuses.contains(&status.as_u16())
        {
            return RefreshFailure::Other(Error::ClientRejected {
                status: status.as_u16(),
                provider,
            });
        }
        RefreshFailure::Other(match provider {
            Some(provider) => Error::RequestRejected {
                status: status.as_u16(),
                provider,
            },
            None => Error::InvalidResponse {
                reason: format!("HTTP {} without an OAuth error body", status.as_u16()),
            },
        })
    }

    /// Removes any token or secret a provider echoed into its error text (as sent, or
    /// percent-encoded), then cuts the text to length: scrubbing first, so that a secret
    /// cut at the boundary cannot survive.
    fn scrub(&self, mut error: ProviderError, sent: &[&str]) -> ProviderError {
        let mut secrets: Vec<String> = sent.iter().map(|s| (*s).to_owned()).collect();
        if let Some(s) = self.credentials.secret() {
            secrets.push(s.secret().to_owned());
        }
        let encoded: Vec<String> = secrets
            .iter()
            .flat_map(|s| {
                [
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>(),
                    percent_encode_all(s),
                ]
            })
            .collect();
        secrets.extend(encoded);
        for text in std::iter::once(&mut error.code).chain(error.description.as_mut()) {
            for secret in secrets.iter().filter(|s| s.len() >= 4) {
                if text.contains(secret.as_str()) {
                    *text = text.replace(secret.as_str(), "[redacted]");
                }
            }
        }
        truncate_error(error)
    }
}

/// Every non-alphanumeric byte as `%XX` (how some servers echo a parameter).
fn percent_encode_all(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn transport_error(e: reqwest::Error, default: TransientKind) -> Error {
    let kind = if e.is_timeout() {
        TransientKind::Timeout
    } else if e.is_connect() {
        TransientKind::Connect
    } else if e.is_body() || e.is_decode() {
        TransientKind::Interrupted
    } else {
        default
    };
    // reqwest's messages name the URL, never the body; the URL holds no secret.
    Error::Transient {
        kind,
        retry_after: None,
        source: Some(Arc::new(e.without_url())),
    }
}

async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, Error> {
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(too_large(max));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(e, TransientKind::Interrupted))?
    {
        if body.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(max: usize) -> Error {
    Error::InvalidResponse {
        reason: format!("the response body exceeds {max} bytes"),
    }
}

/// `Retry-After` (seconds or an HTTP date), else the profile's reset header (epoch seconds).
fn retry_after(
    headers: &HeaderMap,
    reset_header: Option<&str>,
    now: OffsetDateTime,
) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(value) = header(RETRY_AFTER.as_str()) {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        if let Ok(at) = OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822)
        {
            return Some((at - now).try_into().unwrap_or(Duration::ZERO));
        }
    }
    let reset = header(reset_header?)?.parse::<i64>().ok()?;
    // Documented as epoch seconds (HighQ); a small number can only be a delay in
    // seconds, and a huge one only epoch milliseconds.
    if (0..1_000_000_000).contains(&reset) {
        return Some(Duration::from_secs(reset.unsigned_abs()));
    }
    let at = if reset > 100_000_000_000 {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(reset) * 1_000_000).ok()?
    } else {
        OffsetDateTime::from_unix_timestamp(reset).ok()?
    };
    Some((at - now).try_into().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_the_reset_header() {
        let mut headers = HeaderMap::new();
        let now = OffsetDateTime::now_utc();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(
            retry_after(&headers, None, now),
            Some(Duration::from_secs(120))
        );

        let mut headers = HeaderMap::new();
        let reset = now.unix_timestamp() + 300;
        headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
        let got = retry_after(&headers, Some("X-Ratelimit-Reset"), now).unwrap();
        assert!(got > Duration::from_secs(299) && got <= Duration::from_secs(300));
        assert_eq!(retry_after(&headers, None, now), None);

        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-reset", HeaderValue::from(30));
        assert_eq!(
            retry_after(&headers, Some("X-Ratelimit-Reset"), now),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn retry_after_reads_an_http_date() {
        let now = time::macros::datetime!(2015-10-21 07:27:00 UTC);
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&headers, None, now),
            Some(Duration::from_secs(60))
        );
    }
}

//! Provider profiles: how one provider's token endpoint speaks, as data.
//!
//! A [`ProviderProfile`] says where the token endpoint is, how to encode the refresh
//! request, how to authenticate the client, how to read the response and its errors, and
//! what the provider's rotation and lifetime rules are. Start from a constructor and
//! override any field:
//!
//! ```
//! use tokenkeeper::ProviderProfile;
//! let mut profile = ProviderProfile::lucid();
//! profile.request_timeout = std::time::Duration::from_secs(10);
//! ```

use std::time::Duration;

use url::Url;

mod autodesk;
mod generic;
#[cfg(feature = "highq")]
mod highq;
mod lucid;
mod response;

pub use autodesk::{AUTODESK_AUTHORIZATION_URL, AUTODESK_REVOCATION_URL, AUTODESK_TOKEN_URL};
pub use lucid::{
    LUCID_AUTHORIZATION_URL, LUCID_LEGACY_REFRESH_URL, LUCID_LEGACY_TOKEN_URL,
    LUCID_REVOCATION_URL, LUCID_TOKEN_URL,
};
pub use response::{ParseError, TokenResponse, parse_error_response, parse_token_response};
pub(crate) use response::{parse_error_untruncated, truncate_error};

/// How the refresh request body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyEncoding {
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
    /// `application/json` (Lucid).
    Json,
}

/// How a confidential client authenticates at the token endpoint.
///
/// A public client ([`ClientCredentials::public`](crate::ClientCredentials::public)) always
/// sends its `client_id` in the body and no secret, whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the request body.
    RequestBody,
    /// `Authorization: Basic` with the id and secret, and neither in the body.
    BasicAuth,
}

/// How the token response is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResponseFormat {
    /// JSON only.
    Json,
    /// XML only (a flat element such as HighQ's `<TokenResponse>`). With the `xml`
    /// feature.
    #[cfg(feature = "xml")]
    #[cfg_attr(docsrs, doc(cfg(feature = "xml")))]
    Xml,
    /// By the `Content-Type` header, and by the body's first character when the header
    /// is missing or contradicted by the body. Without the `xml` feature, an XML body is
    /// an unreadable answer (RFC 6749 token responses are JSON).
    ByContentType,
}

/// The unit of an absolute expiry field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EpochUnit {
    /// Seconds since 1970.
    Seconds,
    /// Milliseconds since 1970 (Lucid's `expires`).
    Milliseconds,
    /// Guess from the magnitude: values above 10^11 are milliseconds.
    Auto,
}

/// Whether a refresh token can be used more than once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rotation {
    /// Every refresh returns a new refresh token and kills the one used.
    SingleUse,
    /// The refresh token may be used again.
    Reusable,
    /// Not documented: treated as single use.
    Unknown,
}

/// The provider's token endpoint, as data. Every field is public and may be overridden.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProviderProfile {
    /// A short name for logs (`lucid`, `highq`, `autodesk`, `generic`).
    pub name: String,
    /// The token endpoint. `https` is required unless the host is a loopback address.
    pub token_url: Url,
    /// How the refresh request body is encoded.
    pub body_encoding: BodyEncoding,
    /// How a confidential client authenticates.
    pub client_auth: ClientAuth,
    /// Extra request headers (HighQ: `Accept: application/json`).
    pub request_headers: Vec<(String, String)>,
    /// How the response is encoded.
    pub response_format: ResponseFormat,
    /// The relative lifetime field, in seconds (`expires_in`).
    pub expires_in_field: String,
    /// An absolute expiry field and its unit (Lucid: `expires`, milliseconds).
    pub expires_at_field: Option<(String, EpochUnit)>,
    /// The refresh token's relative lifetime field, in seconds (HighQ:
    /// `refresh_token_expires_in`).
    pub refresh_expires_in_field: Option<String>,
    /// The access-token lifetime assumed when the response states none.
    pub default_access_token_lifetime: Option<Duration>,
    /// The refresh token's lifetime from issue, when the response does not state it
    /// (Lucid 180 days, Autodesk 15 days, HighQ 1 year).
    pub refresh_token_lifetime: Option<Duration>,
    /// Scopes to request on refresh (Autodesk allows the same or a subset); `None` sends
    /// no `scope`. Space-separated in a form body, an array in a JSON body.
    pub refresh_scope: Option<Vec<String>>,
    /// Whether refresh tokens are single use.
    pub rotation: Rotation,
    /// Whether a refresh kills the previous access token (Lucid; servers that delete the
    /// old access token when they rotate, as django-oauth-toolkit does). Then a source
    /// never serves a token whose refresh is in flight, its own or another replica's
    /// (callers wait for the successor instead: the length of a refresh, once per
    /// lifetime), and replicas sharing a store that can watch follow each other's
    /// refreshes within milliseconds. Left `false` on a server that does kill them, the
    /// token a replica serves while another refreshes is rejected by the API (a
    /// `TokenMiddleware` then reloads it and retries). The generic profile assumes
    /// `false`: set it with [`ProviderProfile::with_refresh_invalidates_access_token`].
    pub refresh_invalidates_access_token: bool,
    /// Whether a refresh asking for fewer scopes returns a refresh token narrowed to
    /// them (some servers do; Autodesk's keeps the full grant). Then
    /// `access_token_for` refuses: a narrow grant must be kept under its own key.
    pub refresh_token_narrows_with_scope: bool,
    /// API statuses that mean "expired or revoked access token" (401; HighQ 403).
    pub expired_token_statuses: Vec<u16>,
    /// Token-endpoint statuses that mean "client credentials rejected" when the body
    /// names no error code (Lucid answers 401 or 403).
    pub client_rejected_statuses: Vec<u16>,
    /// Error codes that mean "the grant is dead: re-authorize" (`invalid_grant`).
    pub reauthorization_codes: Vec<String>,
    /// Error codes that mean "the client is rejected" (`invalid_client`...).
    pub client_rejected_codes: Vec<String>,
    /// A header carrying the rate-limit reset instant in epoch seconds (HighQ:
    /// `X-Ratelimit-Reset`). `Retry-After` is always honoured.
    pub rate_limit_reset_header: Option<String>,
    /// Connect timeout of the token request.
    pub connect_timeout: Duration,
    /// Total timeout of the token request.
    pub request_timeout: Duration,
    /// The most response bytes read; longer bodies are an invalid response.
    pub max_response_bytes: usize,

    // What consent needs (see [`crate::consent`]).
    /// The authorization endpoint, where a person consents (the authorization-code
    /// grant). `None`: the provider's consent page is unknown; set it to use
    /// [`Consent::authorization_code`](crate::consent::Consent::authorization_code).
    pub authorization_url: Option<Url>,
    /// Where an authorization code (or a device code) is exchanged, when not at
    /// [`token_url`](Self::token_url) (Lucid's legacy endpoints refresh at
    /// `/oauth2/refreshToken` and exchange codes at `/oauth2/token`).
    pub code_exchange_url: Option<Url>,
    /// The device authorization endpoint (RFC 8628), for providers that have one.
    pub device_authorization_url: Option<Url>,
    /// The token revocation endpoint (RFC 7009 form body: `token`, `token_type_hint`, and
    /// the client authentication of [`client_auth`](Self::client_auth)).
    pub revocation_url: Option<Url>,
    /// Scopes asked for at consent when the caller names none (Lucid: `offline_access`,
    /// without which no refresh token is issued; HighQ takes no scope).
    pub default_scopes: Vec<String>,
    /// Whether to send a PKCE S256 challenge at consent (Autodesk supports it; servers
    /// that do not may reject the unknown parameters, so it is sent only where set).
    pub pkce: bool,
    /// Whether the authorization server echoes `state` on the redirect. When `false`
    /// (HighQ, per its public clients) a redirect without `state` is accepted with a
    /// warning; a `state` that is present is always checked.
    pub state_echoed: bool,
    /// A redirect URI that shows the code for copying (Lucid:
    /// `https://lucid.app/oauth2/clients/{client_id}/redirect`), used by the paste flow;
    /// `{client_id}` is replaced by the client id.
    pub copy_code_redirect_uri: Option<String>,
}

impl ProviderProfile {
    /// Checks what can be checked before any request: `https` (or loopback `http`).
    pub fn validate(&self) -> Result<(), crate::Error> {
        let urls = [
            ("token URL", Some(&self.token_url)),
            ("code exchange URL", self.code_exchange_url.as_ref()),
            (
                "device authorization URL",
                self.device_authorization_url.as_ref(),
            ),
            ("revocation URL", self.revocation_url.as_ref()),
        ];
        for (what, url) in urls {
            let Some(url) = url else { continue };
            match url.scheme() {
                "https" => {}
                "http" if is_loopback(url) => {}
                scheme => {
                    return Err(crate::Error::Config(format!(
                        "the {what} must use https (got {scheme}; http is allowed only for loopback hosts)"
                    )));
                }
            }
        }
        for (name, value) in &self.request_headers {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(crate::Error::Config(format!(
                    "the profile's request header name {name:?} is not a valid HTTP header name"
                )));
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                // The value may be a credential: never quoted.
                return Err(crate::Error::Config(format!(
                    "the value of the profile's request header {name:?} is not a valid HTTP header value"
                )));
            }
        }
        Ok(())
    }

    /// Whether any endpoint this crate sends requests to is on a loopback host
    /// (`localhost`, `127.0.0.0/8`, `::1`).
    pub(crate) fn any_url_is_loopback(&self) -> bool {
        [
            Some(&self.token_url),
            self.code_exchange_url.as_ref(),
            self.device_authorization_url.as_ref(),
            self.revocation_url.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(is_loopback)
    }

    /// Sets the token URL (the legacy Lucid URL, a test server...).
    pub fn with_token_url(mut self, url: Url) -> Self {
        self.token_url = url;
        self
    }

    /// Says whether the server kills the previous access token when it answers a refresh
    /// (see [`ProviderProfile::refresh_invalidates_access_token`]).
    pub fn with_refresh_invalidates_access_token(mut self, kills: bool) -> Self {
        self.refresh_invalidates_access_token = kills;
        self
    }

    /// The base every constructor starts from: RFC 6749 as written.
    fn rfc6749(name: &str, token_url: Url) -> Self {
        Self {
            name: name.to_owned(),
            token_url,
            body_encoding: BodyEncoding::Form,
            client_auth: ClientAuth::RequestBody,
            request_headers: vec![("Accept".into(), "application/json".into())],
            response_format: ResponseFormat::ByContentType,
            expires_in_field: "expires_in".into(),
            expires_at_field: None,
            refresh_expires_in_field: Some("refresh_token_expires_in".into()),
            default_access_token_lifetime: None,
            refresh_token_lifetime: None,
            refresh_scope: None,
            rotation: Rotation::Unknown,
            refresh_invalidates_access_token: false,
            refresh_token_narrows_with_scope: false,
            expired_token_statuses: vec![401],
            client_rejected_statuses: vec![401],
            reauthorization_codes: vec!["invalid_grant".into()],
            client_rejected_codes: vec!["invalid_client".into(), "unauthorized_client".into()],
            rate_limit_reset_header: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: 1024 * 1024,
            authorization_url: None,
            code_exchange_url: None,
            device_authorization_url: None,
            revocation_url: None,
            default_scopes: Vec::new(),
            pkce: true,
            state_echoed: true,
            copy_code_redirect_uri: None,
        }
    }

    /// Where authorization and device codes are exchanged.
    pub(crate) fn code_exchange_url(&self) -> &Url {
        self.code_exchange_url.as_ref().unwrap_or(&self.token_url)
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn static_url(url: &str) -> Url {
    Url::parse(url).expect("a built-in URL parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_refused_except_for_loopback() {
        let profile = |u: &str| {
            ProviderProfile::generic(Url::parse(u).unwrap())
                .validate()
                .is_ok()
        };
        assert!(profile("https://example.com/token"));
        assert!(profile("http://127.0.0.1:8080/token"));
        assert!(profile("http://[::1]:8080/token"));
        assert!(profile("http://localhost/token"));
        assert!(!profile("http://example.com/token"));
        assert!(!profile("ftp://127.0.0.1/token"));
    }
}

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

/// How a refresh attempt ended, when it did not succeed.
#[derive(Debug)]
pub(crate) enum RefreshFailure {
    /// The provider says the refresh token is dead (`invalid_grant`).
    InvalidGrant(Option<ProviderError>),
    /// Anything else, already classified.
    Other(Error),
}

impl TokenEndpoint {
    pub(crate) fn new(
        profile: ProviderProfile,
        credentials: ClientCredentials,
    ) -> Result<Self, Error> {
        profile.validate()?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(profile.connect_timeout)
            .timeout(profile.request_timeout);
        if profile.token_url_is_loopback() {
            // A proxy from HTTP_PROXY cannot reach this machine's loopback.
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            profile,
            credentials,
            client,
        })
    }

    pub(crate) fn profile(&self) -> &ProviderProfile {
        &self.profile
    }

    /// Presents `refresh_token` once. `now` is the clock's reading as the request is sent
    /// (for rate-limit reset instants).
    pub(crate) async fn refresh(
        &self,
        refresh_token: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<TokenResponse, RefreshFailure> {
        let request = self.build_request(refresh_token);
        let response = request
            .send()
            .await
            .map_err(|e| RefreshFailure::Other(transport_error(e, TransientKind::Connect)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(response, self.profile.max_response_bytes)
            .await
            .map_err(RefreshFailure::Other)?;
        self.classify(
            status,
            &headers,
            content_type.as_deref(),
            &body,
            refresh_token,
            now,
        )
    }

    fn build_request(&self, refresh_token: &RefreshToken) -> reqwest::RequestBuilder {
        let profile = &self.profile;
        let mut fields: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.secret()),
        ];
        let mut request = self.client.post(profile.token_url.clone());
        match (self.credentials.secret(), profile.client_auth) {
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
        for (name, value) in &profile.request_headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let scope = profile.refresh_scope.as_ref();
        match profile.body_encoding {
            BodyEncoding::Form => {
                let joined = scope.map(|s| s.join(" "));
                if let Some(joined) = &joined {
                    fields.push(("scope", joined));
                }
                request.form(&fields)
            }
            BodyEncoding::Json => {
                let mut body: serde_json::Map<String, serde_json::Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into()))
                    .collect();
                if let Some(scope) = scope {
                    body.insert("scope".into(), scope.clone().into());
                }
                request.json(&body)
            }
        }
    }

    fn classify(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        content_type: Option<&str>,
        body: &[u8],
        refresh_token: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<TokenResponse, RefreshFailure> {
        let profile = &self.profile;
        if status.is_success() {
            return match parse_token_response(profile, content_type, body) {
                Ok(response) => Ok(response),
                // Some servers answer 200 with an OAuth error body: classify it as one.
                Err(e) => match parse_error_untruncated(content_type, body) {
                    Some(provider) => {
                        Err(self.classify_error(status, Some(provider), refresh_token, None))
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
        Err(self.classify_error(status, provider, refresh_token, retry_after))
    }

    /// Classifies an error answer by its OAuth error code first, then by its status.
    fn classify_error(
        &self,
        status: StatusCode,
        provider: Option<ProviderError>,
        refresh_token: &RefreshToken,
        retry_after: Option<Duration>,
    ) -> RefreshFailure {
        let profile = &self.profile;
        let provider = provider.map(|e| self.scrub(e, refresh_token));
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
    fn scrub(&self, mut error: ProviderError, refresh_token: &RefreshToken) -> ProviderError {
        let mut secrets = vec![refresh_token.secret().to_owned()];
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

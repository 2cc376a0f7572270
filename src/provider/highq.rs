//! HighQ Collaborate (Thomson Reuters).

use std::time::Duration;

use url::Url;

use super::{ProviderProfile, ResponseFormat, Rotation};

impl ProviderProfile {
    /// HighQ Collaborate at `base_url` (`https://{host}/{instance}/`), with the `highq`
    /// feature: a form body with
    /// id and secret, `Accept: application/json`, a JSON or XML `<TokenResponse>` read by
    /// Content-Type (and by sniffing when the header lies), numbers possibly as strings,
    /// `refresh_token_expires_in`; a one-year refresh token reset by every refresh and
    /// treated as single use; 403 on the API means an expired access token; 429 carries
    /// `X-Ratelimit-Reset` (epoch seconds). Consent at `{base_url}authorize.action`, with
    /// no scope and no PKCE; `state` may not be echoed; no revocation endpoint.
    #[cfg_attr(docsrs, doc(cfg(feature = "highq")))]
    pub fn highq(base_url: Url) -> Self {
        let mut base = base_url;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let token_url = base
            .join("api/oauth2/token")
            .expect("a relative path joins onto any base URL");
        let authorization_url = base
            .join("authorize.action")
            .expect("a relative path joins onto any base URL");
        Self {
            authorization_url: Some(authorization_url),
            pkce: false,
            state_echoed: false,
            response_format: ResponseFormat::ByContentType,
            default_access_token_lifetime: Some(Duration::from_secs(5 * 3600)),
            refresh_token_lifetime: Some(Duration::from_secs(365 * 24 * 3600)),
            rotation: Rotation::Unknown,
            expired_token_statuses: vec![403],
            rate_limit_reset_header: Some("X-Ratelimit-Reset".into()),
            ..Self::rfc6749("highq", token_url)
        }
    }
}

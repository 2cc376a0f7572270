//! Lucid (Lucidchart, Lucid REST API).

use std::time::Duration;

use super::{BodyEncoding, EpochUnit, ProviderProfile, Rotation, static_url};

/// Lucid's token endpoint.
pub const LUCID_TOKEN_URL: &str = "https://api.lucid.co/oauth2/token";
/// Lucid's older token endpoint, which takes the same JSON body.
pub const LUCID_LEGACY_TOKEN_URL: &str = "https://users.lucidchart.com/oauth2/token";

impl ProviderProfile {
    /// Lucid: a JSON body with `client_id` and `client_secret`; `expires_in` seconds and
    /// `expires` epoch milliseconds (the earlier wins); a `scopes` array; single-use
    /// refresh tokens valid 180 days; a refresh kills the previous access token; 401 and
    /// 403 from the token endpoint mean the client credentials were rejected.
    pub fn lucid() -> Self {
        Self {
            body_encoding: BodyEncoding::Json,
            expires_at_field: Some(("expires".into(), EpochUnit::Milliseconds)),
            refresh_token_lifetime: Some(Duration::from_secs(180 * 24 * 3600)),
            rotation: Rotation::SingleUse,
            refresh_invalidates_access_token: true,
            client_rejected_statuses: vec![401, 403],
            ..Self::rfc6749("lucid", static_url(LUCID_TOKEN_URL))
        }
    }

    /// Lucid at its legacy token URL (`users.lucidchart.com`).
    pub fn lucid_legacy() -> Self {
        Self::lucid().with_token_url(static_url(LUCID_LEGACY_TOKEN_URL))
    }
}

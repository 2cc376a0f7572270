//! Lucid (Lucidchart, Lucid REST API).

use std::time::Duration;

use super::{BodyEncoding, EpochUnit, ProviderProfile, Rotation, static_url};

/// Lucid's token endpoint.
pub const LUCID_TOKEN_URL: &str = "https://api.lucid.co/oauth2/token";
/// Lucid's older code-exchange endpoint, which takes the same JSON body.
pub const LUCID_LEGACY_TOKEN_URL: &str = "https://users.lucidchart.com/oauth2/token";
/// Lucid's older refresh endpoint (the legacy documentation refreshes here, and exchanges
/// codes at [`LUCID_LEGACY_TOKEN_URL`]).
pub const LUCID_LEGACY_REFRESH_URL: &str = "https://users.lucidchart.com/oauth2/refreshToken";
/// Where a person consents to a Lucid user token.
pub const LUCID_AUTHORIZATION_URL: &str = "https://lucid.app/oauth2/authorize";
/// Lucid's revocation endpoint (revoking either token revokes the whole grant).
pub const LUCID_REVOCATION_URL: &str = "https://api.lucid.co/oauth2/token/revoke";

impl ProviderProfile {
    /// Lucid: a JSON body with `client_id` and `client_secret`; `expires_in` seconds and
    /// `expires` epoch milliseconds (the earlier wins); a `scopes` array; single-use
    /// refresh tokens valid 180 days; a refresh kills the previous access token; 401 and
    /// 403 from the token endpoint mean the client credentials were rejected. Consent at
    /// `lucid.app/oauth2/authorize` with `offline_access` (no refresh token without it),
    /// no PKCE; the copy-code page for headless consent; revocation at
    /// `api.lucid.co/oauth2/token/revoke`.
    pub fn lucid() -> Self {
        Self {
            body_encoding: BodyEncoding::Json,
            expires_at_field: Some(("expires".into(), EpochUnit::Milliseconds)),
            refresh_token_lifetime: Some(Duration::from_secs(180 * 24 * 3600)),
            rotation: Rotation::SingleUse,
            refresh_invalidates_access_token: true,
            client_rejected_statuses: vec![401, 403],
            authorization_url: Some(static_url(LUCID_AUTHORIZATION_URL)),
            revocation_url: Some(static_url(LUCID_REVOCATION_URL)),
            default_scopes: vec!["offline_access".into()],
            pkce: false,
            copy_code_redirect_uri: Some(
                "https://lucid.app/oauth2/clients/{client_id}/redirect".into(),
            ),
            ..Self::rfc6749("lucid", static_url(LUCID_TOKEN_URL))
        }
    }

    /// Lucid at its legacy endpoints: refresh at `users.lucidchart.com/oauth2/refreshToken`,
    /// exchange codes at `users.lucidchart.com/oauth2/token`, same JSON body.
    pub fn lucid_legacy() -> Self {
        Self {
            code_exchange_url: Some(static_url(LUCID_LEGACY_TOKEN_URL)),
            ..Self::lucid().with_token_url(static_url(LUCID_LEGACY_REFRESH_URL))
        }
    }
}

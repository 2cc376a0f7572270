//! Autodesk Platform Services (APS), Authentication v2.

use std::time::Duration;

use super::{ClientAuth, EpochUnit, ProviderProfile, Rotation, static_url};

/// The APS v2 token endpoint.
pub const AUTODESK_TOKEN_URL: &str = "https://developer.api.autodesk.com/authentication/v2/token";
/// Where a person consents to an Autodesk (APS) three-legged token.
pub const AUTODESK_AUTHORIZATION_URL: &str =
    "https://developer.api.autodesk.com/authentication/v2/authorize";
/// Autodesk's revocation endpoint.
pub const AUTODESK_REVOCATION_URL: &str =
    "https://developer.api.autodesk.com/authentication/v2/revoke";

impl ProviderProfile {
    /// Autodesk Platform Services v2: a form body; confidential clients authenticate with
    /// Basic and put no credentials in the body, public clients send `client_id` alone;
    /// optional `scope` on refresh (set [`refresh_scope`](Self::refresh_scope)); 15-day
    /// single-use refresh tokens; the old access token stays valid; RFC or Autodesk-shaped
    /// error bodies; 429 with `Retry-After`.
    ///
    /// Autodesk's own error codes for a rejected client (`AUTH-001` client not authorized
    /// for the API, `AUTH-002` nor for the endpoint, `AUTH-003` wrong secret, `AUTH-012`
    /// missing or invalid `Authorization` header) mean
    /// [`Error::ClientRejected`](crate::Error::ClientRejected), whatever their status
    /// (`AUTH-001` comes with 403).
    pub fn autodesk() -> Self {
        let base = Self::rfc6749("autodesk", static_url(AUTODESK_TOKEN_URL));
        let mut client_rejected_codes = base.client_rejected_codes.clone();
        client_rejected_codes
            .extend(["AUTH-001", "AUTH-002", "AUTH-003", "AUTH-012"].map(String::from));
        Self {
            client_rejected_codes,
            client_auth: ClientAuth::BasicAuth,
            expires_at_field: Some(("expires_at".into(), EpochUnit::Auto)),
            refresh_token_lifetime: Some(Duration::from_secs(15 * 24 * 3600)),
            rotation: Rotation::SingleUse,
            authorization_url: Some(static_url(AUTODESK_AUTHORIZATION_URL)),
            revocation_url: Some(static_url(AUTODESK_REVOCATION_URL)),
            default_scopes: vec!["data:read".into()],
            pkce: true,
            ..base
        }
    }

    /// Requests `scopes` (the same as granted, or a subset) on every refresh.
    pub fn with_refresh_scope<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.refresh_scope = Some(scopes.into_iter().map(Into::into).collect());
        self
    }
}

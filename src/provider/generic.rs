//! The generic RFC 6749 profile.

use url::Url;

use super::ProviderProfile;

impl ProviderProfile {
    /// Any RFC 6749 provider: form body, client id and secret in the body (switch
    /// [`client_auth`](Self::client_auth) to Basic where the provider wants it),
    /// `expires_in` seconds, `scope` string, RFC error bodies. Rotation is treated as
    /// single use.
    pub fn generic(token_url: Url) -> Self {
        Self::rfc6749("generic", token_url)
    }
}

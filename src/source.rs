//! The [`TokenSource`] trait.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Error;
use crate::secret::AccessToken;

/// Something that hands out valid access tokens.
///
/// Object safe: hold it as `Arc<dyn TokenSource>`.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// A token valid now (fresh, or stale while a refresh runs), refreshing first if
    /// needed.
    async fn access_token(&self) -> Result<AccessToken, Error>;

    /// The API rejected `rejected` (401, or 403 for HighQ): forget it if it is still the
    /// current token, so that the next call reloads from the store and refreshes if needed.
    async fn invalidate(&self, rejected: &AccessToken);

    /// The API statuses that mean "expired or invalid token" for this source's provider
    /// (what `TokenMiddleware` and `send_with_token` react to): a
    /// [`RefreshingTokenSource`](crate::RefreshingTokenSource) answers its profile's
    /// [`expired_token_statuses`](crate::ProviderProfile::expired_token_statuses) (401;
    /// HighQ 403). Default: 401.
    fn expired_token_statuses(&self) -> &[u16] {
        &[401]
    }
}

#[async_trait]
impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    async fn access_token(&self) -> Result<AccessToken, Error> {
        (**self).access_token().await
    }
    async fn invalidate(&self, rejected: &AccessToken) {
        (**self).invalidate(rejected).await
    }
    fn expired_token_statuses(&self) -> &[u16] {
        (**self).expired_token_statuses()
    }
}

#[async_trait]
impl<T: TokenSource + ?Sized> TokenSource for Box<T> {
    async fn access_token(&self) -> Result<AccessToken, Error> {
        (**self).access_token().await
    }
    async fn invalidate(&self, rejected: &AccessToken) {
        (**self).invalidate(rejected).await
    }
    fn expired_token_statuses(&self) -> &[u16] {
        (**self).expired_token_statuses()
    }
}

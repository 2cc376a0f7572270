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
}

#[async_trait]
impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    async fn access_token(&self) -> Result<AccessToken, Error> {
        (**self).access_token().await
    }
    async fn invalidate(&self, rejected: &AccessToken) {
        (**self).invalidate(rejected).await
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
}

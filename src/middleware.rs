//! Reactive refresh: send API requests with a bearer token, and when the API answers that
//! the token is no longer valid, get a new one and retry the request once.
//!
//! Proactive refresh (before expiry) covers most cases, but not all: with Lucid, a refresh
//! by another replica kills every other replica's access token at once, and a provider may
//! revoke a token before its announced expiry. The API then answers with one of the
//! profile's [`expired_token_statuses`](crate::ProviderProfile::expired_token_statuses)
//! (401; HighQ 403). Both tools here react the same way:
//!
//! 1. attach `Authorization: Bearer <token>` from the [`TokenSource`];
//! 2. if the response status is an expired-token status, [`TokenSource::invalidate`] the
//!    token (a [`RefreshingTokenSource`](crate::RefreshingTokenSource) then reloads the
//!    store first, adopting a token another replica already refreshed, and refreshes only
//!    if the store holds nothing newer);
//! 3. get a token again and, if it differs from the rejected one, send the request again:
//!    once, never in a loop. The second response is returned whatever its status.
//!
//! [`TokenMiddleware`] plugs into a
//! [`reqwest_middleware::ClientWithMiddleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/struct.ClientWithMiddleware.html);
//! [`send_with_token`] does the same for a plain
//! [`reqwest::Client`](https://docs.rs/reqwest/0.13/reqwest/struct.Client.html).
//!
//! ```no_run
//! use tokenkeeper::middleware::TokenMiddleware;
//! use tokenkeeper::{ClientCredentials, ProviderProfile, RefreshingTokenSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let profile = ProviderProfile::lucid();
//! let source = RefreshingTokenSource::builder(
//!     profile.clone(),
//!     ClientCredentials::new("client-id", "client-secret"),
//! )
//! .build()?;
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(TokenMiddleware::new(source))
//!     .build();
//! let response = client
//!     .get("https://api.lucid.co/users/me")
//!     .header("Lucid-Api-Version", "1")
//!     .send()
//!     .await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! When no token can be obtained, the error tells what to do ([`Error`]); from the
//! middleware's error, [`TokenErrorExt::token_error`] reaches it without a downcast.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use http::Extensions;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Request, RequestBuilder, Response};
use reqwest_middleware::{Middleware, Next};

use crate::error::Error;
use crate::secret::AccessToken;
use crate::source::TokenSource;

/// Why a request sent with a token could not produce a response.
///
/// Like [`Error`], never carries a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No access token could be obtained: see the [`Error`] for what to do.
    #[error("could not obtain an access token")]
    Token(#[source] Error),
    /// The access token cannot be sent in an HTTP header (it holds bytes that a header
    /// value may not contain).
    #[error("the access token is not a valid HTTP header value")]
    InvalidToken,
    /// The request itself failed (connect, timeout, a body error...).
    #[error("the request failed")]
    Request(#[source] reqwest::Error),
}

impl SendError {
    /// The token error, when the failure was obtaining a token.
    pub fn token_error(&self) -> Option<&Error> {
        match self {
            SendError::Token(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Error> for SendError {
    fn from(e: Error) -> Self {
        SendError::Token(e)
    }
}

impl From<reqwest::Error> for SendError {
    fn from(e: reqwest::Error) -> Self {
        SendError::Request(e)
    }
}

/// A [`reqwest_middleware::Middleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/trait.Middleware.html)
/// that authorizes every request with a token from a [`TokenSource`] and, when the API
/// rejects the token, invalidates it and retries the request once with a new one.
///
/// A request whose body cannot be cloned (a stream) is not retried: the first response is
/// returned. Use [`send_with_token`], which rebuilds the request, for those.
///
/// Failures to obtain a token surface as
/// [`reqwest_middleware::Error::Middleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/enum.Error.html#variant.Middleware) wrapping
/// a [`SendError::Token`]: [`TokenErrorExt::token_error`] reaches the [`Error`].
#[derive(Clone)]
pub struct TokenMiddleware {
    source: Arc<dyn TokenSource>,
    expired_statuses: Arc<[u16]>,
}

impl fmt::Debug for TokenMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenMiddleware")
            .field("expired_statuses", &self.expired_statuses)
            .finish_non_exhaustive()
    }
}

impl TokenMiddleware {
    /// Tokens from `source`; the statuses meaning "expired token" are the source's
    /// ([`TokenSource::expired_token_statuses`]: its profile's, 401; HighQ 403).
    pub fn new(source: impl TokenSource + 'static) -> Self {
        let statuses = source.expired_token_statuses().to_vec();
        Self::with_statuses(source, statuses)
    }

    /// Tokens from `source`; `expired_statuses` are the API statuses meaning "expired or
    /// invalid token".
    pub fn with_statuses(
        source: impl TokenSource + 'static,
        expired_statuses: impl IntoIterator<Item = u16>,
    ) -> Self {
        Self::from_shared(Arc::new(source), expired_statuses)
    }

    /// A source already shared behind an `Arc<dyn TokenSource>`.
    pub fn from_shared(
        source: Arc<dyn TokenSource>,
        expired_statuses: impl IntoIterator<Item = u16>,
    ) -> Self {
        Self {
            source,
            expired_statuses: expired_statuses.into_iter().collect(),
        }
    }

    /// The token source.
    pub fn source(&self) -> &Arc<dyn TokenSource> {
        &self.source
    }

    /// The statuses that trigger one invalidate-and-retry.
    pub fn expired_statuses(&self) -> &[u16] {
        &self.expired_statuses
    }
}

#[async_trait]
impl Middleware for TokenMiddleware {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let token = self.source.access_token().await.map_err(middleware_error)?;
        // Cloned before the header is set: the retry gets its own token.
        let retry = request.try_clone();
        authorize(&mut request, &token).map_err(reqwest_middleware::Error::middleware)?;
        let response = next.clone().run(request, extensions).await?;
        if !is_expired(&self.expired_statuses, &response) {
            return Ok(response);
        }
        let Some(mut retry) = retry else {
            tracing::debug!(
                "the API rejected the access token; the request body cannot be cloned, so it is not retried"
            );
            return Ok(response);
        };
        let Some(fresh) = renew(self.source.as_ref(), &token)
            .await
            .map_err(middleware_error)?
        else {
            return Ok(response);
        };
        drop(response);
        authorize(&mut retry, &fresh).map_err(reqwest_middleware::Error::middleware)?;
        next.run(retry, extensions).await
    }
}

fn middleware_error(e: Error) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(SendError::Token(e))
}

/// The token [`Error`] inside the error a request through [`TokenMiddleware`] failed
/// with, without a downcast.
///
/// ```no_run
/// use tokenkeeper::middleware::TokenErrorExt;
///
/// # async fn run(client: reqwest_middleware::ClientWithMiddleware) {
/// match client.get("https://api.lucid.co/users/me").send().await {
///     Ok(response) => { /* ... */ }
///     Err(e) => match e.token_error() {
///         Some(token_error) if token_error.needs_reauthorization() => {
///             // send the user through consent again
///         }
///         _ => { /* the request failed, or retry later */ }
///     },
/// }
/// # }
/// ```
pub trait TokenErrorExt {
    /// The token error, when the request failed because no token could be obtained.
    fn token_error(&self) -> Option<&Error>;
}

impl TokenErrorExt for reqwest_middleware::Error {
    fn token_error(&self) -> Option<&Error> {
        match self {
            reqwest_middleware::Error::Middleware(e) => e
                .downcast_ref::<SendError>()
                .and_then(SendError::token_error),
            _ => None,
        }
    }
}

/// Sends the request `build` makes, authorized with a token from `source`; when the
/// response status is one of the source's expired-token statuses
/// ([`TokenSource::expired_token_statuses`]), invalidates that token, gets a new one and
/// sends a rebuilt request once more. The second response is returned whatever its
/// status.
///
/// `build` is called once per attempt (at most twice) and must not set `Authorization`
/// itself: the bearer token is added to what it returns. Rebuilding means that requests
/// with streaming bodies are retried too.
///
/// ```no_run
/// use tokenkeeper::middleware::send_with_token;
/// use tokenkeeper::RefreshingTokenSource;
///
/// # async fn run(source: RefreshingTokenSource) -> Result<(), Box<dyn std::error::Error>> {
/// let client = reqwest::Client::new();
/// let response = send_with_token(&source, || {
///     client.get("https://developer.api.autodesk.com/userprofile/v1/users/@me")
/// })
/// .await?;
/// # let _ = response;
/// # Ok(())
/// # }
/// ```
pub async fn send_with_token<F>(
    source: &dyn TokenSource,
    mut build: F,
) -> Result<Response, SendError>
where
    F: FnMut() -> RequestBuilder + Send,
{
    let token = source.access_token().await?;
    let response = send(build(), &token).await?;
    if !is_expired(source.expired_token_statuses(), &response) {
        return Ok(response);
    }
    let Some(fresh) = renew(source, &token).await? else {
        return Ok(response);
    };
    drop(response);
    send(build(), &fresh).await
}

async fn send(builder: RequestBuilder, token: &AccessToken) -> Result<Response, SendError> {
    let (client, request) = builder.build_split();
    let mut request = request?;
    authorize(&mut request, token)?;
    Ok(client.execute(request).await?)
}

fn is_expired(expired_statuses: &[u16], response: &Response) -> bool {
    expired_statuses.contains(&response.status().as_u16())
}

/// Invalidates the rejected token and gets another; `None` when the source hands back the
/// rejected token again (retrying with it would be pointless).
async fn renew(
    source: &dyn TokenSource,
    rejected: &AccessToken,
) -> Result<Option<AccessToken>, Error> {
    tracing::debug!("the API rejected the access token; getting a new one and retrying once");
    source.invalidate(rejected).await;
    let fresh = source.access_token().await?;
    if &fresh == rejected {
        tracing::warn!(
            "the token source handed back the access token the API rejected; not retrying"
        );
        return Ok(None);
    }
    Ok(Some(fresh))
}

/// Sets `Authorization: Bearer <token>`, marked sensitive (never logged by hyper/reqwest).
fn authorize(request: &mut Request, token: &AccessToken) -> Result<(), SendError> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.secret()))
        .map_err(|_| SendError::InvalidToken)?;
    value.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, value);
    Ok(())
}

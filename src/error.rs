//! The one public error type.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::store::StoreError;

/// A shareable, type-erased cause.
pub(crate) type Cause = Arc<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong while obtaining an access token, grouped by what the
/// application should do about it.
///
/// Messages carry the provider's `error` code and description, never a token, a client
/// secret or a raw response body.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A person must consent again: the refresh token expired, was revoked, was used twice,
    /// or none was ever stored. Retrying will not help.
    #[error("a person must re-authorize: {reason}{}", provider_suffix(.provider))]
    ReauthorizationRequired {
        /// Why the grant is unusable.
        reason: ReauthorizationReason,
        /// The provider's error code and description, when it sent one.
        provider: Option<ProviderError>,
    },

    /// The token endpoint rejected the client id or secret: a configuration problem of the
    /// application, not of the user's grant. The stored tokens are kept.
    #[error("the token endpoint rejected the client credentials (HTTP {status}){}", provider_suffix(.provider))]
    ClientRejected {
        /// The HTTP status of the rejection.
        status: u16,
        /// The provider's error code and description, when it sent one.
        provider: Option<ProviderError>,
    },

    /// No usable token right now, but nothing is lost: the refresh token is kept and a later
    /// call may succeed. `retry_after` says when the next attempt will be made.
    #[error("no access token for now ({kind}); nothing was lost, retry later")]
    Transient {
        /// What kind of failure.
        kind: TransientKind,
        /// The earliest moment worth trying again, when known.
        retry_after: Option<Duration>,
        /// The underlying failure.
        #[source]
        source: Option<Cause>,
    },

    /// The token endpoint refused the request itself (`invalid_request`, `invalid_scope`,
    /// `unsupported_grant_type`...): a configuration problem. The stored tokens are kept.
    #[error("the token endpoint refused the request (HTTP {status}): {provider}")]
    RequestRejected {
        /// The HTTP status.
        status: u16,
        /// The provider's error code and description.
        provider: ProviderError,
    },

    /// The token endpoint answered with something that could not be understood.
    /// The refresh token that was sent may have been consumed; the stored one is kept.
    #[error("the token endpoint sent an invalid response: {reason}")]
    InvalidResponse {
        /// What was wrong with it (never the body itself).
        reason: String,
    },

    /// The token store failed.
    #[error("the token store failed")]
    Storage(#[source] StoreError),

    /// The source is misconfigured (a bad URL, a missing credential...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Obtaining a grant ([`crate::consent`]) failed: the person declined, the redirect
    /// did not come back or did not match, the code was refused. Nothing was stored;
    /// run the consent again.
    #[error("consent failed: {reason}{}", provider_suffix(.provider))]
    Consent {
        /// What went wrong.
        reason: ConsentFailure,
        /// The provider's error code and description, when it sent one.
        provider: Option<ProviderError>,
    },
}

/// Why obtaining a grant failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsentFailure {
    /// The person (or the server's policy) declined (`access_denied`).
    Denied,
    /// The redirect's `state` did not match the one sent: a forged or stale redirect.
    /// No code was exchanged.
    StateMismatch,
    /// The redirect carried no `state` and the profile says the server echoes it.
    StateMissing,
    /// Nobody completed the consent in time.
    TimedOut,
    /// The authorization server redirected back with an error code other than
    /// `access_denied` (named in `provider`).
    AuthorizationError,
    /// The token endpoint refused the authorization or device code (used, expired, a
    /// redirect URI or PKCE verifier that does not match).
    CodeRejected,
    /// The device code expired before the person approved it (`expired_token`).
    DeviceCodeExpired,
    /// The provider issued no refresh token, so the grant could not be kept alive (Lucid
    /// needs the `offline_access` scope).
    NoRefreshToken,
    /// The input given to the paste flow holds no code, or a redirect for another flow.
    UnusableInput(String),
    /// The loopback listener could not be started (the port is taken...).
    Listener(String),
}

impl fmt::Display for ConsentFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Denied => f.write_str("the authorization was declined"),
            Self::StateMismatch => f.write_str(
                "the redirect's state does not match the one sent (a forged or stale redirect); no code was exchanged",
            ),
            Self::StateMissing => f.write_str(
                "the redirect carries no state although the provider echoes it; no code was exchanged",
            ),
            Self::TimedOut => f.write_str("nobody completed the consent in time"),
            Self::AuthorizationError => {
                f.write_str("the authorization server redirected back with an error")
            }
            Self::CodeRejected => f.write_str(
                "the token endpoint refused the code (used, expired, or a redirect URI or PKCE verifier that does not match)",
            ),
            Self::DeviceCodeExpired => {
                f.write_str("the device code expired before the authorization was approved")
            }
            Self::NoRefreshToken => f.write_str(
                "the provider issued no refresh token, so the grant cannot be kept alive (Lucid needs the offline_access scope)",
            ),
            Self::UnusableInput(why) => write!(f, "the pasted input is unusable: {why}"),
            Self::Listener(why) => write!(f, "the loopback listener could not start: {why}"),
        }
    }
}

impl Error {
    /// True when only a person re-authorizing the application can fix this.
    pub fn needs_reauthorization(&self) -> bool {
        matches!(self, Error::ReauthorizationRequired { .. })
    }

    /// True when waiting and retrying may succeed. A store failure is transient unless an
    /// operator must act (corrupt data, an invalid key, a misconfigured store).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transient { .. } => true,
            Error::Storage(e) => e.is_transient(),
            _ => false,
        }
    }

    /// For [`Error::Transient`]: when to try again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    #[cfg_attr(not(feature = "consent"), allow(dead_code))]
    pub(crate) fn consent(reason: ConsentFailure) -> Self {
        Error::Consent {
            reason,
            provider: None,
        }
    }

    pub(crate) fn transient(kind: TransientKind, retry_after: Option<Duration>) -> Self {
        Error::Transient {
            kind,
            retry_after,
            source: None,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Storage(e)
    }
}

/// Why a grant can no longer be refreshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReauthorizationReason {
    /// The provider rejected the refresh token (`invalid_grant`): expired, revoked or reused.
    RefreshTokenRejected,
    /// The stored refresh token was already rejected earlier; it is kept for diagnosis only.
    PreviouslyRejected,
    /// The store holds no refresh token for the key and none was supplied.
    NoRefreshToken,
    /// The refresh token's own expiry has passed.
    RefreshTokenExpired,
    /// The grant was revoked through this library (`RefreshingTokenSource::revoke`).
    Revoked,
}

impl fmt::Display for ReauthorizationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RefreshTokenRejected => "the provider rejected the refresh token",
            Self::PreviouslyRejected => "the stored refresh token was rejected earlier",
            Self::NoRefreshToken => "no refresh token is stored for this key",
            Self::RefreshTokenExpired => "the refresh token has expired",
            Self::Revoked => "the grant was revoked",
        })
    }
}

/// What kind of transient failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransientKind {
    /// The token endpoint could not be reached.
    Connect,
    /// The token endpoint did not answer in time.
    Timeout,
    /// The token endpoint answered with a server error (5xx).
    ServerError(u16),
    /// The token endpoint is rate limiting (429).
    RateLimited,
    /// An earlier failure is still being backed off from; no request was sent.
    BackingOff,
    /// Another holder kept the store's lease for too long.
    LeaseBusy,
    /// Another holder is presenting the refresh token (its write-ahead record is in the
    /// store) and may still save the rotated one: waiting for it rather than presenting
    /// a token that may already be used.
    RotationInFlight,
    /// The connection broke while the response was read.
    Interrupted,
}

impl fmt::Display for TransientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect => f.write_str("token endpoint unreachable"),
            Self::Timeout => f.write_str("token endpoint timed out"),
            Self::ServerError(status) => write!(f, "token endpoint answered HTTP {status}"),
            Self::RateLimited => f.write_str("rate limited by the token endpoint"),
            Self::BackingOff => f.write_str("backing off after an earlier failure"),
            Self::LeaseBusy => f.write_str("the store's refresh lease is busy"),
            Self::RotationInFlight => {
                f.write_str("another holder is rotating the refresh token; waiting for it")
            }
            Self::Interrupted => f.write_str("connection interrupted"),
        }
    }
}

/// An OAuth error the provider returned: its `error` code and `error_description`
/// (or the provider's equivalents), with any token or secret removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderError {
    /// The error code, such as `invalid_grant`.
    pub code: String,
    /// The human-readable description, when sent.
    pub description: Option<String>,
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code)?;
        if let Some(d) = &self.description {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

fn provider_suffix(provider: &Option<ProviderError>) -> String {
    provider
        .as_ref()
        .map(|p| format!(" ({p})"))
        .unwrap_or_default()
}

impl Error {
    /// The error waiters get when a refresh task panicked.
    pub(crate) fn panicked() -> Self {
        Error::Transient {
            kind: TransientKind::Interrupted,
            retry_after: None,
            source: Some(Arc::new(Panicked)),
        }
    }
}

/// The cause of an [`Error::Transient`] whose refresh task panicked (the panic message is
/// not kept: it is not ours to vouch for).
#[derive(Debug, thiserror::Error)]
#[error("the refresh task panicked")]
pub(crate) struct Panicked;

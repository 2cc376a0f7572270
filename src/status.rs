//! Health and metrics: [`Status`] and [`Metrics`], read by
//! [`RefreshingTokenSource::status`](crate::RefreshingTokenSource::status).

use time::OffsetDateTime;

use crate::error::Error;

/// Counters since the source was built, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Refresh requests that succeeded (each rotated the tokens).
    pub refreshes: u64,
    /// Token sets adopted from the store, refreshed by another task or process: each is
    /// a refresh request, and a possible refresh-token reuse, avoided.
    pub adoptions: u64,
    /// `invalid_grant` answers explained by another writer's rotation and recovered from.
    pub rotations_adopted: u64,
    /// Failures that were transient (provider down, rate limited, store busy).
    pub transient_failures: u64,
    /// Failures that need a person to re-authorize.
    pub reauthorizations_required: u64,
    /// Other failures (rejected client, invalid responses, configuration).
    pub other_failures: u64,
    /// Saves of refreshed tokens that failed (and were retried, holding the lease).
    pub failed_saves: u64,
    /// Flights that failed on the store side (store errors, a busy lease, another
    /// holder's rotation in flight).
    pub store_failures: u64,
    /// Adoptions that followed a save the store's watch reported (part of `adoptions`).
    pub adoptions_by_watch: u64,
    /// Refresh tokens presented after another holder left its write-ahead record on them
    /// for longer than [`Builder::abandoned_rotation_after`](crate::Builder::abandoned_rotation_after).
    pub takeovers: u64,
}

impl Metrics {
    /// Adoptions found by reading the store (when the token turned stale, expired or
    /// was rejected, or while waiting for the lease): `adoptions` less
    /// `adoptions_by_watch`.
    pub fn adoptions_by_read(&self) -> u64 {
        self.adoptions.saturating_sub(self.adoptions_by_watch)
    }

    pub(crate) fn count_failure(&mut self, e: &Error) {
        if e.needs_reauthorization() {
            self.reauthorizations_required += 1;
        } else if e.is_transient() {
            self.transient_failures += 1;
        } else {
            self.other_failures += 1;
        }
    }
}

/// A health snapshot of one grant.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Status {
    /// When the cached access token expires (`None`: no token yet, or unknown expiry).
    pub access_token_expires_at: Option<OffsetDateTime>,
    /// When the refresh token itself expires, when known.
    pub refresh_token_expires_at: Option<OffsetDateTime>,
    /// Time left until a person must re-authorize: zero once the grant is dead, `None`
    /// when the refresh token's lifetime is unknown.
    pub reauthorization_in: Option<std::time::Duration>,
    /// When the last successful refresh request was sent.
    pub last_refresh: Option<OffsetDateTime>,
    /// The last failure, if any.
    pub last_error: Option<Error>,
    /// True while a rotated token set exists only in this process's memory (its save
    /// failed and is being retried, with the store's lease held).
    pub rotation_unsaved: bool,
    /// The newest save of this grant the store's watch reported (its version), and when
    /// (`None`: none yet, or a store that cannot watch).
    pub store_version_heard: Option<(u64, OffsetDateTime)>,
    /// The store version of the token set whose access token is served (`None`: no
    /// token published, or one whose stored version this source does not know). Behind
    /// `store_version_heard` only for the moment a follow takes.
    pub store_version_served: Option<u64>,
    /// Where the grant stands: healthy, cooling down after failures, exhausted, or
    /// needing consent.
    pub health: Health,
    /// Counters.
    pub metrics: Metrics,
}

/// Where a grant stands, from working to needing a person: each failure state costs less
/// than the one before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// No failure since the last success.
    Healthy,
    /// Recent attempts failed (at the provider or the store); the next one waits for a
    /// backoff of a second to a minute (up to 10 minutes while a valid token is served).
    CoolingDown {
        /// Since when the provider has failed this grant (`None`: only the store failed).
        failing_since: Option<OffsetDateTime>,
        /// Until the next attempt is allowed (`None`: now).
        retry_in: Option<std::time::Duration>,
    },
    /// The provider has failed this grant for longer than `exhausted_after`
    /// ([`crate::Builder::exhausted_after`]): attempts are an hour apart, and once the
    /// refresh token's own lifetime has passed, the grant needs consent.
    Exhausted {
        /// Since when the provider has failed this grant.
        failing_since: OffsetDateTime,
        /// Until the next attempt is allowed (`None`: now).
        retry_in: Option<std::time::Duration>,
    },
    /// A person must consent again (see [`Status::last_error`] for why); nothing is sent
    /// to the provider until a new grant is stored.
    NeedsConsent,
}

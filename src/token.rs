//! [`TokenSet`] and the expiry math: absolute instants, freshness, leeway.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::secret::{AccessToken, RefreshToken};

/// The default leeway: a token turns [`Freshness::Stale`] this long before it expires.
pub const DEFAULT_LEEWAY: Duration = Duration::seconds(60);

/// What a store holds for one grant: the tokens and their absolute expiries.
///
/// Only absolute instants are kept, never a relative `expires_in`: a token set reloaded
/// later must not look fresh again. Serializing a `TokenSet` writes the secrets in plain
/// text: that is how stores persist it. `Debug` never shows them.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct TokenSet {
    /// The access token. `None` for a grant imported from a refresh token alone.
    pub access_token: Option<AccessToken>,
    /// The refresh token, when the grant has one.
    pub refresh_token: Option<RefreshToken>,
    /// The token type as the provider spelled it (`bearer`, `Bearer`...).
    pub token_type: Option<String>,
    /// When the access token expires; `None` when unknown (refreshed only on rejection).
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// When the refresh token itself expires, when known.
    #[serde(with = "time::serde::rfc3339::option")]
    pub refresh_expires_at: Option<OffsetDateTime>,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// When the request that produced the access token was sent.
    #[serde(with = "time::serde::rfc3339")]
    pub obtained_at: OffsetDateTime,
    /// Set when the provider rejected `refresh_token` (`invalid_grant`): the set is kept
    /// for diagnosis, and never presented to the provider again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub rejected_at: Option<OffsetDateTime>,
    /// Set when the grant was revoked through this library: the set then holds no token,
    /// and every source sharing the store answers
    /// [`ReauthorizationReason::Revoked`](crate::ReauthorizationReason::Revoked).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub revoked_at: Option<OffsetDateTime>,
    /// Other fields of the provider's response (Lucid's `user_id`, HighQ's `useremail`...).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Set while a holder presents `refresh_token` to the provider: the refresh
    /// protocol's write-ahead record. Another holder that finds it knows the token may
    /// already be consumed by a holder that can still save its successor, and does not
    /// present it (see ARCHITECTURE.md). `None` in every set at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationInFlight>,
}

/// The write-ahead record of a refresh in flight: who presents the refresh token, since
/// when.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotationInFlight {
    /// The presenting source instance (random, one per source).
    pub holder: String,
    /// When it wrote this record, by its clock.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

impl RotationInFlight {
    /// A record for `holder`, written at `since`.
    pub fn new(holder: impl Into<String>, since: OffsetDateTime) -> Self {
        Self {
            holder: holder.into(),
            since,
        }
    }
}

/// A refresh token is rotated by keep-alive once this share of its lifetime is left.
const KEEP_ALIVE_SHARE: i32 = 5;

impl TokenSet {
    /// A token set holding only a refresh token, as imported after a one-time consent.
    pub fn from_refresh_token(refresh_token: RefreshToken, now: OffsetDateTime) -> Self {
        Self {
            refresh_token: Some(refresh_token),
            ..Self::empty(now)
        }
    }

    /// A token set holding an access token, obtained at `obtained_at`.
    pub fn new(access_token: AccessToken, obtained_at: OffsetDateTime) -> Self {
        Self {
            access_token: Some(access_token),
            ..Self::empty(obtained_at)
        }
    }

    /// A set holding nothing yet.
    pub(crate) fn empty(obtained_at: OffsetDateTime) -> Self {
        Self {
            access_token: None,
            refresh_token: None,
            token_type: None,
            expires_at: None,
            refresh_expires_at: None,
            scopes: Vec::new(),
            obtained_at,
            rejected_at: None,
            revoked_at: None,
            extra: serde_json::Map::new(),
            rotation: None,
        }
    }

    /// When the refresh token should be rotated to keep the grant alive: once a fifth of
    /// its lifetime is left (counted from `obtained_at`). A refresh token imported alone
    /// (no access token, no known expiry: it may be older than its import) is due at
    /// once, so that a fleet sweep proves and rotates it. `None` when the expiry is
    /// otherwise unknown, or the set holds no live refresh token (none, rejected,
    /// revoked).
    pub fn keep_alive_at(&self) -> Option<OffsetDateTime> {
        if self.refresh_token.is_none() || self.rejected_at.is_some() || self.revoked_at.is_some() {
            return None;
        }
        if self.access_token.is_none() && self.refresh_expires_at.is_none() {
            return Some(self.obtained_at);
        }
        let expires = self.refresh_expires_at?;
        let lifetime = (expires - self.obtained_at).max(Duration::ZERO);
        expires.checked_sub(lifetime / KEEP_ALIVE_SHARE)
    }

    /// The instant from which the access token is [`Freshness::Stale`], with `leeway`
    /// clamped to half the token's lifetime (a 10 s token is not refreshed on every call).
    /// `None` when the expiry is unknown.
    pub fn stale_at(&self, leeway: Duration) -> Option<OffsetDateTime> {
        let expires_at = self.expires_at?;
        let lifetime = (expires_at - self.obtained_at).max(Duration::ZERO);
        Some(expires_at - leeway.min(lifetime / 2))
    }

    /// How usable the access token is at `now`.
    pub fn freshness(&self, now: OffsetDateTime, leeway: Duration) -> Freshness {
        if self.access_token.is_none() {
            return Freshness::Expired;
        }
        match (self.expires_at, self.stale_at(leeway)) {
            (Some(expires_at), _) if now >= expires_at => Freshness::Expired,
            (_, Some(stale_at)) if now >= stale_at => Freshness::Stale,
            _ => Freshness::Fresh,
        }
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &self.access_token)
            .field("refresh_token", &self.refresh_token)
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("scopes", &self.scopes)
            .field("obtained_at", &self.obtained_at)
            .field("rejected_at", &self.rejected_at)
            .field("revoked_at", &self.revoked_at)
            // Extra fields may hold an id_token or other credentials: names only.
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .field("rotation", &self.rotation)
            .finish()
    }
}

/// How usable an access token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Valid and not yet within the leeway of its expiry.
    Fresh,
    /// Still valid, but within the leeway: served while one refresh runs in the background.
    Stale,
    /// Past its expiry, or absent.
    Expired,
}

/// The expiry facts of one token response, before they become absolute instants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpiryFields {
    /// Relative lifetime in seconds (`expires_in`).
    pub expires_in: Option<i64>,
    /// Absolute expiry in epoch milliseconds (Lucid's `expires`).
    pub expires_at_ms: Option<i64>,
}

/// How far two expiries may disagree before a clock-skew warning.
const SKEW_WARNING: Duration = Duration::minutes(1);

/// Turns a response's expiry fields into an absolute instant.
///
/// `expires_in` is anchored at `sent_at`, the instant the request was sent (conservative).
/// Both present: the earlier wins. Neither: `default_lifetime`, else unknown. An expiry
/// that is not after `sent_at` is a clock problem, not a reason to refresh in a loop: it is
/// ignored with a warning.
pub fn absolute_expiry(
    fields: ExpiryFields,
    sent_at: OffsetDateTime,
    default_lifetime: Option<Duration>,
) -> Option<OffsetDateTime> {
    let relative = fields
        .expires_in
        .filter(|s| *s > 0)
        .map(|s| add_clamped(sent_at, Duration::seconds(s)));
    let absolute = fields
        .expires_at_ms
        .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .map(|at| at.min(add_clamped(sent_at, MAX_LIFETIME)));
    let absolute = match absolute {
        Some(at) if at <= sent_at => {
            tracing::warn!(
                expires_at = %at,
                sent_at = %sent_at,
                "the provider's absolute expiry is already past: clock skew? ignoring it"
            );
            None
        }
        other => other,
    };
    match (relative, absolute) {
        (Some(r), Some(a)) => {
            if (r - a).abs() > SKEW_WARNING {
                tracing::warn!(
                    from_expires_in = %r,
                    from_expires = %a,
                    "expires_in and expires disagree by more than a minute: clock skew? using the earlier"
                );
            }
            Some(r.min(a))
        }
        (Some(r), None) => Some(r),
        (None, Some(a)) => Some(a),
        (None, None) => default_lifetime.map(|l| add_clamped(sent_at, l)),
    }
}

/// The longest lifetime taken from a provider: longer ones are cut to this, so that
/// absurd values (`expires_in` near `i64::MAX`) never overflow the date arithmetic.
pub(crate) const MAX_LIFETIME: Duration = Duration::days(3650);

/// `at + lifetime`, with `lifetime` clamped to `0..=MAX_LIFETIME`: never panics.
pub(crate) fn add_clamped(at: OffsetDateTime, lifetime: Duration) -> OffsetDateTime {
    let lifetime = lifetime.clamp(Duration::ZERO, MAX_LIFETIME);
    at.checked_add(lifetime).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 0:00 UTC);

    fn set_expiring(lifetime: Duration) -> TokenSet {
        let mut set = TokenSet::new(AccessToken::new("a"), T0);
        set.expires_at = Some(T0 + lifetime);
        set
    }

    #[test]
    fn expires_in_is_anchored_at_the_send_instant() {
        let fields = ExpiryFields {
            expires_in: Some(3600),
            expires_at_ms: None,
        };
        assert_eq!(
            absolute_expiry(fields, T0, None),
            Some(T0 + Duration::hours(1))
        );
    }

    #[test]
    fn expires_is_epoch_milliseconds() {
        let at = T0 + Duration::minutes(30);
        let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap();
        let fields = ExpiryFields {
            expires_in: None,
            expires_at_ms: Some(ms),
        };
        assert_eq!(absolute_expiry(fields, T0, None), Some(at));
    }

    #[test]
    fn both_present_and_disagreeing_takes_the_earlier() {
        let earlier = T0 + Duration::minutes(10);
        let ms = i64::try_from(earlier.unix_timestamp_nanos() / 1_000_000).unwrap();
        let fields = ExpiryFields {
            expires_in: Some(3600),
            expires_at_ms: Some(ms),
        };
        assert_eq!(absolute_expiry(fields, T0, None), Some(earlier));
        let later_ms = ms + 7_200_000;
        let fields = ExpiryFields {
            expires_in: Some(3600),
            expires_at_ms: Some(later_ms),
        };
        assert_eq!(
            absolute_expiry(fields, T0, None),
            Some(T0 + Duration::hours(1))
        );
    }

    #[test]
    fn neither_uses_the_profile_default_else_unknown() {
        let none = ExpiryFields::default();
        assert_eq!(
            absolute_expiry(none, T0, Some(Duration::hours(5))),
            Some(T0 + Duration::hours(5))
        );
        assert_eq!(absolute_expiry(none, T0, None), None);
    }

    #[test]
    fn an_expiry_already_past_is_ignored_not_looped_on() {
        let past_ms =
            i64::try_from((T0 - Duration::hours(1)).unix_timestamp_nanos() / 1_000_000).unwrap();
        let fields = ExpiryFields {
            expires_in: None,
            expires_at_ms: Some(past_ms),
        };
        assert_eq!(absolute_expiry(fields, T0, None), None);
        let fields = ExpiryFields {
            expires_in: Some(600),
            expires_at_ms: Some(past_ms),
        };
        assert_eq!(
            absolute_expiry(fields, T0, None),
            Some(T0 + Duration::minutes(10))
        );
    }

    #[test]
    fn absurd_lifetimes_are_clamped_not_overflowed() {
        for expires_in in [i64::MAX, i64::MAX - 1, 1 << 62] {
            let fields = ExpiryFields {
                expires_in: Some(expires_in),
                expires_at_ms: Some(i64::MAX),
            };
            let at = absolute_expiry(fields, T0, None).unwrap();
            assert_eq!(at, T0 + MAX_LIFETIME);
        }
        let fields = ExpiryFields {
            expires_in: None,
            expires_at_ms: Some(i64::MIN),
        };
        assert_eq!(absolute_expiry(fields, T0, None), None);
        // An absolute expiry in the year 9036 is representable, and cut to ten years.
        let fields = ExpiryFields {
            expires_in: None,
            expires_at_ms: Some(223_000_000_000_000),
        };
        assert_eq!(absolute_expiry(fields, T0, None), Some(T0 + MAX_LIFETIME));
        let late = OffsetDateTime::new_utc(
            time::Date::from_calendar_date(9999, time::Month::December, 31).unwrap(),
            time::Time::MIDNIGHT,
        );
        let fields = ExpiryFields {
            expires_in: Some(i64::MAX),
            expires_at_ms: None,
        };
        assert_eq!(
            absolute_expiry(fields, late, Some(Duration::MAX)),
            Some(late)
        );
    }

    #[test]
    fn freshness_moves_fresh_stale_expired() {
        let set = set_expiring(Duration::hours(1));
        let at = |d: Duration| set.freshness(T0 + d, DEFAULT_LEEWAY);
        assert_eq!(at(Duration::minutes(58)), Freshness::Fresh);
        assert_eq!(at(Duration::seconds(3541)), Freshness::Stale);
        assert_eq!(at(Duration::hours(1)), Freshness::Expired);
    }

    #[test]
    fn a_ten_second_token_with_sixty_second_leeway_is_fresh_for_half_its_life() {
        let set = set_expiring(Duration::seconds(10));
        assert_eq!(
            set.freshness(T0 + Duration::seconds(4), DEFAULT_LEEWAY),
            Freshness::Fresh
        );
        assert_eq!(
            set.freshness(T0 + Duration::seconds(6), DEFAULT_LEEWAY),
            Freshness::Stale
        );
    }

    #[test]
    fn unknown_expiry_is_fresh_and_a_missing_access_token_is_expired() {
        let set = TokenSet::new(AccessToken::new("a"), T0);
        assert_eq!(
            set.freshness(T0 + Duration::days(400), DEFAULT_LEEWAY),
            Freshness::Fresh
        );
        let seed = TokenSet::from_refresh_token(RefreshToken::new("r"), T0);
        assert_eq!(seed.freshness(T0, DEFAULT_LEEWAY), Freshness::Expired);
    }
}

//! Spacing of attempts after failures, on the clock's monotonic reading (a wall-clock
//! step neither stretches nor shortens a wait).
//!
//! Two independent schedules, because their causes are independent:
//!
//! - [`Backoff`]: the provider failed (5xx, 429, timeouts, unreadable answers). Full-jitter
//!   exponential steps from 1 s to 10 minutes while a valid token is served, at most
//!   60 s once callers wait with an expired one, never less than the provider's
//!   `Retry-After` (itself capped at an hour).
//! - [`StoreSpacing`]: the store failed, the lease was busy, or another holder's rotation
//!   is in flight. Short steps (100 ms doubling to 500 ms), so that callers are served
//!   again within about a second of the store's recovery. A store failure never starts
//!   the provider's backoff.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

use crate::error::{Error, TransientKind};
use crate::store::StoreError;

/// The shortest provider backoff step: at most one request per second, whatever callers do.
pub(crate) const MIN_RETRY: Duration = Duration::from_secs(1);
/// The longest provider backoff step while a valid token is still served.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(600);
/// The longest step once callers wait with an expired token (or none): one request a
/// minute per key is no load, and recovery after a long outage is quick.
pub(crate) const MAX_RETRY_EXPIRED: Duration = Duration::from_secs(60);
/// The longest `Retry-After` honoured.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Backoff after provider failures.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    caps: Option<ExponentialBackoff>,
    not_before: Option<Instant>,
    last_kind: Option<TransientKind>,
}

impl Backoff {
    /// Records a provider failure at `now` and returns the wait before the next attempt:
    /// a full-jitter step (anywhere between [`MIN_RETRY`] and the exponential cap), no
    /// later than `valid_for` (a still-valid token gets one more try before it dies), at
    /// most [`MAX_RETRY_EXPIRED`] when no valid token is left, and never less than the
    /// provider's `retry_after`.
    pub(crate) fn failed(
        &mut self,
        now: Instant,
        error: &Error,
        valid_for: Option<Duration>,
    ) -> Duration {
        let cap = self
            .caps
            .get_or_insert_with(caps)
            .next()
            .unwrap_or(MAX_RETRY);
        let mut step = MIN_RETRY + cap.saturating_sub(MIN_RETRY).mul_f64(fastrand::f64());
        match valid_for.filter(|left| !left.is_zero()) {
            Some(left) => step = step.min(left.max(MIN_RETRY)),
            None => step = step.min(MAX_RETRY_EXPIRED),
        }
        let wait = match error.retry_after() {
            Some(asked) => asked.min(MAX_RETRY_AFTER).max(step),
            None => step,
        };
        self.not_before = Some(after(now, wait));
        self.last_kind = Some(match error {
            Error::Transient { kind, .. } => *kind,
            _ => TransientKind::BackingOff,
        });
        wait
    }

    /// How long until the next attempt is allowed.
    pub(crate) fn wait(&self, now: Instant) -> Option<Duration> {
        self.not_before
            .map(|at| at.saturating_duration_since(now))
            .filter(|w| !w.is_zero())
    }

    /// Makes the next attempt wait at least `wait` from `now`; returns the whole wait.
    pub(crate) fn at_least(&mut self, now: Instant, wait: Duration) -> Duration {
        let until = after(now, wait);
        let until = self.not_before.map_or(until, |at| at.max(until));
        self.not_before = Some(until);
        until.saturating_duration_since(now)
    }

    pub(crate) fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// True when no failure is being backed off from.
    pub(crate) fn is_idle(&self) -> bool {
        self.caps.is_none() && self.not_before.is_none()
    }

    /// The error to answer while backing off, if an attempt now would be too early.
    pub(crate) fn too_early(&self, now: Instant) -> Option<Error> {
        let wait = self.wait(now)?;
        Some(Error::transient(
            self.last_kind.unwrap_or(TransientKind::BackingOff),
            Some(wait),
        ))
    }
}

/// The exponential caps: 1 s doubling to 10 minutes (jitter is applied by the user).
pub(crate) fn caps() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(MIN_RETRY)
        .with_max_delay(MAX_RETRY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// The first store retry step.
pub(crate) const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest store retry step.
pub(crate) const STORE_RETRY_MAX: Duration = Duration::from_millis(500);

/// Spacing after store failures (and busy leases, and rotations in flight elsewhere).
#[derive(Debug, Default)]
pub(crate) struct StoreSpacing {
    failures: u32,
    not_before: Option<Instant>,
    last: Option<Error>,
}

impl StoreSpacing {
    /// Records a failure at `now`; returns the wait before the next attempt.
    pub(crate) fn failed(&mut self, now: Instant, error: &Error) -> Duration {
        let wait = store_step(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(after(now, wait));
        self.last = Some(error.clone());
        wait
    }

    pub(crate) fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// How long until the next attempt is allowed.
    pub(crate) fn wait(&self, now: Instant) -> Option<Duration> {
        self.not_before
            .map(|at| at.saturating_duration_since(now))
            .filter(|w| !w.is_zero())
    }

    /// The last store error, while an attempt now would be too early.
    pub(crate) fn too_early(&self, now: Instant) -> Option<Error> {
        let wait = self.not_before?.saturating_duration_since(now);
        if wait.is_zero() {
            return None;
        }
        Some(match self.last.clone() {
            Some(Error::Transient { kind, source, .. }) => Error::Transient {
                kind,
                retry_after: Some(wait),
                source,
            },
            Some(other) => other,
            None => Error::Storage(StoreError::Timeout(wait)),
        })
    }
}

/// The `failures`-th store retry step: 100 ms doubling to 500 ms, with jitter (50-100%).
pub(crate) fn store_step(failures: u32) -> Duration {
    let cap = STORE_RETRY_MIN
        .saturating_mul(1u32 << failures.min(8))
        .min(STORE_RETRY_MAX);
    cap.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// `now + wait`, clamped: never panics.
pub(crate) fn after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(MAX_RETRY_AFTER)).unwrap_or(now)
}

/// Whether an error came from the store side (the store, its lease, another holder's
/// rotation, a panicked task) rather than from the provider: those are spaced briefly and
/// never start the provider's backoff.
pub(crate) fn is_store_side(e: &Error) -> bool {
    match e {
        Error::Storage(_) => true,
        Error::Transient {
            kind: TransientKind::LeaseBusy | TransientKind::RotationInFlight,
            ..
        } => true,
        Error::Transient {
            kind: TransientKind::Interrupted,
            source: Some(source),
            ..
        } => source.is::<crate::error::Panicked>(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_retry_after_is_capped_at_an_hour_and_never_panics() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        let error = Error::transient(
            TransientKind::RateLimited,
            Some(Duration::from_secs(1_000_000_000_000)),
        );
        let wait = backoff.failed(now, &error, Some(Duration::MAX));
        assert_eq!(wait, MAX_RETRY_AFTER);
        let error = Error::transient(TransientKind::RateLimited, Some(Duration::MAX));
        assert_eq!(backoff.failed(now, &error, None), MAX_RETRY_AFTER);
    }

    #[test]
    fn with_no_valid_token_left_steps_are_at_most_a_minute() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        let error = Error::transient(TransientKind::ServerError(503), None);
        for _ in 0..40 {
            let wait = backoff.failed(now, &error, None);
            assert!(wait <= MAX_RETRY_EXPIRED, "{wait:?}");
            assert!(wait >= MIN_RETRY, "{wait:?}");
        }
        // While a valid token is served the steps may grow past a minute.
        let longest = (0..40)
            .map(|_| backoff.failed(now, &error, Some(Duration::from_secs(86_400))))
            .max()
            .unwrap();
        assert!(longest > MAX_RETRY_EXPIRED, "{longest:?}");
    }

    #[test]
    fn store_steps_grow_from_100_ms_to_half_a_second() {
        assert!(store_step(0) <= STORE_RETRY_MIN);
        assert!(store_step(0) >= STORE_RETRY_MIN / 2);
        for failures in [4, 10, 1000, u32::MAX] {
            let step = store_step(failures);
            assert!(
                step <= STORE_RETRY_MAX && step >= STORE_RETRY_MAX / 2,
                "{step:?}"
            );
        }
    }
}

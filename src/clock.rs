//! Wall-clock time, injectable so that tests never sleep through real token lifetimes.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::{Duration, OffsetDateTime};

/// A source of the current UTC time.
///
/// Expiries are absolute instants compared with this clock. Implementations must be cheap:
/// [`TokenSource::access_token`](crate::TokenSource::access_token) reads the monotonic
/// clock once per call, and the wall clock at least every 10 s of monotonic time (or when
/// the token nears its stale point): a wall clock stepped forward, or a monotonic clock
/// that stood still while the machine slept, is noticed within that window.
pub trait Clock: Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> OffsetDateTime;

    /// A monotonic reading, for the hot path's freshness check and for spacing retries
    /// and rate limits: a step of the wall clock (NTP) never stretches or shortens a
    /// wait. Default: tokio's clock, which tests can pause.
    fn monotonic(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
}

/// The operating system's clock. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that moves only when told to. Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper::{Clock, ManualClock};
/// use tokenkeeper::time::macros::datetime;
///
/// let clock = ManualClock::new(datetime!(2026-01-01 0:00 UTC));
/// clock.advance(Duration::from_secs(2 * 3600));
/// assert_eq!(clock.now().hour(), 2);
/// ```
///
/// Its [`Clock::monotonic`] reading moves with [`ManualClock::advance`] by a positive
/// duration and stands still for [`ManualClock::set`] and negative advances: those are
/// steps of the wall clock.
#[derive(Clone, Debug)]
pub struct ManualClock {
    nanos: Arc<AtomicI64>,
    /// Nanoseconds the monotonic reading has moved since `base`.
    monotonic_nanos: Arc<AtomicI64>,
    base: tokio::time::Instant,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            nanos: Arc::new(AtomicI64::new(to_nanos(start))),
            monotonic_nanos: Arc::new(AtomicI64::new(0)),
            base: tokio::time::Instant::now(),
        }
    }

    /// A clock standing at the system's current time.
    pub fn starting_now() -> Self {
        Self::new(OffsetDateTime::now_utc())
    }

    /// Moves the clock forward by a `std::time::Duration`, or by a `time::Duration`, which
    /// may be negative: a wall-clock step back that the monotonic reading ignores.
    pub fn advance(&self, by: impl ClockStep) {
        let by = by.signed_nanos();
        let add = |cell: &AtomicI64, by: i64| {
            let _ = cell.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(by))
            });
        };
        add(&self.nanos, by);
        if by > 0 {
            add(&self.monotonic_nanos, by);
        }
    }

    /// Sets the clock to `at`: a wall-clock step that the monotonic reading ignores.
    pub fn set(&self, at: OffsetDateTime) {
        self.nanos.store(to_nanos(at), Ordering::SeqCst);
    }
}

/// A step for [`ManualClock::advance`]: a `std::time::Duration` (forward) or a
/// `time::Duration` (either way). Sealed.
pub trait ClockStep: sealed::Sealed {
    /// The step in nanoseconds, saturated.
    fn signed_nanos(&self) -> i64;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::time::Duration {}
    impl Sealed for time::Duration {}
}

impl ClockStep for std::time::Duration {
    fn signed_nanos(&self) -> i64 {
        i64::try_from(self.as_nanos()).unwrap_or(i64::MAX)
    }
}

impl ClockStep for Duration {
    fn signed_nanos(&self) -> i64 {
        i64::try_from(self.whole_nanoseconds()).unwrap_or(if self.is_negative() {
            i64::MIN
        } else {
            i64::MAX
        })
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.nanos.load(Ordering::SeqCst)))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    fn monotonic(&self) -> tokio::time::Instant {
        let moved = std::time::Duration::from_nanos(
            u64::try_from(self.monotonic_nanos.load(Ordering::SeqCst)).unwrap_or(0),
        );
        self.base.checked_add(moved).unwrap_or(self.base)
    }
}

/// A clock that follows tokio's clock from the moment it is created: under
/// `tokio::time::pause()` it advances exactly as far as tokio's paused time does, so
/// backoff sleeps and token expiries stay consistent in simulated-time tests.
#[derive(Clone, Debug)]
pub struct TokioClock {
    base_wall: OffsetDateTime,
    base: tokio::time::Instant,
}

impl TokioClock {
    /// Anchors the clock: `now()` is the current wall time plus tokio's elapsed time since.
    pub fn new() -> Self {
        Self {
            base_wall: OffsetDateTime::now_utc(),
            base: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> OffsetDateTime {
        self.base_wall + self.base.elapsed()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> OffsetDateTime {
        (**self).now()
    }

    fn monotonic(&self) -> tokio::time::Instant {
        (**self).monotonic()
    }
}

/// Nanoseconds since 1970, clamped to what an `i64` holds (years 1677 to 2262).
fn to_nanos(at: OffsetDateTime) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

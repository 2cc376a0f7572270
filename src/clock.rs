//! Wall-clock time, injectable so that tests never sleep through real token lifetimes.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::{Duration, OffsetDateTime};

/// A source of the current UTC time.
///
/// Expiries are absolute instants compared with this clock. Implementations must be cheap:
/// [`TokenSource::access_token`](crate::TokenSource::access_token) reads the clock once per call.
pub trait Clock: Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> OffsetDateTime;
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
/// use tokenkeeper::{Clock, ManualClock};
/// let clock = ManualClock::new(time::macros::datetime!(2026-01-01 0:00 UTC));
/// clock.advance(time::Duration::hours(2));
/// assert_eq!(clock.now().hour(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    nanos: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            nanos: Arc::new(AtomicI64::new(to_nanos(start))),
        }
    }

    /// A clock standing at the system's current time.
    pub fn starting_now() -> Self {
        Self::new(OffsetDateTime::now_utc())
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.whole_nanoseconds()).unwrap_or(i64::MAX);
        self.nanos.fetch_add(by, Ordering::SeqCst);
    }

    /// Sets the clock to `at`.
    pub fn set(&self, at: OffsetDateTime) {
        self.nanos.store(to_nanos(at), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.nanos.load(Ordering::SeqCst)))
            .expect("a ManualClock stays within i64 nanoseconds of 1970")
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
}

fn to_nanos(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos()).expect("time within i64 nanoseconds of 1970")
}

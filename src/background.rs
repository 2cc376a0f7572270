//! Running forever: the background refresher, refresh-token keep-alive, and `status()`
//! for health checks.

use std::sync::{Arc, Weak};
use std::time::Duration as StdDuration;

use time::{Duration, OffsetDateTime};

use crate::error::Error;
use crate::refresh::{Inner, Reason, RefreshingTokenSource};

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
    /// Saves of refreshed tokens that failed (and were retried).
    pub failed_saves: u64,
}

impl Metrics {
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
    pub reauthorization_in: Option<Duration>,
    /// When the last successful refresh request was sent.
    pub last_refresh: Option<OffsetDateTime>,
    /// The last failure, if any.
    pub last_error: Option<Error>,
    /// Counters.
    pub metrics: Metrics,
}

/// A running background task of a source. It ends by itself when the source (every
/// clone) is dropped; [`BackgroundTask::stop`] ends it earlier. Dropping the handle
/// leaves the task running.
#[derive(Debug)]
pub struct BackgroundTask {
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundTask {
    /// Stops the task.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The longest a background task sleeps before looking again (clock jumps, suspend).
const MAX_SLEEP: StdDuration = StdDuration::from_secs(3600);
/// The shortest, so that a failing refresh never spins.
const MIN_SLEEP: StdDuration = StdDuration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Duty {
    /// Keep the access token fresh, and the refresh token alive.
    Refresher,
    /// Keep the refresh token alive only.
    KeepAlive,
}

impl RefreshingTokenSource {
    /// A health snapshot: expiries, time left before re-authorization, last refresh,
    /// last error, counters.
    pub fn status(&self) -> Status {
        let inner = &self.inner;
        let cached = inner.cache.load_full();
        let state = inner.state();
        let refresh_token_expires_at = cached.as_ref().and_then(|c| c.refresh_expires_at);
        let dead = state
            .last_error
            .as_ref()
            .is_some_and(Error::needs_reauthorization);
        let reauthorization_in = if dead {
            Some(Duration::ZERO)
        } else {
            refresh_token_expires_at.map(|at| (at - inner.clock.now()).max(Duration::ZERO))
        };
        Status {
            access_token_expires_at: cached.as_ref().and_then(|c| c.expires_at),
            refresh_token_expires_at,
            reauthorization_in,
            last_refresh: state.last_refresh,
            last_error: state.last_error.clone(),
            metrics: state.metrics,
        }
    }

    /// Rotates the refresh token if it nears its own expiry (a fifth of its lifetime
    /// left), even though nobody asked for a token: an idle application never needs
    /// re-consent. [`spawn_keep_alive`](Self::spawn_keep_alive) calls this on schedule.
    pub async fn keep_alive(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let cached = inner.cache.load_full();
        let due = match &cached {
            Some(c) => c.keep_alive_at.is_some_and(|at| inner.clock.now() >= at),
            // Nothing loaded yet: the protocol adopts the stored set unless it needs a
            // refresh for its own sake.
            None => true,
        };
        if due {
            inner.refresh_now(Reason::KeepAlive).await?;
        }
        Ok(())
    }

    /// Starts a task that refreshes each access token when it turns stale (at a
    /// per-instance jittered point of the stale window), so callers never wait, and keeps
    /// the refresh token alive. Needs a tokio runtime.
    pub fn spawn_refresher(&self) -> BackgroundTask {
        self.spawn(Duty::Refresher)
    }

    /// Starts a task that only keeps the refresh token alive (see
    /// [`keep_alive`](Self::keep_alive)): one refresh per refresh-token lifetime, however
    /// idle the application. Needs a tokio runtime.
    pub fn spawn_keep_alive(&self) -> BackgroundTask {
        self.spawn(Duty::KeepAlive)
    }

    fn spawn(&self, duty: Duty) -> BackgroundTask {
        let weak = Arc::downgrade(&self.inner);
        let jitter = fastrand::f64();
        BackgroundTask {
            task: tokio::spawn(run(weak, duty, jitter)),
        }
    }
}

async fn run(weak: Weak<Inner>, duty: Duty, jitter: f64) {
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let source = RefreshingTokenSource { inner };
        let outcome = match duty {
            Duty::Refresher => refresh_if_stale(&source).await,
            Duty::KeepAlive => Ok(()),
        };
        let outcome = match outcome {
            Ok(()) => source.keep_alive().await,
            Err(e) => Err(e),
        };
        let wait = match outcome {
            Err(e) => {
                tracing::warn!(key = %source.inner.key, error = %e, "background refresh failed");
                e.retry_after().unwrap_or(StdDuration::from_secs(60))
            }
            Ok(()) => next_wake(&source, duty, jitter),
        };
        drop(source);
        tokio::time::sleep(wait.clamp(MIN_SLEEP, MAX_SLEEP)).await;
    }
}

async fn refresh_if_stale(source: &RefreshingTokenSource) -> Result<(), Error> {
    source.access_token().await?;
    let inner = &source.inner;
    let stale = inner
        .cache
        .load()
        .as_ref()
        .is_some_and(|c| c.stale_at.is_some_and(|at| inner.clock.now() >= at));
    if stale {
        inner.refresh_now(Reason::AccessToken).await?;
    }
    Ok(())
}

/// When to look again: the jittered point of the next stale window, or the keep-alive
/// instant, whichever comes first.
fn next_wake(source: &RefreshingTokenSource, duty: Duty, jitter: f64) -> StdDuration {
    let inner = &source.inner;
    let now = inner.clock.now();
    let Some(cached) = inner.cache.load_full() else {
        return MAX_SLEEP;
    };
    let refresh_at = match (duty, cached.stale_at, cached.expires_at) {
        (Duty::Refresher, Some(stale), Some(expires)) => {
            Some(stale + (expires - stale) * (jitter / 2.0))
        }
        (Duty::Refresher, Some(stale), None) => Some(stale),
        _ => None,
    };
    let wake = match (refresh_at, cached.keep_alive_at) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(now + MAX_SLEEP),
    };
    (wake - now).try_into().unwrap_or(StdDuration::ZERO)
}

//! Running forever: the background refresher and refresh-token keep-alive.

use std::sync::{Arc, Weak};
use std::time::Duration as StdDuration;

use crate::engine::{Engine, Reason};
use crate::error::Error;
use crate::refresh::RefreshingTokenSource;

/// A running background task of a source. It ends by itself when the source (every
/// clone) is dropped; [`BackgroundTask::stop`] ends it earlier. Dropping the handle
/// leaves the task running.
#[derive(Debug)]
pub struct BackgroundTask {
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundTask {
    #[cfg_attr(not(feature = "manager"), allow(dead_code))]
    pub(crate) fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self { task }
    }

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
    /// Rotates the refresh token if it nears its own expiry (a fifth of its lifetime
    /// left), even though nobody asked for a token: an idle application never needs
    /// re-consent. [`spawn_keep_alive`](Self::spawn_keep_alive) calls this on schedule.
    pub async fn keep_alive(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let cached = inner.cache.load_full();
        let due = match &cached {
            Some(c) => c
                .keep_alive_at
                .is_some_and(|at| inner.config.clock.now() >= at),
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

async fn run(weak: Weak<Engine>, duty: Duty, jitter: f64) {
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
                // A store fault is retried within a second or so; anything else as the
                // error says, or in a minute.
                let default = if crate::retry::is_store_side(&e) {
                    StdDuration::from_secs(1)
                } else {
                    StdDuration::from_secs(60)
                };
                e.retry_after().unwrap_or(default)
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
        .is_some_and(|c| c.stale_at.is_some_and(|at| inner.config.clock.now() >= at));
    if stale {
        inner.refresh_now(Reason::AccessToken).await?;
    }
    Ok(())
}

/// When to look again: the jittered point of the next stale window, or the keep-alive
/// instant, whichever comes first.
fn next_wake(source: &RefreshingTokenSource, duty: Duty, jitter: f64) -> StdDuration {
    let inner = &source.inner;
    let now = inner.config.clock.now();
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

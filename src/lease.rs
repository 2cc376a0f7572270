//! [`HeldLease`]: a store lease as the refresh protocol holds it. Every store call made
//! under it is bounded by a timeout, and the lease is renewed while work runs under it,
//! so that a holder keeps the key locked for as long as it needs: through a slow token
//! request, and through the retries of a save that failed after the provider rotated.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, TransientKind};
use crate::store::{Lease, StoreError, TokenStore, deadline_after};

/// A held lease on one key, with the store it came from.
#[derive(Debug)]
pub(crate) struct HeldLease {
    store: Arc<dyn TokenStore>,
    key: String,
    lease: Lease,
    ttl: Duration,
    timeout: Duration,
    /// False once the store said it cannot renew: the first ttl is all there is.
    renewable: AtomicBool,
    /// The store refused a write or a renewal for this lease: another holder may have it.
    lost: AtomicBool,
    /// When the lease was last granted or renewed.
    renewed_at: std::sync::Mutex<Instant>,
}

/// Runs one store call with a timeout: a call that does not answer in time has an
/// unknown outcome, exactly like one whose connection was cut.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)))
}

impl HeldLease {
    /// Takes the lease on `key`: waits up to about `ttl` for a holder to release, and
    /// `timeout` more for the store to answer.
    pub(crate) async fn acquire(
        store: &Arc<dyn TokenStore>,
        key: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let lease = bounded(ttl.saturating_add(timeout), store.lease(key, ttl)).await?;
        Ok(Self {
            store: Arc::clone(store),
            key: key.to_owned(),
            lease,
            ttl,
            timeout,
            renewable: AtomicBool::new(true),
            lost: AtomicBool::new(false),
            renewed_at: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// The store's lease, for `save`.
    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether the lease expires (Memory, Redis, PostgreSQL) rather than lasting as long
    /// as its holder (an OS file lock).
    pub(crate) fn expires(&self) -> bool {
        self.lease.expires_at().is_some()
    }

    /// Whether the lease is known to be gone: refused by the store, or past its expiry.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst) || self.lease.remaining() == Some(Duration::ZERO)
    }

    /// How long the lease still holds; `None` when it does not expire.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        if self.lost.load(Ordering::SeqCst) {
            return Some(Duration::ZERO);
        }
        self.lease.remaining()
    }

    /// Whether the lease still holds for longer than `needed` (renewing it first if it
    /// does not). Leases that never expire always do.
    pub(crate) async fn outlasts(&self, needed: Duration) -> bool {
        if self.remaining().is_some_and(|left| left <= needed) {
            self.renew().await;
        }
        !self.is_lost() && self.remaining().is_none_or(|left| left > needed)
    }

    /// Records what a store call under the lease said about it.
    fn observe(&self, error: &StoreError) {
        if matches!(error, StoreError::LeaseLost) {
            self.lost.store(true, Ordering::SeqCst);
        }
    }

    /// One store call under the lease: bounded by the timeout, with the lease renewed
    /// while it runs.
    pub(crate) async fn op<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = self.during(bounded(self.timeout, call)).await;
        if let Err(e) = &result {
            self.observe(e);
        }
        result
    }

    /// Extends the lease to a full ttl from now (when the store can). A failed renewal
    /// other than [`StoreError::LeaseLost`] leaves the lease as it was.
    pub(crate) async fn renew(&self) {
        if !self.expires()
            || !self.renewable.load(Ordering::SeqCst)
            || self.lost.load(Ordering::SeqCst)
        {
            return;
        }
        let asked_at = Instant::now();
        match bounded(
            self.timeout,
            self.store.renew(&self.key, &self.lease, self.ttl),
        )
        .await
        {
            Ok(()) => {
                *self.renewed_at.lock().unwrap_or_else(|e| e.into_inner()) = asked_at;
            }
            Err(StoreError::Unsupported(_)) => {
                tracing::debug!(key = %self.key, "the store cannot renew leases; relying on the first ttl");
                self.renewable.store(false, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::debug!(key = %self.key, error = %e, "renewing the store lease failed");
                self.observe(&e);
            }
        }
    }

    /// Runs `work` (never cancelling it) while renewing the lease every third of its ttl.
    pub(crate) async fn during<T>(&self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            if !self.expires() || !self.renewable.load(Ordering::SeqCst) || self.is_lost() {
                return work.await;
            }
            let last = *self.renewed_at.lock().unwrap_or_else(|e| e.into_inner());
            let next = last
                .checked_add(self.ttl / 3)
                .unwrap_or_else(|| deadline_after(self.ttl / 3));
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = async {
                    tokio::time::sleep_until(next).await;
                    self.renew().await;
                    // A renewal that failed is retried soon, not a third of a ttl later.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } => {}
            }
        }
    }

    /// Gives the lease back (best effort: an unanswered release expires by itself).
    pub(crate) async fn release(self) {
        let key = self.key;
        match bounded(self.timeout, self.lease.release()).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "could not release the store lease; it will expire")
            }
        }
    }
}

/// A store lease failure as the caller sees it: a busy lease is transient and says so.
pub(crate) fn lease_error(e: StoreError) -> Error {
    match e {
        StoreError::LeaseTimeout { .. } => Error::Transient {
            kind: TransientKind::LeaseBusy,
            retry_after: None,
            source: Some(std::sync::Arc::new(e)),
        },
        e => Error::Storage(e),
    }
}

//! [`FaultyStore`]: a store wrapper that injects faults into store calls, for testing
//! what the refresh protocol does when its store misbehaves.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::store::{Lease, StoreError, TokenStore, Versioned};
use crate::token::TokenSet;

/// A store operation, as [`FaultyStore`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreOp {
    /// [`TokenStore::load`].
    Load,
    /// [`TokenStore::save`].
    Save,
    /// [`TokenStore::lease`].
    Lease,
    /// [`TokenStore::renew`].
    Renew,
}

/// A fault injected into one store call.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreFault {
    /// Fail without touching the store: nothing happened.
    FailBefore,
    /// Perform the call, then fail: it took effect (a write landed, a lease was granted
    /// and is never released: it ends by expiry) but its answer is lost.
    FailAfter,
    /// Wait this long, then perform the call: a caller that gives up first leaves nothing
    /// done.
    HangBefore(Duration),
    /// Perform the call, then wait this long before answering: a caller that gives up
    /// first has lost the answer of a call that took effect.
    HangAfter(Duration),
    /// Refuse as if the lease had expired ([`StoreError::LeaseLost`]), writing nothing.
    /// Only for saves and renewals; other calls fail as [`StoreFault::FailBefore`].
    LoseLease,
    /// Panic inside the call.
    Panic,
}

/// How many faults of each kind [`FaultyStore`] injected, and how many calls it saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultCounts {
    /// Calls seen, per operation: load, save, lease, renew.
    pub calls: [u64; 4],
    /// [`StoreFault::FailBefore`] injected.
    pub fail_before: u64,
    /// [`StoreFault::FailAfter`] injected.
    pub fail_after: u64,
    /// [`StoreFault::HangBefore`] injected.
    pub hang_before: u64,
    /// [`StoreFault::HangAfter`] injected.
    pub hang_after: u64,
    /// [`StoreFault::LoseLease`] injected.
    pub lose_lease: u64,
    /// [`StoreFault::Panic`] injected.
    pub panics: u64,
}

impl FaultCounts {
    /// Calls seen of `op`.
    pub fn calls_of(&self, op: StoreOp) -> u64 {
        self.calls[index(op)]
    }

    /// Faults injected, all kinds.
    pub fn faults(&self) -> u64 {
        self.fail_before
            + self.fail_after
            + self.hang_before
            + self.hang_after
            + self.lose_lease
            + self.panics
    }
}

fn index(op: StoreOp) -> usize {
    match op {
        StoreOp::Load => 0,
        StoreOp::Save => 1,
        StoreOp::Lease => 2,
        StoreOp::Renew => 3,
    }
}

/// Wraps a store and injects faults into its calls: queued ones first
/// ([`FaultyStore::fail_next`]), then random ones drawn from a seeded generator
/// ([`FaultyStore::random_faults`]). Leases pass through untouched, so the inner store's
/// own leases and fencing keep working. Clones share the faults and the counts.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tokenkeeper::testing::{FaultyStore, StoreFault, StoreOp};
/// use tokenkeeper::{MemoryStore, TokenStore};
///
/// let store = FaultyStore::new(MemoryStore::new());
/// store.fail_next(StoreOp::Load, StoreFault::FailBefore);
/// assert!(store.load("k").await.is_err());
/// assert!(store.load("k").await.unwrap().is_none());
/// # }
/// ```
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: Arc<S>,
    faults: Arc<Mutex<Faults>>,
    /// Whether `watch` is passed on (see [`FaultyStore::without_watch`]).
    watches: bool,
}

struct Faults {
    /// Operation, calls of it to let through first, fault.
    queued: VecDeque<(StoreOp, u64, StoreFault)>,
    rate: f64,
    mix: Vec<StoreFault>,
    ops: Vec<StoreOp>,
    rng: fastrand::Rng,
    counts: FaultCounts,
}

impl<S: fmt::Debug> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("inner", &self.inner)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

impl<S> FaultyStore<S> {
    /// Wraps `inner`, injecting nothing until told.
    pub fn new(inner: S) -> Self {
        Self {
            inner: Arc::new(inner),
            faults: Arc::new(Mutex::new(Faults {
                queued: VecDeque::new(),
                rate: 0.0,
                mix: Vec::new(),
                ops: Vec::new(),
                rng: fastrand::Rng::with_seed(0),
                counts: FaultCounts::default(),
            })),
            watches: true,
        }
    }

    /// A store that cannot watch, as a custom store without [`TokenStore::watch`] is:
    /// `watch` answers [`StoreError::Unsupported`], so its sources learn of another
    /// replica's save only when they read the store (their token turned stale, or the API
    /// rejected it). For measuring what the watch is worth.
    pub fn without_watch(mut self) -> Self {
        self.watches = false;
        self
    }

    /// Injects a fault drawn from `mix` into each call of one of `ops` with probability
    /// `rate`, from a generator seeded with `seed`. A rate of 0 stops random faults.
    pub fn random_faults(&self, rate: f64, ops: &[StoreOp], mix: Vec<StoreFault>, seed: u64) {
        let mut faults = self.lock();
        faults.rate = rate;
        faults.ops = ops.to_vec();
        faults.mix = mix;
        faults.rng = fastrand::Rng::with_seed(seed);
    }

    /// Changes the random fault rate (0 stops random faults).
    pub fn set_rate(&self, rate: f64) {
        self.lock().rate = rate;
    }

    /// Injects `fault` into the next call of `op` (after the faults queued before it).
    pub fn fail_next(&self, op: StoreOp, fault: StoreFault) {
        self.fail_nth(op, 1, fault);
    }

    /// Injects `fault` into the `n`-th next call of `op` (1: the next one), counting from
    /// now; the calls before it pass (unless other queued faults hit them).
    pub fn fail_nth(&self, op: StoreOp, n: u64, fault: StoreFault) {
        let mut faults = self.lock();
        let seen = faults.counts.calls[index(op)];
        faults.queued.push_back((op, seen + n.max(1), fault));
    }

    /// Forgets the faults queued and not injected yet.
    pub fn clear_queued(&self) {
        self.lock().queued.clear();
    }

    /// What was seen and injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.lock().counts
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fault for this call of `op`, if any, counted.
    fn draw(&self, op: StoreOp) -> Option<StoreFault> {
        let mut faults = self.lock();
        faults.counts.calls[index(op)] += 1;
        let call = faults.counts.calls[index(op)];
        let queued = faults
            .queued
            .iter()
            .position(|(o, at, _)| *o == op && *at <= call);
        let fault = match queued {
            Some(at) => faults.queued.remove(at).map(|(_, _, f)| f),
            None if faults.rate > 0.0 && faults.ops.contains(&op) && !faults.mix.is_empty() => {
                let hit = faults.rng.f64() < faults.rate;
                let kinds = faults.mix.len();
                let pick = faults.rng.usize(..kinds);
                hit.then(|| faults.mix[pick].clone())
            }
            None => None,
        };
        let counts = &mut faults.counts;
        match &fault {
            Some(StoreFault::FailBefore) => counts.fail_before += 1,
            Some(StoreFault::FailAfter) => counts.fail_after += 1,
            Some(StoreFault::HangBefore(_)) => counts.hang_before += 1,
            Some(StoreFault::HangAfter(_)) => counts.hang_after += 1,
            Some(StoreFault::LoseLease) => counts.lose_lease += 1,
            Some(StoreFault::Panic) => counts.panics += 1,
            None => {}
        }
        fault
    }
}

/// The error an injected failure answers with.
#[derive(Debug, thiserror::Error)]
#[error("injected store fault ({0})")]
struct Injected(&'static str);

fn injected(what: &'static str) -> StoreError {
    StoreError::unavailable(Injected(what))
}

/// Runs `call` under `fault`.
async fn inject<T>(
    op: StoreOp,
    fault: Option<StoreFault>,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match fault {
        None => call.await,
        Some(StoreFault::FailBefore) => Err(injected("failed before the call")),
        Some(StoreFault::FailAfter) => {
            let _lost = call.await;
            Err(injected("failed after the call took effect"))
        }
        Some(StoreFault::HangBefore(wait)) => {
            tokio::time::sleep(wait).await;
            call.await
        }
        Some(StoreFault::HangAfter(wait)) => {
            let answer = call.await;
            tokio::time::sleep(wait).await;
            answer
        }
        Some(StoreFault::LoseLease) if matches!(op, StoreOp::Save | StoreOp::Renew) => {
            Err(StoreError::LeaseLost)
        }
        Some(StoreFault::LoseLease) => Err(injected("failed before the call")),
        Some(StoreFault::Panic) => panic!("injected store panic in {op:?}"),
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for FaultyStore<S> {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        let fault = self.draw(StoreOp::Load);
        inject(StoreOp::Load, fault, self.inner.load(key)).await
    }

    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        let fault = self.draw(StoreOp::Save);
        inject(
            StoreOp::Save,
            fault,
            self.inner.save(key, token, expected, lease),
        )
        .await
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let fault = self.draw(StoreOp::Lease);
        if fault == Some(StoreFault::FailAfter) {
            // Granted, answer lost: nobody will release it; it ends by expiry (or, for a
            // lease bound to its holder, never in this process).
            std::mem::forget(self.inner.lease(key, ttl).await?);
            return Err(injected("failed after the lease was granted"));
        }
        inject(StoreOp::Lease, fault, self.inner.lease(key, ttl)).await
    }

    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        let fault = self.draw(StoreOp::Renew);
        inject(StoreOp::Renew, fault, self.inner.renew(key, lease, ttl)).await
    }

    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(key, lease).await
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        self.inner.keys().await
    }

    async fn due(
        &self,
        before: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.due(before, limit).await
    }

    fn watch(&self) -> Result<crate::store::Watch, StoreError> {
        if !self.watches {
            return Err(StoreError::Unsupported("watch"));
        }
        self.inner.watch()
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        self.inner.check_key(key)
    }
}

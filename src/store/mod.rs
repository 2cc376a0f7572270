//! Where token sets live: the [`TokenStore`] trait and its backends.
//!
//! | backend | feature | shared by | lease |
//! |---|---|---|---|
//! | [`MemoryStore`] | (always) | tasks of one process | in-process, with expiry and fencing |
//! | [`FileStore`] | (always) | processes of one machine | OS file lock, released when the holder dies |
#![cfg_attr(
    feature = "redis",
    doc = "| [`RedisStore`](redis::RedisStore) | `redis` | machines | `SET NX PX` + fencing number |"
)]
#![cfg_attr(
    feature = "postgres",
    doc = "| [`PostgresStore`](postgres::PostgresStore) | `postgres` | machines | lease row with expiry + fencing number |"
)]
//!
//! # Contract
//!
//! Every implementation, including your own, must guarantee:
//!
//! - `load` returns what the last successful `save` wrote, with the version `save` returned.
//! - `save` is a compare-and-swap: it writes only if the stored version equals `expected`
//!   (`None`: nothing stored), and only while `lease` is still held; otherwise it returns
//!   [`StoreError::Conflict`] or [`StoreError::LeaseLost`] and writes nothing. A save is
//!   all or nothing: a reader never sees a torn token set.
//! - `lease` gives mutual exclusion for one key across every process that shares the
//!   store. It waits for a holder to release, and returns [`StoreError::LeaseTimeout`]
//!   after about `ttl`. A lease with an expiry carries a fencing number that grows with
//!   every grant, so that a holder whose lease expired can never overwrite a newer token.
//! - `renew` extends a held lease that expires, and fails with [`StoreError::LeaseLost`]
//!   once it has expired or been taken over. A store whose leases expire but cannot be
//!   renewed keeps the default ([`StoreError::Unsupported`]); the refresh protocol then
//!   relies on the lease's first ttl alone.
//! - `due` lists the keys whose stored set's [`TokenSet::keep_alive_at`] has come, earliest
//!   first, from what the last successful saves wrote (never a set that was not saved);
//!   a store that cannot find them answers [`StoreError::Unsupported`] (the default).
//! - Errors say whether the operation may have taken effect: an error that leaves the
//!   outcome unknown (a timeout, a connection cut after the request was sent) must be
//!   [`StoreError::Unavailable`] or [`StoreError::Timeout`], never `Conflict` or
//!   `LeaseLost`, which promise that nothing was written.
//!
//! What each store needs to be durable (a store that loses a key can make the protocol
//! present a refresh token that was already used) is in ARCHITECTURE.md.
//!
//! The [`conformance`] suite (feature `conformance`) checks these properties.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::token::TokenSet;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub mod encrypted;
mod file;
mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use file::FileStore;
pub use memory::MemoryStore;

/// One notification of a [`TokenStore::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// `key` was saved at `version`, by this process or another sharing the store.
    Saved {
        /// The key.
        key: String,
        /// The version the save returned.
        version: u64,
    },
    /// Notifications may have been lost (a subscription cut and restored, a receiver that
    /// fell behind): whoever follows the store reads again what it serves.
    Resync,
}

/// The stream [`TokenStore::watch`] returns.
pub type Watch = std::pin::Pin<Box<dyn futures_util::Stream<Item = Change> + Send>>;

/// The save a networked store's announcement `"<version> <key>"` reports (the form both
/// the Redis save script and PostgreSQL's `pg_notify` write), if it is one.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn saved_from_announcement(payload: &str) -> Option<Change> {
    let (version, key) = payload.split_once(' ')?;
    Some(Change::Saved {
        key: key.to_owned(),
        version: version.parse().ok()?,
    })
}

/// A watch over an in-process channel of saves: a receiver that falls behind gets a
/// [`Change::Resync`] instead of the saves it missed.
pub(crate) fn watch_channel(receiver: tokio::sync::broadcast::Receiver<(String, u64)>) -> Watch {
    use tokio::sync::broadcast::error::RecvError;
    Box::pin(futures_util::stream::unfold(
        receiver,
        |mut receiver| async move {
            let change = match receiver.recv().await {
                Ok((key, version)) => Change::Saved { key, version },
                Err(RecvError::Lagged(_)) => Change::Resync,
                Err(RecvError::Closed) => return None,
            };
            Some((change, receiver))
        },
    ))
}

/// A value and the store version it was read at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its version: pass it as `expected` to the next [`TokenStore::save`].
    pub version: u64,
}

/// Durable, shared storage for token sets, one per key.
///
/// See the [module documentation](self) for the contract every implementation keeps.
#[async_trait]
pub trait TokenStore: fmt::Debug + Send + Sync + 'static {
    /// The token set stored under `key`, if any.
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError>;

    /// Compare-and-swap: writes `token` only if the stored version is `expected` (`None`:
    /// absent) and `lease` is still held. Returns the new version.
    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError>;

    /// Takes the lease for `key`: mutual exclusion across every process sharing the store.
    /// Waits for the current holder, up to about `ttl`; a lease that expires does so
    /// `ttl` after it was granted.
    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError>;

    /// Extends `lease` so that it expires `ttl` from now, and records the new expiry with
    /// [`Lease::set_expires_at`]. Fails with [`StoreError::LeaseLost`] if the lease has
    /// expired or another holder has it.
    ///
    /// The default: leases that never expire need no renewal (`Ok`); others
    /// [`StoreError::Unsupported`].
    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        let _ = (key, ttl);
        match lease.expires_at() {
            None => Ok(()),
            Some(_) => Err(StoreError::Unsupported("lease renewal")),
        }
    }

    /// Removes `key`'s token set, if `lease` (taken on `key`) is still held
    /// ([`StoreError::LeaseLost`] otherwise, removing nothing): for a user who disconnects
    /// their account. An absent key is no error. Afterwards `load` finds nothing, and
    /// `keys` and `due` do not list the key; its lease is not affected, and a later save
    /// starts the key anew (expected version `None`).
    ///
    /// A source that served the grant and finds its key gone restores the newest set it
    /// saw (its protection against a store that lost the key): revoke the grant first
    /// ([`crate::RefreshingTokenSource::revoke`], which every source respects), and delete
    /// the key once no process serves it. The default: [`StoreError::Unsupported`].
    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let _ = (key, lease);
        Err(StoreError::Unsupported("delete"))
    }

    /// Every key that holds a token set, sorted (for operators: `tokenkeeper status`).
    /// The default: [`StoreError::Unsupported`], for stores that cannot list.
    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        Err(StoreError::Unsupported("listing keys"))
    }

    /// Keys whose stored set's [`TokenSet::keep_alive_at`] is at or before `before`,
    /// earliest first, at most `limit`: the grants whose refresh token must be rotated
    /// to stay alive. A set without a keep-alive instant (no live refresh token, or an
    /// unknown refresh expiry) is never due. Instants are compared at the store's
    /// resolution (milliseconds in Redis, microseconds in PostgreSQL); keys due at the
    /// same instant come in no particular order.
    ///
    /// The default: [`StoreError::Unsupported`], for stores that cannot find them.
    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let _ = (before, limit);
        Err(StoreError::Unsupported("due"))
    }

    /// Reports saves made by any process sharing the store, from the call on, within
    /// milliseconds: what lets a replica follow another's rotation at once instead of
    /// when its own token turns stale. Every successful save is reported as
    /// [`Change::Saved`] with the version it returned, or covered by a later
    /// [`Change::Resync`] (notifications may have been lost: a subscription cut and
    /// restored, a receiver that fell behind); a version is never reported before its
    /// save can be read. The stream ends only with the store. A store that cannot watch
    /// answers [`StoreError::Unsupported`] (the default); sources then read the store
    /// when their token turns stale, as ever.
    fn watch(&self) -> Result<Watch, StoreError> {
        Err(StoreError::Unsupported("watch"))
    }

    /// Checks that `key` can be stored here at all (length, characters), without
    /// touching the store. [`crate::Builder::build`] calls it, so that a key the store
    /// cannot hold is a configuration error at once. Default: any non-empty key.
    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        if key.is_empty() {
            return Err(StoreError::InvalidKey {
                key: key.to_owned(),
                reason: "empty",
            });
        }
        Ok(())
    }
}

#[async_trait]
impl<S: TokenStore + ?Sized> TokenStore for Arc<S> {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        (**self).load(key).await
    }
    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        (**self).save(key, token, expected, lease).await
    }
    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        (**self).lease(key, ttl).await
    }
    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        (**self).renew(key, lease, ttl).await
    }
    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        (**self).delete(key, lease).await
    }
    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        (**self).keys().await
    }
    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        (**self).due(before, limit).await
    }
    fn watch(&self) -> Result<Watch, StoreError> {
        (**self).watch()
    }
    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        (**self).check_key(key)
    }
}

/// Releases a lease when asked; store implementations provide one per lease.
#[async_trait]
pub trait LeaseRelease: std::any::Any + fmt::Debug + Send + Sync + 'static {
    /// Gives the lease back. A [`Lease`] dropped without [`Lease::release`] calls this in
    /// a background task when a tokio runtime is around; otherwise the lease expires (or,
    /// for process-bound leases, ends when the guard drops).
    async fn release(self: Box<Self>) -> Result<(), StoreError>;

    /// Whether dropping the guard itself releases the lease (an OS lock, an in-memory
    /// entry): then a dropped [`Lease`] needs no background task. Default: false.
    fn releases_on_drop(&self) -> bool {
        false
    }
}

/// A held lease on one key. Release it with [`Lease::release`]; dropping it (a cancelled
/// future) releases it in the background when a tokio runtime is around, and otherwise
/// leaves it to expire.
#[derive(Debug)]
pub struct Lease {
    fencing: u64,
    /// Moved forward by [`TokenStore::renew`] while the lease is shared by reference.
    expires_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    guard: Option<Box<dyn LeaseRelease>>,
}

impl Lease {
    /// A lease with fencing number `fencing` that expires at `expires_at` (`None`: held
    /// until released or until the holder dies), released through `guard`.
    pub fn new(
        fencing: u64,
        expires_at: Option<tokio::time::Instant>,
        guard: impl LeaseRelease,
    ) -> Self {
        Self {
            fencing,
            expires_at: std::sync::Mutex::new(expires_at),
            guard: Some(Box::new(guard)),
        }
    }

    /// The fencing number: grows with every lease granted on the key.
    pub fn fencing(&self) -> u64 {
        self.fencing
    }

    /// When the lease expires, if it does.
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        *self.expires_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new expiry after a successful [`TokenStore::renew`] (for store
    /// implementations). Never moves the expiry backwards.
    pub fn set_expires_at(&self, at: tokio::time::Instant) {
        let mut expires_at = self.expires_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = expires_at.as_mut() {
            *current = (*current).max(at);
        }
    }

    /// How long the lease is still held for; `None` when it does not expire.
    pub fn remaining(&self) -> Option<Duration> {
        self.expires_at()
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
    }

    /// The store-specific guard, for store implementations.
    pub fn guard(&self) -> Option<&dyn LeaseRelease> {
        self.guard.as_deref()
    }

    /// Gives the lease back.
    pub async fn release(mut self) -> Result<(), StoreError> {
        match self.guard.take() {
            Some(guard) => guard.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take()
            && !guard.releases_on_drop()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = guard.release().await {
                    tracing::debug!(error = %e, "releasing a dropped lease failed; it will expire");
                }
            });
        }
    }
}

/// `now + after` on tokio's clock, clamped to about a century: never panics, whatever
/// `after` is.
pub(crate) fn deadline_after(after: Duration) -> tokio::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = tokio::time::Instant::now();
    now.checked_add(after.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// The version a save writes over `current` (`None`: nothing stored): 1, or one more,
/// or [`StoreError::Corrupt`] when the stored version cannot grow any further.
pub(crate) fn next_version(key: &str, current: Option<u64>) -> Result<u64, StoreError> {
    match current {
        None => Ok(1),
        Some(v) => v.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            key: key.to_owned(),
            reason: "the stored version cannot grow any further".into(),
        }),
    }
}

/// `at + ttl` on tokio's clock, clamped: never panics.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn deadline_from(at: tokio::time::Instant, ttl: Duration) -> tokio::time::Instant {
    at.checked_add(ttl).unwrap_or_else(|| deadline_after(ttl))
}

/// How many failed requests a networked store's lease wait tolerates, asking again as
/// the same owner (its grant is idempotent) before it gives up.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) const LEASE_ERRORS_TOLERATED: u32 = 3;

/// When a networked store's taker that gave up frees any grant made to it: at once, and
/// again later for a request that was still on its way.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) const FREE_LOST_GRANTS_AFTER: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// How soon [`poll_lease`] asks again at first, and at the most.
const LEASE_POLL: Duration = Duration::from_millis(10);
const LEASE_POLL_MAX: Duration = Duration::from_millis(80);

/// Waits for a lease the way stores that cannot notify waiters do: calls `try_take` after
/// 10 ms, then doubling the pause up to 80 ms (many waiters on a networked store must not
/// flood it while the holder works), until it grants one (`Ok(Some)`), fails, or `ttl`
/// has passed
/// ([`StoreError::LeaseTimeout`]). For [`TokenStore::lease`] implementations.
pub async fn poll_lease<F, Fut>(
    key: &str,
    ttl: Duration,
    mut try_take: F,
) -> Result<Lease, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Lease>, StoreError>>,
{
    let give_up = deadline_after(ttl);
    let mut pause = LEASE_POLL;
    loop {
        if let Some(lease) = try_take().await? {
            return Ok(lease);
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(StoreError::LeaseTimeout {
                key: key.to_owned(),
            });
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(LEASE_POLL_MAX);
    }
}

/// A store failure. Implementations of [`TokenStore`] map their own errors onto these.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The compare-and-swap failed: the stored version is not the expected one.
    #[error("the stored token set changed since it was read")]
    Conflict,
    /// The lease expired or was taken over; the write was refused (fencing).
    #[error("the lease was lost; the write was refused")]
    LeaseLost,
    /// The lease could not be taken in time.
    #[error("timed out waiting for the lease on key {key:?}")]
    LeaseTimeout {
        /// The key.
        key: String,
    },
    /// What is stored under the key cannot be read. It is left untouched.
    #[error("the token set stored under key {key:?} is unreadable: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong (never the content).
        reason: String,
    },
    /// The key cannot be used by this store (empty, or characters it cannot hold).
    #[error("invalid store key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The store could not be reached or failed. Whether the operation took effect is
    /// unknown.
    #[error("the store is unavailable")]
    Unavailable(#[source] Arc<dyn StdError + Send + Sync + 'static>),
    /// The store did not answer in time. Whether the operation took effect is unknown.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store is set up wrongly (a missing table, a missing permission): an operator
    /// must act; retrying will not help.
    #[error("the store is misconfigured: {0}")]
    Misconfigured(String),
    /// The store does not offer this operation.
    #[error("the store does not support {0}")]
    Unsupported(&'static str),
    /// The set stored under the key cannot be decrypted with the configured keys (a
    /// missing or wrong key, altered data, or a sealed set read by a source or manager
    /// whose store is not wrapped in an `EncryptedStore` at all): see
    /// [`EncryptedStore`](crate::store::encrypted::EncryptedStore). It is left untouched;
    /// an operator must configure the key that sealed it.
    #[error(
        "the token set stored under key {key:?} cannot be decrypted with the configured keys \
         (a missing or wrong key, or altered data); it is left untouched"
    )]
    Undecryptable {
        /// The key.
        key: String,
    },
}

impl StoreError {
    /// Wraps a backend's own error as [`StoreError::Unavailable`].
    pub fn unavailable(e: impl StdError + Send + Sync + 'static) -> Self {
        Self::Unavailable(Arc::new(e))
    }

    /// True when the same call may succeed later without anyone changing anything:
    /// conflicts, lost or busy leases, an unreachable or slow store. Corrupt data,
    /// invalid keys, a misconfigured store and unsupported operations are not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Conflict
                | Self::LeaseLost
                | Self::LeaseTimeout { .. }
                | Self::Unavailable(_)
                | Self::Timeout(_)
        )
    }
}

/// The `extra` field under which [`EncryptedStore`](crate::store::encrypted::EncryptedStore)
/// keeps a set's sealed fields: its presence marks a sealed set.
pub(crate) const SEALED_MARKER: &str = "tokenkeeper_sealed";

/// The store every engine uses: the application's, refusing a set sealed by an
/// `EncryptedStore` that this one does not wrap (a replica configured without the
/// encryption, the CLI): its envelopes are no tokens, and presenting one would get the
/// grant marked rejected everywhere.
pub(crate) struct RefuseSealed(pub(crate) Arc<dyn TokenStore>);

impl fmt::Debug for RefuseSealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[async_trait]
impl TokenStore for RefuseSealed {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        let loaded = self.0.load(key).await?;
        if loaded
            .as_ref()
            .is_some_and(|stored| stored.value.extra.contains_key(SEALED_MARKER))
        {
            return Err(StoreError::Undecryptable {
                key: key.to_owned(),
            });
        }
        Ok(loaded)
    }
    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        self.0.save(key, token, expected, lease).await
    }
    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.0.lease(key, ttl).await
    }
    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        self.0.renew(key, lease, ttl).await
    }
    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        self.0.delete(key, lease).await
    }
    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        self.0.keys().await
    }
    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        self.0.due(before, limit).await
    }
    fn watch(&self) -> Result<Watch, StoreError> {
        self.0.watch()
    }
    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        self.0.check_key(key)
    }
}

/// A connection failure no retry mends, as [`StoreError::Misconfigured`]: the server's
/// certificate refused (an unknown issuer, another host's name, expired), or a server
/// without TLS where TLS is required. Any other error as it is.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn tls_refusal(e: StoreError) -> StoreError {
    let StoreError::Unavailable(source) = &e else {
        return e;
    };
    let mut chain = String::new();
    let mut deepest = String::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(source.as_ref());
    while let Some(error) = next {
        deepest = error.to_string();
        chain.push_str(&deepest);
        chain.push_str(": ");
        next = error.source();
    }
    if chain.contains("invalid peer certificate") {
        StoreError::Misconfigured(format!(
            "the server's TLS certificate was refused ({deepest}): check the root certificates and the host name"
        ))
    } else if chain.contains("does not support TLS") {
        StoreError::Misconfigured(
            "the server does not offer TLS, which the connection requires (sslmode)".into(),
        )
    } else {
        e
    }
}

/// The schema version written by [`encode`].
pub const SCHEMA_VERSION: u32 = 1;

#[derive(serde::Serialize)]
struct RecordOut<'a> {
    schema: u32,
    version: u64,
    token_set: &'a TokenSet,
}

#[derive(serde::Deserialize)]
struct RecordIn {
    schema: u32,
    version: u64,
    token_set: serde_json::Value,
}

/// Serializes a token set and its version in the schema stores persist (JSON, secrets in
/// plain text: protect what holds it).
pub fn encode(token: &TokenSet, version: u64) -> Vec<u8> {
    serde_json::to_vec_pretty(&RecordOut {
        schema: SCHEMA_VERSION,
        version,
        token_set: token,
    })
    .expect("a TokenSet always serializes")
}

/// Reads what [`encode`] wrote. Anything else is [`StoreError::Corrupt`], whose message
/// never quotes the content.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Versioned<TokenSet>, StoreError> {
    let corrupt = |what: &str, e: serde_json::Error| StoreError::Corrupt {
        key: key.to_owned(),
        reason: format!("{what} ({})", crate::json_error_summary(&e)),
    };
    let record: RecordIn =
        serde_json::from_slice(bytes).map_err(|e| corrupt("not a token record", e))?;
    if record.schema != SCHEMA_VERSION {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            reason: format!(
                "schema version {} is not supported (this build reads {SCHEMA_VERSION})",
                record.schema
            ),
        });
    }
    let value =
        serde_json::from_value(record.token_set).map_err(|e| corrupt("invalid token set", e))?;
    Ok(Versioned {
        value,
        version: record.version,
    })
}

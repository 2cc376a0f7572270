//! Keeps OAuth 2.0 access tokens valid for as long as a user's one-time consent lasts.
//!
//! ```no_run
//! use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource, TokenSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let source = RefreshingTokenSource::builder(
//!     ProviderProfile::lucid(),
//!     ClientCredentials::new("client-id", "client-secret"),
//! )
//! .store(FileStore::new("tokens"))        // one file per key, shared by processes
//! .key("lucid:user-42")
//! .initial_refresh_token("oauth2-...")    // used only when the store holds nothing
//! .build()?;
//!
//! let token = source.access_token().await?; // token.secret() is the bearer string
//! # let _ = token;
//! # Ok(())
//! # }
//! ```
//!
//! # What happens behind `access_token()`
//!
//! - A fresh cached token is returned after one lock-free load and one clock read.
//! - A stale token (within the leeway of its expiry) is returned at once while one
//!   refresh runs in the background; an expired one waits for that one refresh.
//! - The refresh runs in a spawned task under the store's lease, reloads the stored token
//!   set first (another process may have refreshed), writes a write-ahead record, presents
//!   the refresh token read under the lease, and saves the rotated tokens with a
//!   compare-and-swap before anyone uses them; a failed save keeps the key locked until it
//!   lands. Single-use refresh tokens are never presented twice, across tasks, processes
//!   and machines that share a store, whatever the store does (ARCHITECTURE.md).
//! - Failures are typed ([`Error`]): [`Error::ReauthorizationRequired`] means a person
//!   must consent again; [`Error::Transient`] means wait, nothing was lost.
//!
//! # Providers
//!
//! [`ProviderProfile`] describes a token endpoint as data: [`ProviderProfile::generic`]
//! for any RFC 6749 provider, and [`ProviderProfile::lucid`], [`ProviderProfile::highq`],
//! [`ProviderProfile::autodesk`] with each provider's wire quirks.
//!
//! # Stores
//!
//! [`MemoryStore`] (the default) for one process, [`FileStore`] for the processes of one
//! machine, or your own [`TokenStore`].
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `aws-lc-rs` (default) | TLS cryptography from aws-lc-rs (post-quantum hybrid key exchange) |
//! | `ring` | TLS cryptography from ring instead (with `default-features = false`): a lighter build |
//! | `xml` | XML token and error responses (quick-xml); RFC 6749 servers answer JSON |
//! | `highq` | [`ProviderProfile::highq`] (implies `xml`) |
//! | `consent` | [`consent`]: obtaining a grant once (authorization code with a loopback listener or a pasted code, the device grant), using the `oauth2` crate for the authorization URL |
//! | `manager` | [`TokenManager`]: many grants (one per user) of one provider, bounded in memory (`moka`), with a fleet sweeper that keeps every stored grant alive and an event stream |
//! | `cli` | the `tokenkeeper` command (`login`, `token`, `status`, `logout`, `import`, `simulate`) |
//! | `testing` | [`testing`]: a provider simulator on loopback and a fault-injecting store wrapper, for examples and your own tests |
//! | `conformance` | `store::conformance`: the suite every [`TokenStore`] must pass |
//! | `middleware` | `middleware`: reactive refresh (invalidate and retry once on 401, HighQ 403) as a `reqwest-middleware` middleware and a plain `send_with_token` helper |
//! | `redis` | `store::redis::RedisStore`: token sets in Redis for replicas on several machines; `SET NX PX` leases with fencing numbers checked by the save |
//! | `postgres` | `store::postgres::PostgresStore`: token sets in one PostgreSQL table; lease rows with expiry (database clock) and fencing numbers checked by the save |
//! | `encryption` | `store::encrypted::EncryptedStore`: any store with its tokens sealed at rest (XChaCha20-Poly1305, key ids for rotation, each ciphertext bound to its store key) |
#![deny(missing_docs)]
#![warn(
    missing_debug_implementations,
    unreachable_pub,
    clippy::future_not_send
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod background;
mod clock;
#[cfg(feature = "consent")]
pub mod consent;
mod engine;
mod error;
mod events;
mod follow;
mod http;
mod lease;
#[cfg(feature = "manager")]
mod manager;
#[cfg(feature = "middleware")]
pub mod middleware;
mod protocol;
pub mod provider;
mod refresh;
mod retry;
mod secret;
mod source;
mod status;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;
mod token;

pub use background::BackgroundTask;
pub use clock::{Clock, ClockStep, ManualClock, SystemClock, TokioClock};
pub use error::{ConsentFailure, Error, ProviderError, ReauthorizationReason, TransientKind};
pub use events::{Event, EventCounts, EventKind};
#[cfg(feature = "manager")]
pub use manager::{ManagerBuilder, ManagerStatus, SweepOptions, TokenManager};
pub use provider::ProviderProfile;
pub use refresh::{Builder, RefreshingTokenSource};
pub use secret::{AccessToken, ClientCredentials, ClientSecret, RefreshToken};
pub use source::TokenSource;
pub use status::{Health, Metrics, Status};
pub use store::{FileStore, MemoryStore, TokenStore, Versioned};
/// The `time` crate, whose `OffsetDateTime` instants the API uses (expiries, clocks): named
/// through this re-export, no dependency of your own is needed. Durations are
/// `std::time::Duration` throughout, but for a [`ManualClock`] step back.
pub use time;
pub use token::{
    DEFAULT_LEEWAY, ExpiryFields, Freshness, RotationInFlight, TokenSet, absolute_expiry,
};

/// A serde_json error described by kind and position only: its own message may quote
/// the input, which can hold a token.
pub(crate) fn json_error_summary(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected field type or missing field",
        serde_json::error::Category::Eof => "truncated",
    };
    if e.line() == 0 {
        kind.to_owned()
    } else {
        format!("{kind} at line {} column {}", e.line(), e.column())
    }
}

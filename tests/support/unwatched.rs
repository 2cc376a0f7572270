//! A store that cannot watch, as a custom store without [`TokenStore::watch`] is: its
//! sources learn of another replica's refresh only when their own token turns stale (or
//! the API rejects it). Everything else is forwarded.
//!
//! Included with `#[path = "support/unwatched.rs"] mod unwatched;`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokenkeeper::store::{Lease, StoreError};
use tokenkeeper::{TokenSet, TokenStore, Versioned};

#[derive(Debug, Clone)]
pub struct Unwatched(pub Arc<dyn TokenStore>);

#[async_trait]
impl TokenStore for Unwatched {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        self.0.load(key).await
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
    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        self.0.keys().await
    }
    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        self.0.due(before, limit).await
    }
    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        self.0.check_key(key)
    }
}

//! [`MemoryStore`]: token sets in this process's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Lease, LeaseRelease, StoreError, TokenStore, Versioned, Watch, deadline_after, next_version,
    watch_channel,
};
use crate::token::TokenSet;

/// An in-process store: the default of
/// [`RefreshingTokenSource::builder`](crate::RefreshingTokenSource::builder).
///
/// Clones share the same contents. Leases expire after their `ttl` and carry fencing
/// numbers, like the networked stores', so the refresh protocol behaves the same here.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    released: Notify,
    /// Every save, for [`TokenStore::watch`].
    saved: tokio::sync::broadcast::Sender<(String, u64)>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            released: Notify::new(),
            saved: tokio::sync::broadcast::channel(WATCH_CAPACITY).0,
        }
    }
}

/// How many saves a watch may fall behind before it gets a
/// [`Change::Resync`](super::Change::Resync).
const WATCH_CAPACITY: usize = 1024;

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Versioned<TokenSet>>,
    leases: HashMap<String, Held>,
    fencing: u64,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    fencing: u64,
    expires_at: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// What is stored under `key`, read synchronously (for tests and inspection).
    pub fn get(&self, key: &str) -> Option<Versioned<TokenSet>> {
        self.shared.lock().entries.get(key).cloned()
    }

    /// Removes `key`, as a store that loses data would (for tests). Returns what was there.
    pub fn remove(&self, key: &str) -> Option<Versioned<TokenSet>> {
        self.shared.lock().entries.remove(key)
    }

    /// Writes `token` under `key` without a lease or version check, as an administrator
    /// importing a token from elsewhere would. Returns the new version.
    pub fn put(&self, key: &str, token: TokenSet) -> u64 {
        let mut state = self.shared.lock();
        let version = state
            .entries
            .get(key)
            .map_or(1, |v| v.version.saturating_add(1));
        state.entries.insert(
            key.to_owned(),
            Versioned {
                value: token,
                version,
            },
        );
        drop(state);
        self.shared.announce(key, version);
        version
    }
}

impl Shared {
    /// Tells the watches (none listening is no error).
    fn announce(&self, key: &str, version: u64) {
        if self.saved.receiver_count() > 0 {
            let _ = self.saved.send((key.to_owned(), version));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock: a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut keys: Vec<String> = self.shared.lock().entries.keys().cloned().collect();
        keys.sort();
        Ok(keys)
    }

    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut due: Vec<(OffsetDateTime, String)> = self
            .shared
            .lock()
            .entries
            .iter()
            .filter_map(|(key, stored)| {
                let at = stored.value.keep_alive_at()?;
                (at <= before).then(|| (at, key.clone()))
            })
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, key)| key).collect())
    }

    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        Ok(self.get(key))
    }

    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        let mut state = self.shared.lock();
        match state.leases.get(key) {
            Some(held) if held.fencing == lease.fencing() && held.expires_at > Instant::now() => {}
            _ => return Err(StoreError::LeaseLost),
        }
        let current = state.entries.get(key).map(|v| v.version);
        if current != expected {
            return Err(StoreError::Conflict);
        }
        let version = next_version(key, current)?;
        state.entries.insert(
            key.to_owned(),
            Versioned {
                value: token.clone(),
                version,
            },
        );
        // After the write is readable, as the watch contract asks.
        drop(state);
        self.shared.announce(key, version);
        Ok(version)
    }

    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        match state.leases.get(key) {
            Some(held) if held.fencing == lease.fencing() && held.expires_at > Instant::now() => {}
            _ => return Err(StoreError::LeaseLost),
        }
        state.entries.remove(key);
        Ok(())
    }

    fn watch(&self) -> Result<Watch, StoreError> {
        Ok(watch_channel(self.shared.saved.subscribe()))
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let give_up = deadline_after(ttl);
        loop {
            let released = self.shared.released.notified();
            let wait_until = {
                let mut state = self.shared.lock();
                let now = Instant::now();
                match state.leases.get(key) {
                    Some(held) if held.expires_at > now => held.expires_at.min(give_up),
                    _ => {
                        state.fencing += 1;
                        let held = Held {
                            fencing: state.fencing,
                            expires_at: deadline_after(ttl),
                        };
                        state.leases.insert(key.to_owned(), held);
                        return Ok(Lease::new(
                            held.fencing,
                            Some(held.expires_at),
                            MemoryRelease {
                                shared: Arc::clone(&self.shared),
                                key: key.to_owned(),
                                fencing: held.fencing,
                            },
                        ));
                    }
                }
            };
            if Instant::now() >= give_up {
                return Err(StoreError::LeaseTimeout {
                    key: key.to_owned(),
                });
            }
            tokio::select! {
                () = released => {}
                () = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        match state.leases.get_mut(key) {
            Some(held) if held.fencing == lease.fencing() && held.expires_at > Instant::now() => {
                held.expires_at = deadline_after(ttl);
                lease.set_expires_at(held.expires_at);
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
    }
}

#[derive(Debug)]
struct MemoryRelease {
    shared: Arc<Shared>,
    key: String,
    fencing: u64,
}

impl Drop for MemoryRelease {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state
            .leases
            .get(&self.key)
            .is_some_and(|held| held.fencing == self.fencing)
        {
            state.leases.remove(&self.key);
        }
        drop(state);
        self.shared.released.notify_waiters();
    }
}

#[async_trait]
impl LeaseRelease for MemoryRelease {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        // Dropping releases.
        Ok(())
    }

    fn releases_on_drop(&self) -> bool {
        true
    }
}

//! Following the store: a watch ([`TokenStore::watch`](crate::TokenStore::watch)) tells
//! the engines of a source or a manager about every save, so that a replica serves the
//! token another replica just obtained within milliseconds rather than when its own
//! copy turns stale (a provider that kills the previous access token on refresh makes
//! that copy dead at once).
//!
//! One task per source or manager reads the watch and hands each saved version to the
//! engine of its key, if one is loaded; the engine starts a *follow* flight (one at a
//! time, like every flight, so that nothing published can be overtaken by an older
//! read), which reads the store without the lease and publishes the stored set if it is
//! newer and fresh. The hot path is unchanged: one lock-free load. A store that cannot
//! watch leaves engines reading the store when their token turns stale, as before.

use std::sync::{Arc, Weak};

use futures_util::StreamExt;

use crate::engine::{Engine, Follower, Registry};
use crate::store::{Change, StoreError, Watch};

/// Whom the follower tells.
enum Target {
    /// A single source's engine.
    Engine(Weak<Engine>),
    /// A manager's engines, by key.
    Registry(Weak<Registry>),
}

impl Target {
    /// The live engines `change` concerns (all of them for a resync); `None` once the
    /// source or manager is gone.
    fn engines(&self, change: &Change) -> Option<Vec<Arc<Engine>>> {
        let key = match change {
            Change::Saved { key, .. } => Some(key.as_str()),
            _ => None,
        };
        match self {
            Target::Engine(engine) => {
                let engine = engine.upgrade()?;
                Some(if key.is_none_or(|k| k == engine.key) {
                    vec![engine]
                } else {
                    Vec::new()
                })
            }
            Target::Registry(registry) => {
                let registry = registry.upgrade()?;
                let engines = registry.lock().unwrap_or_else(|e| e.into_inner());
                Some(match key {
                    Some(key) => engines
                        .get(key)
                        .and_then(Weak::upgrade)
                        .into_iter()
                        .collect(),
                    None => engines.values().filter_map(Weak::upgrade).collect(),
                })
            }
        }
    }
}

/// Starts following the store for `engine`'s source or manager (the manager's registry
/// when it has one). `None` when the store cannot watch.
pub(crate) fn start(engine: &Arc<Engine>) -> Option<Follower> {
    let watch = match engine.config.store.watch() {
        Ok(watch) => watch,
        Err(StoreError::Unsupported(_)) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the store; tokens are followed when they turn stale");
            return None;
        }
    };
    let target = match &engine.config.registry {
        Some(registry) => Target::Registry(Weak::clone(registry)),
        None => Target::Engine(Arc::downgrade(engine)),
    };
    Some(Follower(tokio::spawn(follow(watch, target))))
}

async fn follow(mut watch: Watch, target: Target) {
    while let Some(change) = watch.next().await {
        let Some(engines) = target.engines(&change) else {
            return;
        };
        let version = match change {
            Change::Saved { version, .. } => Some(version),
            _ => None,
        };
        for engine in engines {
            engine.heard(version);
        }
    }
}

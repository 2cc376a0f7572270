//! What happens to grants, as a stream: [`crate::TokenManager::subscribe`].

use std::sync::atomic::{AtomicU64, Ordering};

/// One thing that happened to one grant.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The grant's store key.
    pub key: String,
    /// What happened.
    pub kind: EventKind,
}

/// What happened to a grant. A refresh sends `Refreshed`, then `Rotated` if the provider
/// issued a new refresh token, then `KeepAlive` if it ran only to keep the refresh token
/// alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// This process refreshed the access token (its save may still be being retried: see
    /// [`crate::RefreshingTokenSource::flush`]).
    Refreshed,
    /// The refresh rotated the refresh token.
    Rotated,
    /// The refresh ran to keep an idle grant's refresh token alive.
    KeepAlive,
    /// This process adopted a token set another process (or task) saved.
    Adopted,
    /// The grant is dead (rejected, revoked, or none stored): a person must consent
    /// again (its key names whom to ask). Sent again by an engine created anew for the
    /// key after an eviction.
    NeedsConsent,
    /// A grant that was failing (provider or store trouble) works again.
    Recovered,
    /// The provider has failed this grant for longer than the configured
    /// `exhausted_after` ([`crate::Builder::exhausted_after`],
    /// [`crate::ManagerBuilder::exhausted_after`]): its attempts are now an hour apart
    /// (an operator may want to look), and once its refresh token's own lifetime has
    /// passed it needs consent. Sent once per engine; a success ends it.
    Exhausted,
}

/// How many events of each kind a manager's grants sent: [`crate::ManagerStatus::events`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventCounts {
    /// [`EventKind::Refreshed`] events.
    pub refreshed: u64,
    /// [`EventKind::Rotated`] events.
    pub rotated: u64,
    /// [`EventKind::KeepAlive`] events.
    pub keep_alive: u64,
    /// [`EventKind::Adopted`] events.
    pub adopted: u64,
    /// [`EventKind::NeedsConsent`] events.
    pub needs_consent: u64,
    /// [`EventKind::Recovered`] events.
    pub recovered: u64,
    /// [`EventKind::Exhausted`] events.
    pub exhausted: u64,
}

/// Where an engine sends its events (a manager's channel), counting them.
#[derive(Debug)]
pub(crate) struct EventSink {
    sender: tokio::sync::broadcast::Sender<Event>,
    counts: [AtomicU64; KINDS],
}

const KINDS: usize = 7;

fn slot(kind: EventKind) -> usize {
    match kind {
        EventKind::Refreshed => 0,
        EventKind::Rotated => 1,
        EventKind::KeepAlive => 2,
        EventKind::Adopted => 3,
        EventKind::NeedsConsent => 4,
        EventKind::Recovered => 5,
        EventKind::Exhausted => 6,
    }
}

// Made and read by a manager only.
#[cfg_attr(not(feature = "manager"), allow(dead_code))]
impl EventSink {
    /// A channel keeping the newest `capacity` events for each receiver.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            sender: tokio::sync::broadcast::channel(capacity).0,
            counts: Default::default(),
        }
    }

    /// Counts the event and sends it, if anyone listens.
    pub(crate) fn send(&self, key: &str, kind: EventKind) {
        self.counts[slot(kind)].fetch_add(1, Ordering::Relaxed);
        if self.sender.receiver_count() > 0 {
            // A receiver dropped meanwhile is no error.
            let _ = self.sender.send(Event {
                key: key.to_owned(),
                kind,
            });
        }
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    pub(crate) fn counts(&self) -> EventCounts {
        let count = |kind| self.counts[slot(kind)].load(Ordering::Relaxed);
        EventCounts {
            refreshed: count(EventKind::Refreshed),
            rotated: count(EventKind::Rotated),
            keep_alive: count(EventKind::KeepAlive),
            adopted: count(EventKind::Adopted),
            needs_consent: count(EventKind::NeedsConsent),
            recovered: count(EventKind::Recovered),
            exhausted: count(EventKind::Exhausted),
        }
    }
}

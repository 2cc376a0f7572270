//! What happens to grants, as a stream: [`crate::TokenManager::subscribe`].

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
}

/// Where an engine sends its events (a manager's channel).
pub(crate) type EventSink = tokio::sync::broadcast::Sender<Event>;

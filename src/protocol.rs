//! The refresh protocol, step by step: the one place where a refresh token is presented.
//! ARCHITECTURE.md describes it with the reasons; the steps are numbered the same here.
//!
//! 0. Read the store without the lease; adopt a fresh set another process saved.
//! 1. Take the store's lease for the key; it is renewed while this source works under it.
//!    While waiting for it, read the store now and then: adopt what the holder saves.
//! 2. Read the store again under the lease. First settle a rotated set this source failed
//!    to save earlier (save it over the version its save expected, find it already
//!    stored, or drop it because something newer is stored). Adopt a fresh set. If the
//!    key is missing, restore the newest set this source knew, or seed the initial
//!    refresh token if it never knew one.
//! 3. If another holder's write-ahead record is on the set, that holder may be presenting
//!    the refresh token, alive, with the successor in memory: wait for it (reading the
//!    store, then a transient error), unless its lease was a lock its death released, or
//!    it has been gone for
//!    [`Builder::abandoned_rotation_after`](crate::Builder::abandoned_rotation_after).
//! 4. Write this source's write-ahead record on the set (compare-and-swap).
//! 5. Present the refresh token, if the lease outlasts the request.
//! 6. On success: keep the rotated set in memory first, save it (compare-and-swap over
//!    the write-ahead version), publish it. If the save fails, publish anyway, and keep
//!    the key locked while retrying the save ([`Engine::persist`]).
//! 7. On `invalid_grant`: reload; adopt or retry once with a token another writer
//!    rotated; otherwise mark the set rejected: a person must re-authorize.
//! 8. On any other failure: no successor exists anywhere, so remove the write-ahead
//!    record, keep every token, and back off from the provider.

use std::collections::VecDeque;
use std::time::Duration as StdDuration;

use time::{Duration, OffsetDateTime};

use crate::engine::{EXHAUSTED_RETRY, Engine, Job, Outcome, Reason, Streak, Unsaved};
use crate::error::{Error, ReauthorizationReason, TransientKind};
use crate::events::EventKind;
use crate::http::RefreshFailure;
use crate::lease::HeldLease;
use crate::provider::{ProviderProfile, TokenResponse};
use crate::retry::store_step;
use crate::secret::{AccessToken, RefreshToken};
use crate::store::{StoreError, Versioned};
use crate::token::{Freshness, RotationInFlight, TokenSet, absolute_expiry, add_clamped};

/// How often a source waiting for another holder (its lease, or its rotation in flight)
/// reads the store to adopt what that holder saves.
const WATCH_WHILE_WAITING: StdDuration = StdDuration::from_millis(200);

/// Where a refresh kills the previous access token and the store can watch, how long
/// the refreshing flight waits between writing its write-ahead record and presenting the
/// refresh token: the other replicas hear the record (milliseconds) and stop serving the
/// token before the provider kills it. Paid once per token lifetime, by callers already
/// waiting for the successor, and only when a valid token was doomed (a refresh of an
/// expired or rejected token kills nothing anyone is served).
const ANNOUNCE_GRACE: StdDuration = StdDuration::from_millis(50);

/// The longest a flight waits, without the lease, for another holder's rotation.
const AWAIT_ROTATION_AT_MOST: StdDuration = StdDuration::from_secs(5);

/// How many consumed refresh tokens a source remembers.
const CONSUMED_KEPT: usize = 4;

/// How a rotated set that failed to save relates to what the store holds now.
enum Reconciled {
    /// The store holds it: the failed save had in fact landed.
    AlreadySaved(u64),
    /// The store still holds the version its save expected: write it there.
    Save(Option<u64>),
    /// Something newer was written since (a re-import, another holder that adopted the
    /// set and rotated further): the unsaved set is older than the store's. Drop it.
    Superseded,
}

fn reconcile(
    unsaved: &Unsaved,
    stored: Option<&Versioned<TokenSet>>,
    consumed: &VecDeque<RefreshToken>,
) -> Reconciled {
    match stored {
        // A revoked grant is never written over by a rotation of it (a key lost and
        // re-created restarts versions, which would otherwise look like the arm below).
        Some(stored) if stored.value.revoked_at.is_some() => Reconciled::Superseded,
        Some(stored)
            if stored.value.refresh_token == unsaved.set.refresh_token
                && stored.value.access_token == unsaved.set.access_token
                && stored.value.rotation.is_none() =>
        {
            Reconciled::AlreadySaved(stored.version)
        }
        Some(stored) if Some(stored.version) == unsaved.expected => {
            Reconciled::Save(Some(stored.version))
        }
        // A version below the expected one: versions only grow, so the store went back in
        // time (it lost writes, or the key was lost and restored from an older set).
        Some(stored)
            if unsaved
                .expected
                .is_some_and(|expected| stored.version < expected) =>
        {
            Reconciled::Save(Some(stored.version))
        }
        // A set whose refresh token this source consumed itself: the store went back in
        // time (it lost writes, or another source restored an older set after it lost the
        // key). Ours is newer. (Never judged by timestamps: clocks of machines differ.)
        Some(stored)
            if stored
                .value
                .refresh_token
                .as_ref()
                .is_some_and(|t| consumed.contains(t)) =>
        {
            Reconciled::Save(Some(stored.version))
        }
        Some(_) => Reconciled::Superseded,
        // The key vanished (a store that lost data): this set is the newest there is.
        None => Reconciled::Save(None),
    }
}

impl Engine {
    /// Runs one flight's job. Returns the outcome for the waiters and, when a rotated set
    /// is left unsaved, the lease still held for [`Engine::persist`].
    pub(crate) async fn run(self: &std::sync::Arc<Self>, job: Job) -> (Outcome, Option<HeldLease>) {
        match job {
            Job::Scoped(scope) => self.refresh_scoped(&scope).await,
            // Run by the flight itself (`Engine::fly`), never through here.
            Job::Follow { .. } => (
                self.follow().await.and_then(|token| {
                    token.ok_or_else(|| Error::transient(TransientKind::Interrupted, None))
                }),
                None,
            ),
            Job::Look { fallback } => match self.look(fallback).await {
                Ok(Some(token)) => (Ok(token), None),
                Ok(None) => self.refresh(Reason::AccessToken).await,
                Err(e) => (Err(e), None),
            },
            Job::Refresh(reason) => {
                // Step 0: adopt without the lease what another process saved.
                match self.look_for_fresh(reason).await {
                    Ok(Some(token)) => return (Ok(token), None),
                    Ok(None) => {}
                    Err(e) => return (Err(e), None),
                }
                let (outcome, held) = self.refresh(reason).await;
                let awaited = self.state().foreign_rotation.clone().map(|seen| seen.0);
                if let Err(Error::Transient {
                    kind: TransientKind::RotationInFlight,
                    ..
                }) = &outcome
                    && held.is_none()
                    && let Some(token) = self.await_rotation(reason, awaited).await
                {
                    return (Ok(token), None);
                }
                (outcome, held)
            }
        }
    }

    /// Waits for another holder's rotation (its write-ahead record `awaited`), with the
    /// lease released so that the holder can save: reads the store whenever the watch
    /// reports a save, and at least every 200 ms, and adopts the set it saves. Gives up
    /// (the caller gets `RotationInFlight` and comes back later) once the awaited record
    /// is gone without a fresh set, or after at most 5 s or a lease ttl, whichever is
    /// shorter.
    async fn await_rotation(
        &self,
        reason: Reason,
        awaited: Option<RotationInFlight>,
    ) -> Option<AccessToken> {
        let until =
            crate::store::deadline_after(self.config.timing.lease_ttl.min(AWAIT_ROTATION_AT_MOST));
        while tokio::time::Instant::now() < until {
            self.store_changed_or(WATCH_WHILE_WAITING).await;
            let Ok(stored) = self.unleased(self.config.store.load(&self.key)).await else {
                continue;
            };
            let stored = stored?;
            self.remember(&stored.value, Some(stored.version));
            if let Some(token) = self.adoptable(&stored.value, reason) {
                return Some(token);
            }
            if stored.value.rotation != awaited {
                return None;
            }
        }
        None
    }

    /// A follow flight (see [`crate::follow`]): reads the store without the lease and
    /// publishes the stored set if it is fresh and holds another token than the published
    /// one (`Some`). Nothing while a rotated set of this source is unsaved (it is newer
    /// than the store's) or the grant is dead.
    pub(crate) async fn follow(&self) -> Result<Option<AccessToken>, Error> {
        {
            let state = self.state();
            if state.unsaved.is_some() || state.persisting || state.dead.is_some() {
                return Ok(None);
            }
        }
        let stored = {
            // Closed never: the semaphore lives as long as the engines.
            let _permit = self.config.following.reads.acquire().await;
            self.unleased(self.config.store.load(&self.key)).await?
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        {
            let state = self.state();
            // A refresh token this source saw consumed: the store went back in time (or
            // another replica restored an older set); what it holds is older than what
            // was published.
            if stored
                .value
                .refresh_token
                .as_ref()
                .is_some_and(|t| state.consumed.contains(t))
            {
                return Ok(None);
            }
        }
        let before = self.cache.load_full();
        self.remember(&stored.value, Some(stored.version));
        // Another holder is refreshing, and the refresh kills the published token: wait
        // for its successor (callers wait for this flight meanwhile: the token is doomed).
        if self.killing_rotation_in_flight(&stored.value)
            && self
                .cache
                .load()
                .as_ref()
                .is_some_and(|cached| cached.doomed)
        {
            let token = self
                .await_rotation(Reason::AccessToken, stored.value.rotation.clone())
                .await;
            if let Some(token) = &token
                && before.as_ref().is_none_or(|cached| &cached.token != token)
            {
                self.state().metrics.adoptions_by_watch += 1;
            }
            return Ok(token);
        }
        // The published token itself: nothing to do (publishing it again would race an
        // `invalidate` of it).
        if before
            .as_ref()
            .zip(stored.value.access_token.as_ref())
            .is_some_and(|(cached, stored)| &cached.token == stored)
        {
            return Ok(None);
        }
        let Some(token) = self.adoptable(&stored.value, Reason::AccessToken) else {
            return Ok(None);
        };
        if before.as_ref().is_some_and(|cached| cached.token == token) {
            return Ok(None);
        }
        self.state().metrics.adoptions_by_watch += 1;
        Ok(Some(token))
    }

    /// Reads the store without the lease and adopts a fresh set.
    async fn look_for_fresh(&self, reason: Reason) -> Result<Option<AccessToken>, Error> {
        if self.state().unsaved.is_some() {
            // Our own rotated set is newer than anything stored: settle it under the lease.
            return Ok(None);
        }
        let stored = self.unleased(self.config.store.load(&self.key)).await?;
        self.state().last_look = Some(self.now());
        Ok(stored.and_then(|stored| {
            self.remember(&stored.value, Some(stored.version));
            self.adoptable(&stored.value, reason)
        }))
    }

    /// A flight that only looks at the store: adopts a fresh set (`Ok(Some)`), or finds a
    /// dead grant re-imported (`Ok(None)`: go on and refresh); otherwise `fallback`.
    async fn look(&self, fallback: Error) -> Result<Option<AccessToken>, Error> {
        let now = self.now();
        if let Some(dead) = &mut self.state().dead {
            dead.checked_at = now;
        }
        let stored = match self.unleased(self.config.store.load(&self.key)).await {
            Ok(stored) => stored,
            // The fallback is what callers act on; the store's trouble is logged.
            Err(e) => {
                tracing::debug!(key = %self.key, error = %e, "looking at the store failed");
                return Err(fallback);
            }
        };
        self.state().last_look = Some(now);
        let Some(stored) = stored else {
            return Err(fallback);
        };
        if let Some(token) = self.adoptable(&stored.value, Reason::AccessToken) {
            let mut state = self.state();
            state.dead = None;
            drop(state);
            self.remember(&stored.value, Some(stored.version));
            return Ok(Some(token));
        }
        let mut state = self.state();
        let reimported = state.dead.as_ref().is_some_and(|dead| {
            stored.value.rejected_at.is_none()
                && stored.value.refresh_token.is_some()
                && stored.value.refresh_token != dead.refresh_token
        });
        if reimported {
            tracing::info!(key = %self.key, "the store holds a new grant; refreshing with it");
            state.dead = None;
            state.last_error = None;
            // The old grant's failures are not the new one's.
            state.trouble = None;
            return Ok(None);
        }
        Err(fallback)
    }

    /// Steps 1 to 8, under the lease. Returns the lease when a rotated set is left unsaved.
    /// A downscoped refresh: the lease, then steps 2 to 8 asking for `scope`. Nothing
    /// stored is adopted: the stored set holds the full-scope token.
    async fn refresh_scoped(&self, scope: &[String]) -> (Outcome, Option<HeldLease>) {
        let held = match self.acquire().await {
            Ok(held) => held,
            Err(e) => return (Err(e), None),
        };
        self.finish_under_lease(held, Reason::AccessToken, Some(scope))
            .await
    }

    async fn refresh(self: &std::sync::Arc<Self>, reason: Reason) -> (Outcome, Option<HeldLease>) {
        // Step 1. While waiting for the lease, watch the store: the holder may save a
        // fresh set, which this source adopts at once (the lease, if it comes, is then
        // given back).
        let mut acquiring = tokio::spawn({
            let inner = std::sync::Arc::clone(self);
            async move { inner.acquire().await }
        });
        let held = loop {
            tokio::select! {
                acquired = &mut acquiring => match acquired {
                    Ok(Ok(held)) => break held,
                    Ok(Err(e)) => return (Err(e), None),
                    Err(_) => return (Err(Error::transient(TransientKind::Interrupted, None)), None),
                },
                () = self.store_changed_or(WATCH_WHILE_WAITING) => {
                    if let Ok(Some(token)) = self.look_for_fresh(reason).await {
                        // Not aborted: a lease granted with its answer in flight would
                        // then be left to expire. `flush` waits for this task.
                        self.state().lease_tasks += 1;
                        let inner = std::sync::Arc::clone(self);
                        tokio::spawn(async move {
                            let _done = crate::engine::LeaseTaskDone(inner);
                            if let Ok(Ok(held)) = acquiring.await {
                                held.release().await;
                            }
                        });
                        return (Ok(token), None);
                    }
                }
            }
        };
        self.finish_under_lease(held, reason, None).await
    }

    /// Steps 2 to 8 under `held`; then the lease is given back, unless a rotated set is
    /// left unsaved (it is returned for [`Engine::persist`]).
    async fn finish_under_lease(
        &self,
        held: HeldLease,
        reason: Reason,
        scope: Option<&[String]>,
    ) -> (Outcome, Option<HeldLease>) {
        // A panic under the lease must not release it while a rotated set is unsaved.
        let outcome = std::panic::AssertUnwindSafe(self.under_lease(&held, reason, scope));
        let outcome = match futures_util::FutureExt::catch_unwind(outcome).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::panicked()),
        };
        if self.state().unsaved.is_some() {
            return (outcome, Some(held));
        }
        held.release().await;
        (outcome, None)
    }

    /// Steps 2 to 8. With `scope`, the refresh asks for a downscoped access token: it is
    /// returned (and cached apart), while the stored set keeps the full-scope access
    /// token and takes the new refresh token (see [`Engine::access_token_for`]).
    async fn under_lease(
        &self,
        held: &HeldLease,
        reason: Reason,
        scope: Option<&[String]>,
    ) -> Outcome {
        // A revoke or an import replaced the grant since this flight started: it must
        // not present the new grant's token on the old one's behalf (it could neither
        // publish nor keep the answer). The caller's next call starts a new flight.
        if crate::engine::flight_is_stale(&self.state()) {
            return Err(Error::transient(TransientKind::Interrupted, None));
        }
        // Step 2.
        let stored = held.op(self.config.store.load(&self.key)).await?;
        let (mut current, mut version) = self.current(held, stored).await?;
        // Under a lease that lasts as long as its holder, another holder's record is that
        // of a holder gone: nothing of it is in flight any more.
        let in_flight_possible = held.expires() || current.rotation.is_none();
        let candidate = if in_flight_possible {
            std::borrow::Cow::Borrowed(&current)
        } else {
            let mut settled = current.clone();
            settled.rotation = None;
            std::borrow::Cow::Owned(settled)
        };
        if scope.is_none()
            && let Some(token) = self.adoptable(&candidate, reason)
        {
            return Ok(token);
        }
        let mut retried_rotated = false;
        loop {
            if current.revoked_at.is_some() {
                return Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::Revoked,
                    provider: None,
                });
            }
            if current.rejected_at.is_some() {
                return Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::PreviouslyRejected,
                    provider: None,
                });
            }
            let Some(refresh_token) = current.refresh_token.clone() else {
                return Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::NoRefreshToken,
                    provider: None,
                });
            };

            // Step 3: another holder's refresh in flight.
            match current
                .rotation
                .as_ref()
                .filter(|r| r.holder != self.holder())
            {
                Some(rotation) => self.may_take_over(held, rotation)?,
                None => self.state().foreign_rotation = None,
            }
            // A store that hands back a refresh token this source saw rotated has lost
            // acknowledged writes: never present it. Write back the newest set this source
            // knows instead, if it has one; otherwise leave the grant untouched.
            if self.state().consumed.contains(&refresh_token) {
                let known = self.state().last_known.clone().filter(|known| {
                    known
                        .refresh_token
                        .as_ref()
                        .is_some_and(|t| t != &refresh_token)
                });
                let Some(known) = known else {
                    return Err(Error::Storage(StoreError::Misconfigured(
                        "the store returned a refresh token this source already used: it lost acknowledged writes (Redis without appendfsync always, a failover to a lagging replica); the grant is left untouched".into(),
                    )));
                };
                tracing::error!(key = %self.key, "the store went back in time (it handed back a refresh token this source already used); writing back the newest token set this source knows");
                let saved = held
                    .op(self
                        .config
                        .store
                        .save(&self.key, &known, version, held.lease()))
                    .await?;
                current = known;
                version = Some(saved);
                continue;
            }

            // The lease must outlast the request before anything is written (a record
            // left for a token nobody presented would make others wait for nothing).
            let timeout = self
                .config
                .endpoint
                .profile()
                .request_timeout
                .saturating_add(ANNOUNCE_GRACE);
            if !held.outlasts(timeout).await {
                return Err(Error::transient(TransientKind::LeaseBusy, None));
            }

            // Step 4: the write-ahead record, new for every presentation (even over this
            // source's own earlier one), so that other holders time each presentation.
            let mut marked = current.clone();
            marked.rotation = Some(RotationInFlight::new(
                self.holder(),
                self.config.clock.now(),
            ));
            let saved = held
                .op(self
                    .config
                    .store
                    .save(&self.key, &marked, version, held.lease()))
                .await?;
            current = marked;
            version = Some(saved);

            // Step 5: present the refresh token, if the lease still outlasts the request
            // (the record's write took time); if not, take the record back.
            if !held.outlasts(timeout).await {
                self.take_back_record(held, current, version).await;
                return Err(Error::transient(TransientKind::LeaseBusy, None));
            }
            // From here the published token may die at any moment (where a refresh kills
            // the previous access token): callers wait for this flight. Replicas that
            // watch the store hear the record and stop serving it too, given a moment
            // (`ANNOUNCE_GRACE`) before the provider kills it.
            if scope.is_none() && self.doom() && self.config.following.watching() {
                tokio::time::sleep(ANNOUNCE_GRACE).await;
            }
            let forced = {
                let mut state = self.state();
                let forced = state.rejected_access.is_some();
                if forced {
                    state.last_forced_refresh = Some(self.now());
                }
                forced
            };
            let sent_at = self.config.clock.now();
            tracing::debug!(key = %self.key, provider = %self.config.endpoint.profile().name, forced, "refreshing");
            let answer = held
                .during(self.config.endpoint.refresh(&refresh_token, scope, sent_at))
                .await;
            match answer {
                // Step 6.
                Ok(response) => {
                    let next = merge(
                        self.config.endpoint.profile(),
                        &current,
                        response,
                        sent_at,
                        self.config.clock.now(),
                    );
                    let Some(scope) = scope else {
                        self.save_rotated(
                            held,
                            &next,
                            version,
                            sent_at,
                            Some(refresh_token),
                            reason,
                        )
                        .await?;
                        return self.publish(&next).ok_or_else(|| Error::InvalidResponse {
                            reason: "the token response holds no access token".into(),
                        });
                    };
                    // Downscoped: the new refresh token is kept with the full-scope
                    // access token (still valid, unless the provider kills it with
                    // every refresh, or the API rejected it); the narrow token is the
                    // caller's alone.
                    let mut kept = next.clone();
                    let full_survives = !self
                        .config
                        .endpoint
                        .profile()
                        .refresh_invalidates_access_token
                        && self.state().rejected_access != current.access_token;
                    if full_survives {
                        kept.access_token = current.access_token.clone();
                        kept.token_type = current.token_type.clone();
                        kept.expires_at = current.expires_at;
                        kept.scopes = current.scopes.clone();
                        kept.obtained_at = current.obtained_at;
                    } else {
                        kept.access_token = None;
                        kept.expires_at = None;
                    }
                    self.save_rotated(held, &kept, version, sent_at, Some(refresh_token), reason)
                        .await?;
                    if kept.access_token.is_some() {
                        self.publish(&kept);
                    } else {
                        self.cache.store(None);
                    }
                    return self.publish_scoped(scope, &next).ok_or_else(|| {
                        Error::InvalidResponse {
                            reason: "the token response holds no access token".into(),
                        }
                    });
                }
                // Step 7.
                Err(RefreshFailure::InvalidGrant(provider)) => {
                    let reloaded = held.op(self.config.store.load(&self.key)).await?;
                    if let Some(stored) = reloaded {
                        let rotated = stored.value.refresh_token.is_some()
                            && stored.value.refresh_token.as_ref() != Some(&refresh_token);
                        if rotated {
                            tracing::info!(key = %self.key, "refresh token was rotated by another writer; adopting it");
                            self.state().metrics.rotations_adopted += 1;
                            if scope.is_none()
                                && let Some(token) = self.adoptable(&stored.value, reason)
                            {
                                return Ok(token);
                            }
                            if !retried_rotated {
                                retried_rotated = true;
                                current = stored.value;
                                version = Some(stored.version);
                                continue;
                            }
                        }
                    }
                    tracing::error!(key = %self.key, "the provider rejected the refresh token: re-authorization required");
                    let mut dead = current;
                    dead.rejected_at = Some(self.config.clock.now());
                    dead.rotation = None;
                    let saved = held
                        .op(self
                            .config
                            .store
                            .save(&self.key, &dead, version, held.lease()))
                        .await;
                    if let Err(e) = &saved {
                        tracing::warn!(key = %self.key, error = %e, "could not mark the rejected token set in the store");
                    }
                    self.remember(&dead, saved.ok());
                    return Err(Error::ReauthorizationRequired {
                        reason: ReauthorizationReason::RefreshTokenRejected,
                        provider,
                    });
                }
                // Step 8: nothing is discarded; the caller decides from the error.
                Err(RefreshFailure::Other(mut e)) => {
                    tracing::warn!(key = %self.key, error = %e, "refresh failed; tokens kept");
                    // A scope the grant does not cover is that request's mistake, not
                    // the provider's trouble: it spaces nothing else.
                    if !(scope.is_some() && matches!(e, Error::RequestRejected { .. })) {
                        self.provider_failed(&mut e, &current);
                    }
                    self.take_back_record(held, current, version).await;
                    return Err(e);
                }
            }
        }
    }

    /// [`RefreshingTokenSource::revoke`](crate::RefreshingTokenSource::revoke): under the
    /// lease, the current set (a rotated set this source failed to save settled first);
    /// its newest token revoked at the provider; then the revoked mark saved over it with
    /// the compare-and-swap. Another holder's write-ahead record does not stop it: that
    /// holder's successor belongs to the revoked grant, and the mark supersedes its save.
    /// With `at_provider` false ([`RefreshingTokenSource::forget`](crate::RefreshingTokenSource::forget)),
    /// only the store is marked.
    pub(crate) async fn revoke(&self, at_provider: bool) -> Result<(), Error> {
        let held = self.acquire().await?;
        let outcome = self.revoke_under(&held, at_provider).await;
        held.release().await;
        outcome
    }

    async fn revoke_under(&self, held: &HeldLease, at_provider: bool) -> Result<(), Error> {
        let stored = held.op(self.config.store.load(&self.key)).await?;
        let (current, version) = match stored {
            Some(stored) if stored.value.revoked_at.is_some() => {
                (stored.value, Some(stored.version))
            }
            stored => self.current(held, stored).await?,
        };
        // Another holder presenting the token may hold its successor: revoking the
        // stored token (then invalid) would revoke nothing, and its successor would be
        // lost with the mark. Wait for it as a refresh does.
        if let Some(rotation) = current
            .rotation
            .as_ref()
            .filter(|r| r.holder != self.holder())
        {
            self.may_take_over(held, rotation)?;
        }
        if at_provider && current.revoked_at.is_none() {
            // A store handing back a token this source saw rotated: the newest one this
            // source knows is the live one.
            let refresh = match &current.refresh_token {
                Some(token) if self.state().consumed.contains(token) => self
                    .state()
                    .last_known
                    .as_ref()
                    .and_then(|known| known.refresh_token.clone()),
                token => token.clone(),
            };
            let token = match (&refresh, &current.access_token) {
                (Some(refresh), _) => Some((refresh.secret(), "refresh_token")),
                (None, Some(access)) => Some((access.secret(), "access_token")),
                (None, None) => None,
            };
            match (&self.config.endpoint.profile().revocation_url, token) {
                (Some(_), Some((token, hint))) => {
                    let timeout = self.config.endpoint.profile().request_timeout;
                    if !held.outlasts(timeout).await {
                        return Err(Error::transient(TransientKind::LeaseBusy, None));
                    }
                    held.during(
                        self.config
                            .endpoint
                            .revoke(token, hint, self.config.clock.now()),
                    )
                    .await?;
                    tracing::info!(key = %self.key, "revoked the grant at the provider");
                }
                (None, Some(_)) => {
                    tracing::warn!(key = %self.key, provider = %self.config.endpoint.profile().name, "the provider has no revocation endpoint: the grant is removed from the store, but its tokens stay valid at the provider until they expire");
                }
                (_, None) => {}
            }
        }
        let mut revoked = TokenSet::empty(self.config.clock.now());
        revoked.revoked_at = current.revoked_at.or(Some(self.config.clock.now()));
        revoked.scopes = current.scopes.clone();
        let saved = held
            .op(self
                .config
                .store
                .save(&self.key, &revoked, version, held.lease()))
            .await?;
        // Still under the lease, before anything else of this source can take it (an
        // import in another task): the cache and the state follow the store.
        let error = Error::ReauthorizationRequired {
            reason: ReauthorizationReason::Revoked,
            provider: None,
        };
        let mut state = self.state();
        // Flights started before this point publish nothing any more.
        state.epoch = state.epoch.wrapping_add(1);
        self.cache.store(None);
        if at_provider && let Some(token) = current.refresh_token {
            state.consumed.push_back(token);
            if state.consumed.len() > CONSUMED_KEPT {
                state.consumed.pop_front();
            }
        }
        state.unsaved = None;
        state.last_known = Some(revoked);
        state.known_version = saved;
        state.dead = Some(Box::new(crate::engine::Dead {
            error: error.clone(),
            refresh_token: None,
            checked_at: self.now(),
        }));
        state.last_error = Some(Box::new(error));
        drop(state);
        self.emit(EventKind::NeedsConsent);
        Ok(())
    }

    /// Removes this source's write-ahead record from `set` (saved at `version`) when it
    /// presented nothing, or got no successor: best effort, since its own next attempt
    /// writes a new record anyway.
    async fn take_back_record(&self, held: &HeldLease, mut set: TokenSet, version: Option<u64>) {
        set.rotation = None;
        if let Err(e) = held
            .op(self
                .config
                .store
                .save(&self.key, &set, version, held.lease()))
            .await
        {
            tracing::debug!(key = %self.key, error = %e, "could not take the write-ahead record back");
        }
    }

    /// Step 2's settling: what the store holds now, with any rotated set this source
    /// failed to save settled first, a lost key restored, or the initial token seeded.
    async fn current(
        &self,
        held: &HeldLease,
        stored: Option<Versioned<TokenSet>>,
    ) -> Result<(TokenSet, Option<u64>), Error> {
        let unsaved = self.state().unsaved.clone();
        if let Some(unsaved) = unsaved {
            let consumed = self.state().consumed.clone();
            match reconcile(&unsaved, stored.as_ref(), &consumed) {
                Reconciled::AlreadySaved(version) => {
                    self.saved(&unsaved.set, Some(version));
                    if let Some(stored) = stored {
                        self.remember(&stored.value, Some(stored.version));
                        return Ok((stored.value, Some(version)));
                    }
                    return Ok((unsaved.set, Some(version)));
                }
                Reconciled::Save(expected) => {
                    if expected.is_none() {
                        tracing::error!(key = %self.key, "the store lost this key; restoring the rotated token set this source holds");
                    }
                    let version = held
                        .op(self
                            .config
                            .store
                            .save(&self.key, &unsaved.set, expected, held.lease()))
                        .await?;
                    tracing::info!(key = %self.key, "saved the rotated token set that an earlier save had failed to write");
                    self.saved(&unsaved.set, Some(version));
                    return Ok((unsaved.set, Some(version)));
                }
                Reconciled::Superseded => {
                    tracing::warn!(key = %self.key, "a rotated token set that failed to save was superseded in the store; dropping it");
                    self.state().unsaved = None;
                }
            }
        }
        if let Some(stored) = stored {
            self.remember(&stored.value, Some(stored.version));
            return Ok((stored.value, Some(stored.version)));
        }
        // The key is missing.
        let known = self.state().last_known.clone();
        let seed = match (known, &self.config.initial_refresh_token) {
            (Some(known), _) => {
                tracing::error!(key = %self.key, "the store lost this key (see ARCHITECTURE.md on durable stores); restoring the newest token set this source saw, not the initial refresh token");
                known
            }
            (None, Some(initial)) => {
                TokenSet::from_refresh_token(initial.clone(), self.config.clock.now())
            }
            (None, None) => {
                return Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::NoRefreshToken,
                    provider: None,
                });
            }
        };
        let version = held
            .op(self.config.store.save(&self.key, &seed, None, held.lease()))
            .await?;
        tracing::info!(key = %self.key, "seeded the store before presenting its refresh token");
        self.remember(&seed, Some(version));
        Ok((seed, Some(version)))
    }

    /// Step 3: whether this source may present a refresh token on which another holder
    /// left its write-ahead record.
    fn may_take_over(&self, held: &HeldLease, rotation: &RotationInFlight) -> Result<(), Error> {
        if !held.expires() {
            // The store's lease is a lock that lasts as long as its holder: we have it,
            // so that holder is gone, and with it any successor of the token.
            tracing::info!(key = %self.key, "the holder that was presenting this refresh token died; presenting it again");
            self.state().metrics.takeovers += 1;
            return Ok(());
        }
        let now = self.now();
        let mut state = self.state();
        let first_seen = match &state.foreign_rotation {
            Some(seen) if &seen.0 == rotation => seen.1,
            _ => {
                state.foreign_rotation = Some(Box::new((rotation.clone(), now)));
                now
            }
        };
        let waited = now.saturating_duration_since(first_seen);
        if waited < self.config.timing.takeover_after {
            let left = self.config.timing.takeover_after - waited;
            tracing::info!(key = %self.key, waited = ?waited, "another holder is presenting this refresh token and may still save its successor; waiting for it");
            return Err(Error::transient(
                TransientKind::RotationInFlight,
                Some(left.min(store_step(u32::MAX))),
            ));
        }
        tracing::warn!(key = %self.key, waited = ?waited, "another holder left a refresh in flight and never saved; presenting its refresh token (if that holder is alive with the successor, the provider may revoke the grant)");
        state.metrics.takeovers += 1;
        state.foreign_rotation = None;
        Ok(())
    }

    /// Step 6: the rotated set is kept in memory before anything else and saved over the
    /// write-ahead version (the caller publishes it). A failed save leaves it in
    /// `unsaved`; the flight's task then keeps the lease and retries.
    async fn save_rotated(
        &self,
        held: &HeldLease,
        next: &TokenSet,
        version: Option<u64>,
        sent_at: OffsetDateTime,
        presented: Option<RefreshToken>,
        reason: Reason,
    ) -> Result<(), Error> {
        let presented_rotated = presented
            .as_ref()
            .is_some_and(|used| next.refresh_token.as_ref() != Some(used));
        {
            let mut state = self.state();
            if let Some(used) = presented
                && next.refresh_token.as_ref() != Some(&used)
            {
                state.consumed.push_back(used);
                if state.consumed.len() > CONSUMED_KEPT {
                    state.consumed.pop_front();
                }
            }
            if crate::engine::flight_is_stale(&state) {
                // A revoke or an import replaced the grant after this flight started
                // (its lease was lost meanwhile): its successor belongs to the old grant.
                tracing::warn!(key = %self.key, "the grant was revoked or replaced during this refresh; dropping its answer");
                return Err(Error::transient(TransientKind::Interrupted, None));
            }
            state.unsaved = Some(Box::new(Unsaved {
                set: next.clone(),
                expected: version,
            }));
            state.metrics.refreshes += 1;
            state.last_refresh = Some(sent_at);
            state.provider_succeeded();
            state.rejected_access = None;
            state.foreign_rotation = None;
        }
        self.emit(EventKind::Refreshed);
        if presented_rotated {
            self.emit(EventKind::Rotated);
        }
        if reason == Reason::KeepAlive {
            self.emit(EventKind::KeepAlive);
        }
        match held
            .op(self
                .config
                .store
                .save(&self.key, next, version, held.lease()))
            .await
        {
            Ok(version) => self.saved(next, Some(version)),
            Err(e) => {
                tracing::error!(key = %self.key, error = %e, "the refreshed token set could not be saved; keeping the key locked and retrying");
                self.state().metrics.failed_saves += 1;
            }
        }
        Ok(())
    }

    /// Retries saving the unsaved rotated set until it is saved, found saved, or
    /// superseded, holding the lease throughout (re-taking it if it was lost), so that no
    /// other holder presents the refresh token this source consumed. Store faults are
    /// retried every 100 to 500 ms. A panic in one attempt is one failed attempt: the
    /// lease stays held. A store that cannot be read at all (corrupt data, a missing
    /// table) is retried every 5 s, the lease still held.
    pub(crate) async fn persist(&self, mut held: Option<HeldLease>) {
        let mut failures = 0u32;
        loop {
            let Some(unsaved) = self.state().unsaved.clone() else {
                break;
            };
            let attempt = std::panic::AssertUnwindSafe(self.persist_once(&mut held, &unsaved));
            let pause = match futures_util::FutureExt::catch_unwind(attempt).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if !e.is_transient() => {
                    // The lease stays held: an operator repairing the store (moving a
                    // corrupt file away, creating a table) must not let another holder in
                    // to find the key empty while this source holds the successor.
                    tracing::error!(key = %self.key, error = %e, "the store cannot hold the rotated token set; keeping the key locked and retrying in 5 s");
                    StdDuration::from_secs(5)
                }
                Ok(Err(e)) => {
                    tracing::warn!(key = %self.key, error = %e, "saving the rotated token set failed again");
                    store_step(failures)
                }
                Err(_) => {
                    tracing::error!(key = %self.key, "saving the rotated token set panicked; retrying");
                    store_step(failures)
                }
            };
            failures = failures.saturating_add(1);
            match &held {
                Some(lease) => lease.during(tokio::time::sleep(pause)).await,
                None => tokio::time::sleep(pause).await,
            }
        }
        if let Some(lease) = held {
            lease.release().await;
        }
    }

    /// One attempt of [`Engine::persist`]: (re)take the lease if needed, read, settle.
    async fn persist_once(
        &self,
        held: &mut Option<HeldLease>,
        unsaved: &Unsaved,
    ) -> Result<(), StoreError> {
        if held.as_ref().is_none_or(HeldLease::is_lost) {
            if let Some(lost) = held.take() {
                lost.release().await;
            }
            *held = Some(
                HeldLease::acquire(
                    &self.config.store,
                    &self.key,
                    self.config.timing.lease_ttl,
                    self.config.timing.store_timeout,
                )
                .await?,
            );
        }
        let Some(lease) = held.as_ref() else {
            return Err(StoreError::LeaseLost);
        };
        let stored = lease.op(self.config.store.load(&self.key)).await?;
        let consumed = self.state().consumed.clone();
        let version = match reconcile(unsaved, stored.as_ref(), &consumed) {
            Reconciled::AlreadySaved(version) => {
                tracing::info!(key = %self.key, "the rotated token set was saved after all");
                version
            }
            Reconciled::Save(expected) => {
                let version = lease
                    .op(self
                        .config
                        .store
                        .save(&self.key, &unsaved.set, expected, lease.lease()))
                    .await?;
                tracing::info!(key = %self.key, "saved the rotated token set on retry");
                version
            }
            Reconciled::Superseded => {
                tracing::warn!(key = %self.key, "a rotated token set that failed to save was superseded in the store; dropping it");
                let mut state = self.state();
                if state.unsaved.as_ref().is_some_and(|u| u.set == unsaved.set) {
                    state.unsaved = None;
                }
                return Ok(());
            }
        };
        self.saved(&unsaved.set, Some(version));
        Ok(())
    }

    /// A set is known saved (at `version`): forget it as unsaved, remember it as the
    /// newest known.
    fn saved(&self, set: &TokenSet, version: Option<u64>) {
        let mut state = self.state();
        if state.unsaved.as_ref().is_some_and(|u| &u.set == set) {
            state.unsaved = None;
        }
        drop(state);
        self.remember(set, version);
    }

    /// Remembers `set`, stored at `version` (`None`: unknown), as the newest this source
    /// has seen for the key.
    /// A set holding a refresh token this source consumed is not remembered (the store
    /// went back in time: what this source knows is newer). Another holder's write-ahead
    /// record is kept, so that a restored set still tells others to wait for that holder.
    fn remember(&self, set: &TokenSet, version: Option<u64>) {
        let mut state = self.state();
        // A flight started before a revoke or an import read the replaced grant.
        if crate::engine::flight_is_stale(&state) {
            return;
        }
        if set
            .refresh_token
            .as_ref()
            .is_some_and(|t| state.consumed.contains(t))
        {
            return;
        }
        let mut known = set.clone();
        if known
            .rotation
            .as_ref()
            .is_some_and(|r| r.holder == self.holder())
        {
            known.rotation = None;
        }
        state.last_known = Some(known);
        state.known_version = version.unwrap_or(0);
        drop(state);
        // (A record taken back is seen by the flight's next read: the set, adoptable
        // again, republishes the token undoomed.)
        if self.killing_rotation_in_flight(set) {
            let _doomed = self.doom();
        }
    }

    /// Whether `set` records another holder presenting its refresh token now, with a
    /// profile whose refresh kills the previous access token: then the set's access token
    /// is about to die. "Now": the record is younger than twice the request timeout (the
    /// request starts a little after the record, and may take the whole timeout), by
    /// this machine's clock, either way (an older one's request has ended, one way or
    /// another; one from further in the future than that is judged by no clock).
    pub(crate) fn killing_rotation_in_flight(&self, set: &TokenSet) -> bool {
        let profile = self.config.endpoint.profile();
        if !profile.refresh_invalidates_access_token {
            return false;
        }
        let Some(rotation) = set.rotation.as_ref().filter(|r| r.holder != self.holder()) else {
            return false;
        };
        let age = (self.config.clock.now() - rotation.since).unsigned_abs();
        age < profile.request_timeout.saturating_mul(2)
    }

    /// Records a provider failure in the backoff, and tells the caller when the next
    /// attempt will be allowed. A grant the provider has failed at least
    /// [`EXHAUSTED_MIN_FAILURES`](crate::engine::EXHAUSTED_MIN_FAILURES) times in a row over at least
    /// [`Timing::exhausted_after`](crate::engine::Timing) (monotonic time) is *exhausted*:
    /// its attempts are then an hour apart. Exhausted, with the presented set's refresh
    /// token past its own expiry by `exhausted_after` as well (a margin for an estimated
    /// lifetime and for clock skew), the error becomes
    /// [`ReauthorizationReason::RefreshTokenExpired`]: nothing can revive it, so it costs
    /// nothing more.
    fn provider_failed(&self, e: &mut Error, presented: &TokenSet) {
        let now = self.config.clock.now();
        let valid_for = self
            .cache
            .load()
            .as_ref()
            .filter(|c| c.freshness(now) != Freshness::Expired)
            .and_then(|c| c.expires_at)
            .and_then(|at| StdDuration::try_from(at - now).ok());
        let monotonic = self.now();
        let exhausted_after = self.config.timing.exhausted_after;
        let mut state = self.state();
        let trouble = state.trouble();
        let streak = trouble.streak.get_or_insert(Streak {
            since: now,
            began: monotonic,
            failures: 0,
        });
        streak.failures = streak.failures.saturating_add(1);
        let streak = *streak;
        let mut wait = trouble.backoff.failed(monotonic, e, valid_for);
        let exhausted = streak.exhausts(monotonic, exhausted_after);
        let newly_exhausted = exhausted && !std::mem::replace(&mut trouble.exhausted, exhausted);
        if exhausted {
            wait = trouble.backoff.at_least(monotonic, EXHAUSTED_RETRY);
        }
        drop(state);
        let margin = Duration::try_from(exhausted_after).unwrap_or(Duration::MAX);
        let long_expired = presented
            .refresh_expires_at
            .and_then(|at| at.checked_add(margin))
            .is_some_and(|dead_by| now >= dead_by);
        if exhausted && long_expired {
            tracing::error!(key = %self.key, error = %e, "the provider has failed this grant past its refresh token's lifetime: re-authorization required");
            *e = Error::ReauthorizationRequired {
                reason: ReauthorizationReason::RefreshTokenExpired,
                provider: None,
            };
            return;
        }
        if newly_exhausted {
            tracing::error!(key = %self.key, error = %e, failing_since = %streak.since, failures = streak.failures, "the provider has failed this grant for too long: attempts are now an hour apart");
            self.emit(EventKind::Exhausted);
        }
        if let Error::Transient { retry_after, .. } = e {
            *retry_after = Some(wait);
        }
    }

    /// Adopts `set` if its access token is fresh, not due for keep-alive, not about to
    /// be killed by another holder's refresh in flight, and not one the API rejected (unless a forced refresh ran too recently: then the rejection was not
    /// about expiry, and the token is served again).
    pub(crate) fn adoptable(&self, set: &TokenSet, reason: Reason) -> Option<AccessToken> {
        let token = set.access_token.as_ref()?;
        if set.rejected_at.is_some() || self.killing_rotation_in_flight(set) {
            return None;
        }
        let now = self.config.clock.now();
        let keep_alive_due = set.keep_alive_at().is_some_and(|at| now >= at);
        if set.freshness(now, self.config.leeway) != Freshness::Fresh
            || (reason == Reason::KeepAlive && keep_alive_due)
        {
            return None;
        }
        let mut state = self.state();
        // A set holding a refresh token this source saw consumed is older than what
        // replaced it (a read that raced this source's own rotation, or a store gone
        // back in time): its access token may be dead.
        if set
            .refresh_token
            .as_ref()
            .is_some_and(|t| state.consumed.contains(t))
        {
            return None;
        }
        if state.rejected_access.as_ref() == Some(token) {
            if self.forced_refresh_allowed(&state) {
                return None;
            }
            tracing::debug!(key = %self.key, "serving a rejected token again: a forced refresh ran moments ago");
            state.rejected_access = None;
        }
        let current = self.cache.load();
        let adopted = current.as_ref().is_none_or(|c| &c.token != token);
        if adopted {
            state.metrics.adoptions += 1;
        }
        // Published under the lock the rejection was checked under: an `invalidate` in
        // between cannot have its token published again.
        let published = self.publish_locked(&state, set);
        drop(state);
        if adopted && published.is_some() {
            self.emit(EventKind::Adopted);
        }
        published
    }
}

/// Step 6's merge: the response over the current set. The old refresh token is kept only
/// when the response carries none; expiries become absolute instants, anchored at the
/// send instant. A token whose answer took more than half its lifetime to arrive (the
/// clock jumped during the request, or the lifetime is shorter than the round trip) is
/// counted from the receipt instead: it arrives fresh, and is refreshed on schedule,
/// never on every call.
pub(crate) fn merge(
    profile: &ProviderProfile,
    current: &TokenSet,
    response: TokenResponse,
    sent_at: OffsetDateTime,
    received_at: OffsetDateTime,
) -> TokenSet {
    let default_lifetime = profile
        .default_access_token_lifetime
        .and_then(|d| Duration::try_from(d).ok());
    let mut obtained_at = sent_at;
    let mut expires_at = absolute_expiry(response.expiry, sent_at, default_lifetime);
    if let Some(at) = expires_at {
        let granted = at - sent_at;
        if received_at - sent_at >= granted / 2 {
            if at <= received_at {
                tracing::warn!(expires_at = %at, received_at = %received_at, granted = %granted, "the access token expired before its answer arrived: clock jump or a tiny lifetime? counting its lifetime from the receipt");
            }
            obtained_at = received_at;
            expires_at = Some(add_clamped(received_at, granted));
        }
    }
    let rotated = response.refresh_token.is_some();
    let refresh_expires_at = match response.refresh_expires_in.filter(|s| *s > 0) {
        Some(seconds) => Some(add_clamped(sent_at, Duration::seconds(seconds))),
        None if rotated => profile
            .refresh_token_lifetime
            .map(|d| add_clamped(sent_at, Duration::try_from(d).unwrap_or(Duration::MAX))),
        None => current.refresh_expires_at,
    };
    let mut next = TokenSet::new(response.access_token, obtained_at);
    next.refresh_token = response
        .refresh_token
        .or_else(|| current.refresh_token.clone());
    next.token_type = response.token_type;
    next.expires_at = expires_at;
    next.refresh_expires_at = refresh_expires_at;
    next.scopes = response.scopes.unwrap_or_else(|| current.scopes.clone());
    next.extra = response.extra;
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::AccessToken;
    use crate::token::ExpiryFields;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 0:00 UTC);

    fn response(expires_in: i64) -> TokenResponse {
        TokenResponse {
            access_token: AccessToken::new("at"),
            refresh_token: None,
            token_type: None,
            expiry: ExpiryFields {
                expires_in: Some(expires_in),
                expires_at_ms: None,
            },
            refresh_expires_in: None,
            scopes: None,
            extra: Default::default(),
        }
    }

    fn merged(expires_in: i64, round_trip: Duration) -> TokenSet {
        let profile = ProviderProfile::generic(url::Url::parse("https://example.com/t").unwrap());
        let current = TokenSet::new(AccessToken::new("old"), T0);
        merge(
            &profile,
            &current,
            response(expires_in),
            T0,
            T0 + round_trip,
        )
    }

    #[test]
    fn a_quick_answer_counts_its_lifetime_from_the_send_instant() {
        let set = merged(3600, Duration::milliseconds(200));
        assert_eq!(set.expires_at, Some(T0 + Duration::hours(1)));
        assert_eq!(set.obtained_at, T0);
    }

    #[test]
    fn an_answer_that_took_half_the_lifetime_is_fresh_on_receipt() {
        for (expires_in, round_trip) in [(1, 600), (2, 5000), (10, 9000)] {
            let received = T0 + Duration::milliseconds(round_trip);
            let set = merged(expires_in, Duration::milliseconds(round_trip));
            assert_eq!(
                set.freshness(received, crate::token::DEFAULT_LEEWAY),
                Freshness::Fresh,
                "{expires_in} s token after {round_trip} ms"
            );
            assert_eq!(
                set.expires_at,
                Some(received + Duration::seconds(expires_in))
            );
        }
    }
}

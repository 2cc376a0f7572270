//! The conformance suite every [`TokenStore`] must pass (feature `conformance`), yours
//! included. Not API-stable: checks are added as the contract is sharpened.
//!
//! ```no_run
//! # async fn run() {
//! use tokenkeeper::store::conformance;
//! let store = tokenkeeper::MemoryStore::new();
//! conformance::run(&store, conformance::Leases::Expiring).await;
//! # }
//! ```
//!
//! Each check panics with a message naming the broken property. Keys are made unique per
//! run, so a shared server can be used.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

use super::{StoreError, TokenStore};
use crate::secret::{AccessToken, RefreshToken};
use crate::token::TokenSet;

/// How the store's leases end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Leases {
    /// Leases expire after their ttl and carry fencing numbers (Memory, Redis, PostgreSQL).
    Expiring,
    /// Leases are held until released or until the holder dies (FileStore's OS locks).
    ProcessBound,
}

/// Runs every check against `store`.
pub async fn run(store: &dyn TokenStore, leases: Leases) {
    load_of_a_missing_key_is_none(store).await;
    save_then_load_round_trips(store).await;
    compare_and_swap_rejects_a_stale_version(store).await;
    keys_are_independent(store).await;
    lease_excludes_a_second_holder(store).await;
    a_dropped_lease_is_released(store).await;
    concurrent_savers_of_one_version_exactly_one_wins(store).await;
    a_lease_on_another_key_cannot_save(store).await;
    if leases == Leases::Expiring {
        an_expired_lease_can_be_taken_over(store).await;
        an_expired_holder_cannot_overwrite_a_newer_token(store).await;
        an_expired_lease_refuses_saves(store).await;
        a_late_release_does_not_free_a_newer_lease(store).await;
        fencing_numbers_grow_with_every_grant(store).await;
        a_renewed_lease_outlives_its_first_ttl(store).await;
        an_expired_or_taken_lease_cannot_be_renewed(store).await;
    } else {
        a_lease_that_never_expires_needs_no_renewal(store).await;
    }
    key_checks_are_consistent(store).await;
    keys_lists_what_was_saved(store).await;
    due_lists_the_grants_to_keep_alive(store).await;
    watch_reports_every_save(store).await;
    delete_removes_a_key_under_its_lease_only(store).await;
}

/// Persistence: what `first` saved, `second` (a new instance over the same storage) loads.
pub async fn persists_across_instances(first: &dyn TokenStore, second: &dyn TokenStore) {
    let key = unique_key("persist");
    let set = sample("persisted");
    let lease = first.lease(&key, ttl()).await.expect("lease");
    let version = first.save(&key, &set, None, &lease).await.expect("save");
    lease.release().await.expect("release");
    let loaded = second
        .load(&key)
        .await
        .expect("load")
        .expect("a saved set persists");
    assert_eq!(loaded.value, set, "a new instance loads what was saved");
    assert_eq!(loaded.version, version, "and at the same version");
}

/// A token set whose tokens are named after `tag`.
pub fn sample(tag: &str) -> TokenSet {
    let now = OffsetDateTime::from_unix_timestamp(OffsetDateTime::now_utc().unix_timestamp())
        .expect("now is representable");
    let mut set = TokenSet::new(AccessToken::new(format!("at-{tag}")), now);
    set.refresh_token = Some(RefreshToken::new(format!("rt-{tag}")));
    set.expires_at = Some(now + time::Duration::hours(1));
    set.refresh_expires_at = Some(now + time::Duration::days(180));
    set.scopes = vec!["read".into(), "write".into()];
    set.token_type = Some("bearer".into());
    set.extra.insert("user_id".into(), 42.into());
    set
}

/// A key no earlier run used.
pub fn unique_key(what: &str) -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    format!(
        "conformance:{what}:{}:{}:{}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    )
}

fn ttl() -> Duration {
    Duration::from_secs(10)
}

/// `keys` lists saved keys (with odd characters intact) and not keys only leased; a store
/// that cannot list says so.
async fn keys_lists_what_was_saved(store: &dyn TokenStore) {
    let saved = [unique_key("list A/b c%41"), unique_key("list-two.x")];
    for key in &saved {
        let lease = store.lease(key, ttl()).await.expect("lease");
        store
            .save(key, &sample("listed"), None, &lease)
            .await
            .expect("save");
        lease.release().await.expect("release");
    }
    let leased_only = unique_key("list-leased-only");
    let lease = store.lease(&leased_only, ttl()).await.expect("lease");
    let listed = store.keys().await;
    lease.release().await.expect("release");
    match listed {
        Err(StoreError::Unsupported(_)) => {}
        Err(e) => panic!("keys failed: {e}"),
        Ok(keys) => {
            for key in &saved {
                assert!(keys.contains(key), "keys lists the saved key {key:?}");
            }
            assert!(
                !keys.contains(&leased_only),
                "keys does not list a key that was only leased"
            );
            assert!(keys.is_sorted(), "keys are sorted");
        }
    }
}

/// A watch reports each save with the version it returned, after the save can be read;
/// a refused save is not reported; a `Resync` stands for saves it may have missed (the
/// store, read again, shows them). Once the watch has reported anything, a save is
/// reported as such (a `Resync` in between, a subscription lost, gets another try). A
/// store that cannot watch says so.
async fn watch_reports_every_save(store: &dyn TokenStore) {
    use futures_util::StreamExt;
    let mut watch = match store.watch() {
        Err(StoreError::Unsupported(_)) => return,
        Err(e) => panic!("watch failed: {e}"),
        Ok(watch) => watch,
    };
    let key = unique_key("watch");
    let mut version = save_leased(store, &key, &sample("watch-1"), None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut next = async || {
        tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("saves are reported within seconds")
            .expect("the watch goes on")
    };
    // The watch is established once it reports the first save, or a resync after which
    // the store shows it.
    loop {
        match next().await {
            super::Change::Saved {
                key: saved,
                version: v,
            } if saved == key => {
                assert_eq!(v, version, "the version the save returned");
                break;
            }
            super::Change::Saved { .. } => {}
            super::Change::Resync => {
                if store.load(&key).await.expect("load").map(|s| s.version) == Some(version) {
                    break;
                }
            }
        }
    }
    for attempt in 0.. {
        assert!(attempt < 3, "three saves in a row were not reported");
        let lease = store.lease(&key, ttl()).await.expect("lease");
        let refused = store
            .save(&key, &sample("watch-refused"), None, &lease)
            .await;
        assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
        lease.release().await.expect("release");
        let previous = version;
        version = save_leased(store, &key, &sample("watch-n"), Some(previous)).await;
        loop {
            match next().await {
                // An earlier save, reported late.
                super::Change::Saved {
                    key: saved,
                    version: v,
                } if saved == key && v <= previous => {}
                super::Change::Saved {
                    key: saved,
                    version: v,
                } if saved == key => {
                    assert_eq!(
                        v, version,
                        "the save's version; nothing for the refused one"
                    );
                    let stored = store.load(&key).await.expect("load").expect("saved");
                    assert!(stored.version >= v, "reported before it could be read");
                    return;
                }
                // Another key's save (a store shared with other checks).
                super::Change::Saved { .. } => {}
                // A lost subscription: try again.
                super::Change::Resync => break,
            }
        }
    }
}

/// `delete` removes a key's set under the key's lease, and only then: afterwards nothing
/// is loaded, listed or due for it, and the key can be saved anew. A lease on another
/// key removes nothing; an absent key is no error. A store that cannot delete says so.
async fn delete_removes_a_key_under_its_lease_only(store: &dyn TokenStore) {
    let key = unique_key("delete");
    let lease = store.lease(&key, ttl()).await.expect("lease");
    let absent = store.delete(&key, &lease).await;
    lease.release().await.expect("release");
    match absent {
        Err(StoreError::Unsupported(_)) => return,
        Err(e) => panic!("deleting an absent key failed: {e}"),
        Ok(()) => {}
    }
    let set = sample("delete");
    assert!(set.keep_alive_at().is_some(), "the sample is due some day");
    save_leased(store, &key, &set, None).await;

    let other = unique_key("delete-other");
    let other_lease = store.lease(&other, ttl()).await.expect("lease");
    let refused = store.delete(&key, &other_lease).await;
    other_lease.release().await.expect("release");
    assert!(
        matches!(refused, Err(StoreError::LeaseLost)),
        "another key's lease deletes nothing: {refused:?}"
    );
    assert!(
        store.load(&key).await.expect("load").is_some(),
        "still there"
    );

    let lease = store.lease(&key, ttl()).await.expect("lease");
    store.delete(&key, &lease).await.expect("delete");
    lease.release().await.expect("release");
    assert!(store.load(&key).await.expect("load").is_none(), "deleted");
    match store.keys().await {
        Ok(keys) => assert!(!keys.contains(&key), "keys no longer lists it"),
        Err(StoreError::Unsupported(_)) => {}
        Err(e) => panic!("keys failed: {e}"),
    }
    let far = OffsetDateTime::now_utc() + time::Duration::days(3650);
    match store.due(far, 100_000).await {
        Ok(due) => assert!(!due.contains(&key), "due no longer lists it"),
        Err(StoreError::Unsupported(_)) => {}
        Err(e) => panic!("due failed: {e}"),
    }
    let version = save_leased(store, &key, &set, None).await;
    assert_eq!(
        store.load(&key).await.expect("load").map(|s| s.version),
        Some(version),
        "saved anew from nothing"
    );
}

/// Saves `set` under `key` (expecting `expected`) under a lease of its own; returns the
/// new version.
async fn save_leased(
    store: &dyn TokenStore,
    key: &str,
    set: &TokenSet,
    expected: Option<u64>,
) -> u64 {
    let lease = store.lease(key, ttl()).await.expect("lease");
    let version = store.save(key, set, expected, &lease).await.expect("save");
    lease.release().await.expect("release");
    version
}

/// `due` lists exactly the keys whose stored set's keep-alive instant is at or before the
/// bound, earliest first, at most `limit`; a set without a refresh token never; a save
/// moves the key (out, in, earlier), a refused save does not. A store that cannot answer
/// says so.
///
/// The instants are in 1971 (offset per run, to the millisecond, so that runs never tie),
/// earlier than any real grant's. Only this check's keys are looked at, except for
/// `limit`: `due(at, n)` must be the first `n` of everything due at `at`, whoever saved
/// it (keys an earlier, interrupted run left due in 1971 included).
async fn due_lists_the_grants_to_keep_alive(store: &dyn TokenStore) {
    use time::Duration as Span;
    match store.due(OffsetDateTime::UNIX_EPOCH, 1).await {
        Err(StoreError::Unsupported(_)) => return,
        Err(e) => panic!("due failed: {e}"),
        Ok(_) => {}
    }
    let offset_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000 % 10_000_000_000;
    let base = time::macros::datetime!(1971-01-02 0:00 UTC)
        + Span::milliseconds(i64::try_from(offset_ms).expect("under 10^10"));
    // A set obtained `obtained_s` after `base` whose refresh token lives `lifetime_s`.
    let refreshable = |tag: &str, obtained_s: i64, lifetime_s: i64| {
        let mut set = sample(tag);
        set.obtained_at = base + Span::seconds(obtained_s);
        set.expires_at = Some(set.obtained_at + Span::hours(1));
        set.refresh_expires_at = Some(set.obtained_at + Span::seconds(lifetime_s));
        set
    };
    let keep_alive = |set: &TokenSet| set.keep_alive_at().expect("a keep-alive instant");
    let (early, middle, late) = (
        unique_key("due-early"),
        unique_key("due-middle"),
        unique_key("due-late"),
    );
    let without_refresh = unique_key("due-no-refresh-token");
    let early_set = refreshable("due-early", 0, 500);
    let middle_set = refreshable("due-middle", 100, 1000);
    let late_set = refreshable("due-late", 1000, 1000);
    let mut no_refresh_set = refreshable("due-none", 0, 500);
    no_refresh_set.refresh_token = None;
    let (at_early, at_middle, at_late) = (
        keep_alive(&early_set),
        keep_alive(&middle_set),
        keep_alive(&late_set),
    );
    assert!(at_early < at_middle && at_middle < at_late, "test premise");
    assert!(no_refresh_set.keep_alive_at().is_none(), "test premise");

    // Saved out of order.
    let v_middle = save_leased(store, &middle, &middle_set, None).await;
    save_leased(store, &without_refresh, &no_refresh_set, None).await;
    let v_late = save_leased(store, &late, &late_set, None).await;
    let v_early = save_leased(store, &early, &early_set, None).await;

    let ours = [
        early.as_str(),
        middle.as_str(),
        late.as_str(),
        without_refresh.as_str(),
    ];
    let due = async |before: OffsetDateTime| -> Vec<String> {
        store
            .due(before, usize::MAX)
            .await
            .expect("due")
            .into_iter()
            .filter(|key| ours.contains(&key.as_str()))
            .collect()
    };
    let ms = Span::milliseconds(1);
    assert_eq!(
        due(at_late).await,
        [early.as_str(), middle.as_str(), late.as_str()],
        "due lists the keys due at or before the bound, earliest first, and never a set \
         without a refresh token"
    );
    assert_eq!(
        due(at_late - ms).await,
        [early.as_str(), middle.as_str()],
        "a key due after the bound is not listed"
    );
    assert!(
        due(at_early - ms).await.is_empty(),
        "nothing is due before the earliest instant"
    );

    let everything = store.due(at_late, usize::MAX).await.expect("due");
    for limit in [0, 1, 2, 3] {
        let limited = store.due(at_late, limit).await.expect("due");
        assert_eq!(
            limited,
            everything[..limit.min(everything.len())],
            "due(at, {limit}) is the first {limit} of everything due at `at`"
        );
    }

    // A refused save moves nothing.
    let stale = refreshable("due-stale", -1000, 500);
    let lease = store.lease(&middle, ttl()).await.expect("lease");
    let refused = store.save(&middle, &stale, None, &lease).await;
    lease.release().await.expect("release");
    assert!(
        matches!(refused, Err(StoreError::Conflict)),
        "got {refused:?}"
    );
    assert!(
        due(keep_alive(&stale)).await.is_empty(),
        "a save refused by the compare-and-swap does not move its key"
    );

    // A later instant moves the key out; no refresh token moves it out; an earlier one
    // moves it first.
    let v_early = save_leased(store, &early, &sample("due-later"), Some(v_early)).await;
    assert_eq!(
        due(at_late).await,
        [middle.as_str(), late.as_str()],
        "a key saved with a later keep-alive instant is no longer due"
    );
    let mut revoked = middle_set.clone();
    revoked.refresh_token = None;
    let v_middle = save_leased(store, &middle, &revoked, Some(v_middle)).await;
    assert_eq!(
        due(at_late).await,
        [late.as_str()],
        "a key saved without a refresh token is no longer due"
    );
    let earlier = refreshable("due-earlier", -1000, 500);
    let v_late = save_leased(store, &late, &earlier, Some(v_late)).await;
    assert_eq!(
        due(keep_alive(&earlier)).await,
        [late.as_str()],
        "a key saved with an earlier instant is due from then"
    );

    // Nothing of this check stays due in 1971.
    save_leased(store, &late, &sample("due-done"), Some(v_late)).await;
    save_leased(store, &middle, &middle_set, Some(v_middle)).await;
    save_leased(store, &early, &sample("due-done"), Some(v_early)).await;
    assert_eq!(
        due(at_late).await,
        [middle.as_str()],
        "a key saved due again is listed again"
    );
    let v_middle = store
        .load(&middle)
        .await
        .expect("load")
        .expect("saved")
        .version;
    save_leased(store, &middle, &sample("due-done"), Some(v_middle)).await;
    assert!(due(at_late).await.is_empty(), "every key moved out");
}

async fn load_of_a_missing_key_is_none(store: &dyn TokenStore) {
    let got = store.load(&unique_key("missing")).await.expect("load");
    assert!(got.is_none(), "a key never saved loads as None");
}

async fn save_then_load_round_trips(store: &dyn TokenStore) {
    let key = unique_key("roundtrip");
    let lease = store.lease(&key, ttl()).await.expect("lease");
    let first = sample("one");
    let v1 = store
        .save(&key, &first, None, &lease)
        .await
        .expect("first save");
    let loaded = store.load(&key).await.expect("load").expect("saved");
    assert_eq!(loaded.value, first, "load returns exactly what was saved");
    assert_eq!(loaded.version, v1, "with the version save returned");
    let second = sample("two");
    let v2 = store
        .save(&key, &second, Some(v1), &lease)
        .await
        .expect("second save");
    assert_ne!(v1, v2, "every save makes a new version");
    let loaded = store.load(&key).await.expect("load").expect("saved");
    assert_eq!((loaded.value, loaded.version), (second, v2));
    lease.release().await.expect("release");
}

async fn compare_and_swap_rejects_a_stale_version(store: &dyn TokenStore) {
    let key = unique_key("cas");
    let lease = store.lease(&key, ttl()).await.expect("lease");
    let two = sample("two");
    let v1 = store
        .save(&key, &sample("one"), None, &lease)
        .await
        .expect("save");
    let v2 = store
        .save(&key, &two, Some(v1), &lease)
        .await
        .expect("save");
    let stale = store.save(&key, &sample("stale"), Some(v1), &lease).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict)),
        "a save at an old version is a Conflict, got {stale:?}"
    );
    let absent = store.save(&key, &sample("absent"), None, &lease).await;
    assert!(
        matches!(absent, Err(StoreError::Conflict)),
        "expecting absence over a stored set is a Conflict, got {absent:?}"
    );
    let loaded = store.load(&key).await.expect("load").expect("saved");
    assert_eq!(
        (loaded.value, loaded.version),
        (two, v2),
        "a failed CAS writes nothing"
    );
    lease.release().await.expect("release");
}

async fn keys_are_independent(store: &dyn TokenStore) {
    let base = unique_key("keys");
    let (a, b) = (format!("{base}/a:1"), format!("{base}/a_1"));
    let (set_a, set_b) = (sample("a"), sample("b"));
    for (key, set) in [(&a, &set_a), (&b, &set_b)] {
        let lease = store.lease(key, ttl()).await.expect("lease");
        store.save(key, set, None, &lease).await.expect("save");
        lease.release().await.expect("release");
    }
    assert_eq!(store.load(&a).await.expect("load").expect("a").value, set_a);
    assert_eq!(store.load(&b).await.expect("load").expect("b").value, set_b);
}

async fn a_dropped_lease_is_released(store: &dyn TokenStore) {
    let key = unique_key("dropped");
    // A holder whose future was cancelled drops its lease without releasing it.
    drop(store.lease(&key, ttl()).await.expect("lease"));
    let again = tokio::time::timeout(Duration::from_secs(3), store.lease(&key, ttl())).await;
    assert!(
        matches!(again, Ok(Ok(_))),
        "a dropped lease is released long before its ttl runs out"
    );
}

async fn lease_excludes_a_second_holder(store: &dyn TokenStore) {
    let key = unique_key("exclusion");
    let held = store.lease(&key, ttl()).await.expect("lease");
    let second = store.lease(&key, Duration::from_millis(300)).await;
    assert!(
        matches!(second, Err(StoreError::LeaseTimeout { .. })),
        "a second holder must wait, then time out, got {second:?}"
    );
    held.release().await.expect("release");
    let after = tokio::time::timeout(Duration::from_secs(5), store.lease(&key, ttl())).await;
    assert!(
        matches!(after, Ok(Ok(_))),
        "a released lease can be taken again at once"
    );
}

async fn concurrent_savers_of_one_version_exactly_one_wins(store: &dyn TokenStore) {
    let key = unique_key("savers");
    let lease = store.lease(&key, ttl()).await.expect("lease");
    let v1 = store
        .save(&key, &sample("base"), None, &lease)
        .await
        .expect("save");
    lease.release().await.expect("release");
    let wins = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let wins = Arc::clone(&wins);
        let key = key.clone();
        // Each saver read v1, then saves under its own lease.
        let store: &dyn TokenStore = store;
        tasks.push(async move {
            let lease = store.lease(&key, ttl()).await.expect("lease");
            match store
                .save(&key, &sample(&format!("saver{i}")), Some(v1), &lease)
                .await
            {
                Ok(_) => {
                    wins.fetch_add(1, Ordering::SeqCst);
                }
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("a losing saver gets Conflict, got {e:?}"),
            }
            lease.release().await.expect("release");
        });
    }
    futures_util::future::join_all(tasks).await;
    assert_eq!(
        wins.load(Ordering::SeqCst),
        1,
        "exactly one saver of a version wins"
    );
}

async fn an_expired_lease_can_be_taken_over(store: &dyn TokenStore) {
    let key = unique_key("takeover");
    let first = store
        .lease(&key, Duration::from_millis(200))
        .await
        .expect("lease");
    let second = tokio::time::timeout(Duration::from_secs(5), store.lease(&key, ttl())).await;
    let second = second
        .expect("an expired lease is taken over in time")
        .expect("lease");
    assert!(
        second.fencing() > first.fencing(),
        "fencing numbers grow: {} then {}",
        first.fencing(),
        second.fencing()
    );
    drop(first);
    second.release().await.expect("release");
}

async fn an_expired_holder_cannot_overwrite_a_newer_token(store: &dyn TokenStore) {
    let key = unique_key("fencing");
    let setup = store.lease(&key, ttl()).await.expect("lease");
    let v1 = store
        .save(&key, &sample("old"), None, &setup)
        .await
        .expect("save");
    setup.release().await.expect("release");

    let paused = store
        .lease(&key, Duration::from_millis(200))
        .await
        .expect("lease");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newer = store.lease(&key, ttl()).await.expect("takeover");
    let new = sample("new");
    let v2 = store
        .save(&key, &new, Some(v1), &newer)
        .await
        .expect("save");
    newer.release().await.expect("release");

    let late = store.save(&key, &sample("late"), Some(v2), &paused).await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost)),
        "a holder whose lease expired is fenced off, got {late:?}"
    );
    let loaded = store.load(&key).await.expect("load").expect("saved");
    assert_eq!(loaded.value, new, "the newer token stays");
}

async fn a_lease_on_another_key_cannot_save(store: &dyn TokenStore) {
    let base = unique_key("otherkey");
    let (a, b) = (format!("{base}:a"), format!("{base}:b"));
    let lease_a = store.lease(&a, ttl()).await.expect("lease");
    let wrong = store.save(&b, &sample("wrong"), None, &lease_a).await;
    assert!(
        matches!(wrong, Err(StoreError::LeaseLost)),
        "a lease on one key does not allow writing another, got {wrong:?}"
    );
    lease_a.release().await.expect("release");
    assert!(
        store.load(&b).await.expect("load").is_none(),
        "the refused save wrote nothing"
    );
}

async fn an_expired_lease_refuses_saves(store: &dyn TokenStore) {
    let key = unique_key("expired-save");
    let setup = store.lease(&key, ttl()).await.expect("lease");
    let kept = sample("kept");
    let v1 = store.save(&key, &kept, None, &setup).await.expect("save");
    setup.release().await.expect("release");

    let short = store
        .lease(&key, Duration::from_millis(200))
        .await
        .expect("lease");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Nobody took the lease over, and the version is right: still refused.
    let late = store.save(&key, &sample("late"), Some(v1), &short).await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost)),
        "a save after the lease expired is refused even if nobody took it over, got {late:?}"
    );
    let loaded = store.load(&key).await.expect("load").expect("saved");
    assert_eq!(
        (loaded.value, loaded.version),
        (kept, v1),
        "the refused save wrote nothing"
    );
    drop(short);
}

async fn a_late_release_does_not_free_a_newer_lease(store: &dyn TokenStore) {
    let key = unique_key("late-release");
    let expired = store
        .lease(&key, Duration::from_millis(200))
        .await
        .expect("lease");
    let newer = tokio::time::timeout(Duration::from_secs(5), store.lease(&key, ttl()))
        .await
        .expect("an expired lease is taken over in time")
        .expect("lease");
    let _ = expired.release().await;
    let third = store.lease(&key, Duration::from_millis(300)).await;
    assert!(
        matches!(third, Err(StoreError::LeaseTimeout { .. })),
        "releasing an expired lease must not free its successor's, got {third:?}"
    );
    let saved = store.save(&key, &sample("newer"), None, &newer).await;
    assert!(saved.is_ok(), "the successor still writes, got {saved:?}");
    newer.release().await.expect("release");
}

async fn fencing_numbers_grow_with_every_grant(store: &dyn TokenStore) {
    let key = unique_key("fencing-grows");
    let mut last = None;
    for _ in 0..3 {
        let lease = store.lease(&key, ttl()).await.expect("lease");
        if let Some(last) = last {
            assert!(
                lease.fencing() > last,
                "fencing numbers grow across release and re-grant: {last} then {}",
                lease.fencing()
            );
        }
        last = Some(lease.fencing());
        lease.release().await.expect("release");
    }
}

/// Whether `store` renews leases at all (the default [`TokenStore::renew`] does not).
async fn renews(store: &dyn TokenStore) -> bool {
    let key = unique_key("renew-probe");
    let lease = store.lease(&key, ttl()).await.expect("lease");
    let renewed = store.renew(&key, &lease, ttl()).await;
    lease.release().await.expect("release");
    match renewed {
        Ok(()) => true,
        Err(StoreError::Unsupported(_)) => false,
        Err(e) => panic!("renewing a lease just granted failed: {e:?}"),
    }
}

async fn a_renewed_lease_outlives_its_first_ttl(store: &dyn TokenStore) {
    if !renews(store).await {
        return;
    }
    let key = unique_key("renewed");
    let short = Duration::from_millis(400);
    let lease = store.lease(&key, short).await.expect("lease");
    let first_expiry = lease.expires_at().expect("an expiring lease");
    tokio::time::sleep(Duration::from_millis(250)).await;
    store.renew(&key, &lease, short).await.expect("renew");
    assert!(
        lease.expires_at().expect("still expiring") > first_expiry,
        "renew records the new expiry on the lease"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Past the first ttl, within the renewed one: still held, still writes.
    let other = store.lease(&key, Duration::from_millis(50)).await;
    assert!(
        matches!(other, Err(StoreError::LeaseTimeout { .. })),
        "a renewed lease still excludes others past its first ttl, got {other:?}"
    );
    let saved = store.save(&key, &sample("renewed"), None, &lease).await;
    assert!(saved.is_ok(), "a renewed lease still writes, got {saved:?}");
    lease.release().await.expect("release");
}

async fn an_expired_or_taken_lease_cannot_be_renewed(store: &dyn TokenStore) {
    if !renews(store).await {
        return;
    }
    let key = unique_key("renew-expired");
    let expired = store
        .lease(&key, Duration::from_millis(150))
        .await
        .expect("lease");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let renewed = store.renew(&key, &expired, ttl()).await;
    assert!(
        matches!(renewed, Err(StoreError::LeaseLost)),
        "an expired lease cannot be renewed, got {renewed:?}"
    );
    let newer = store.lease(&key, ttl()).await.expect("takeover");
    let renewed = store.renew(&key, &expired, ttl()).await;
    assert!(
        matches!(renewed, Err(StoreError::LeaseLost)),
        "a lease taken over cannot be renewed, got {renewed:?}"
    );
    let saved = store.save(&key, &sample("newer"), None, &newer).await;
    assert!(saved.is_ok(), "the successor still writes, got {saved:?}");
    newer.release().await.expect("release");
    drop(expired);
}

async fn a_lease_that_never_expires_needs_no_renewal(store: &dyn TokenStore) {
    let key = unique_key("renew-bound");
    let lease = store.lease(&key, ttl()).await.expect("lease");
    assert!(
        lease.expires_at().is_none(),
        "a process-bound lease has no expiry"
    );
    store
        .renew(&key, &lease, ttl())
        .await
        .expect("renewing a lease that never expires is a no-op");
    lease.release().await.expect("release");
}

async fn key_checks_are_consistent(store: &dyn TokenStore) {
    let key = unique_key("checked");
    store
        .check_key(&key)
        .expect("an ordinary key passes check_key");
    assert!(
        store.check_key("").is_err(),
        "check_key refuses the empty key"
    );
}

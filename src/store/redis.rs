//! [`RedisStore`]: token sets in Redis, shared by every machine that reaches the server
//! (feature `redis`).
//!
//! # Layout
//!
//! For a store key `k` and the prefix `p` (default `"tokenkeeper:"`):
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `p` `token:` `k` | hash | `version` (decimal) and `body` (the token set as [`super::encode`] writes it, version included) |
//! | `p` `lease:` `k` | string | `<owner>:<fencing>` of the lease holder, with a `PX` expiry of the lease's ttl |
//! | `p` `fencing:` `k` | string | the fencing counter, `INCR`ed for every lease granted |
//! | `p` `due` | sorted set | member `k` for every key whose stored set has a [`TokenSet::keep_alive_at`], scored with that instant in milliseconds since the Unix epoch ([`TokenStore::due`]) |
//!
//! The save script that writes `p` `token:` `k` also adds `k` to `p` `due` (or removes it,
//! when the new set has no keep-alive instant), in the same script, so the index never
//! disagrees with the stored sets. A token hash deleted by hand should be removed from
//! `p` `due` too (`ZREM`), or `due` keeps listing its key.
//!
//! # Upgrading from a version without the due index
//!
//! Sets saved by a version without `p` `due` are not in it, so [`TokenStore::due`] never
//! lists them until their next save: an idle grant, the very one a sweep exists for,
//! would expire. Once every replica runs this version, call [`RedisStore::backfill_due`]
//! once (idempotent, and safe while the store is in use). As a reminder, the first `due`
//! of each store looks at one `SCAN` page (`COUNT 100`) of token hashes and logs a
//! warning naming `backfill_due` when it finds a set with a keep-alive instant that is
//! missing from the index. (A replica still running the earlier version writes sets the
//! index misses: backfill after the last one is gone, or again.)
//!
//! # Leases and fencing
//!
//! A lease is taken by one Lua script that `INCR`s the key's fencing counter and sets the
//! lease key to `<owner>:<fencing>` with a `PX ttl` expiry, if no other owner holds it (the
//! owner is 128 random bits per lease): Redis expires it `ttl` after the grant, so a
//! holder that dies releases it by expiry. A waiting taker polls every few milliseconds
//! for up to `ttl`, then gives up with [`StoreError::LeaseTimeout`]. The grant is
//! idempotent for its owner: when a request fails (its answer may be lost), the taker
//! asks again as the same owner and gets the lease it was already granted; if it gives
//! up, it frees any grant made to it as soon as the server answers. A holder renews its
//! lease with a Lua compare-and-`PEXPIRE` ([`TokenStore::renew`]).
//!
//! # Durability
//!
//! A key Redis loses (a restart without persistence, an eviction) can make the refresh
//! protocol present a refresh token the provider already saw. Run Redis with
//! `appendonly yes` and `maxmemory-policy noeviction`; [`RedisStore::connect`] reads the
//! server's configuration and warns when it can lose keys.
//!
//! A save is one Lua script that writes only if the lease key still holds this lease's
//! `<owner>:<fencing>` (otherwise [`StoreError::LeaseLost`]: the lease expired, and maybe a
//! newer holder has it) and the stored version is the expected one (otherwise
//! [`StoreError::Conflict`]). A holder paused past its lease's expiry can therefore never
//! overwrite what a newer holder wrote. Release is a Lua compare-and-delete of the lease
//! key, so a late release never frees somebody else's lease.
//!
//! Lease expiry is judged by the Redis server's clock alone.
//!
//! The store speaks to one Redis server (or a primary); it does not use Redis Cluster
//! hash tags.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    LEASE_ERRORS_TOLERATED, Lease, LeaseRelease, StoreError, TokenStore, Versioned, deadline_from,
    decode, encode, next_version, poll_lease,
};
use crate::token::TokenSet;

/// Takes the lease: `KEYS[1]` lease key, `KEYS[2]` fencing counter; `ARGV[1]` owner,
/// `ARGV[2]` ttl in ms. Returns the fencing number, or -1 and the lease's remaining
/// milliseconds when another owner holds it. Idempotent for one owner: a retry after a
/// lost answer gets the lease it was already granted (its expiry reset to the ttl).
const ACQUIRE: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local prefix = ARGV[1] .. ':'
  if string.sub(current, 1, #prefix) == prefix then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(string.sub(current, #prefix + 1)), 0}
  end
  return {-1, redis.call('PTTL', KEYS[1])}
end
local fencing = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fencing, 'PX', ARGV[2])
return {fencing, 0}
";

/// Extends a held lease: `KEYS[1]` lease key; `ARGV[1]` `<owner>:<fencing>`, `ARGV[2]`
/// ttl in ms. Returns 1, or 0 when the lease is no longer this one.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Frees a lease granted to `ARGV[1]` (an owner) whose grant never reached it:
/// `KEYS[1]` lease key.
const RELEASE_OWNER: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Compare-and-delete: `KEYS[1]` lease key; `ARGV[1]` `<owner>:<fencing>`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Fenced compare-and-swap: `KEYS[1]` token hash, `KEYS[2]` lease key, `KEYS[3]` the due
/// index; `ARGV[1]` `<owner>:<fencing>`, `ARGV[2]` expected version (`''`: absent),
/// `ARGV[3]` new version, `ARGV[4]` body, `ARGV[5]` the new set's keep-alive instant in ms
/// (`''`: none), `ARGV[6]` the store key. Returns 1 (written), -1 (lease lost) or -2
/// (version conflict).
///
/// The hash is written first, then the index: a script error is not rolled back, and a
/// script that fails at the `HSET` leaves the key's index entry as it was, which is
/// harmless (the sweep re-reads the set), never an entry removed for a set still stored.
/// At `maxmemory` with `noeviction`, Redis refuses a command that may grow memory
/// (`HSET`, `ZADD`; never `ZREM`) only as a script's first write (it does not stop a
/// script half-way), so a save there is refused whole by its `HSET`, writing nothing.
const SAVE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local current = redis.call('HGET', KEYS[1], 'version')
if current == false then current = '' end
if current ~= ARGV[2] then
  return -2
end
redis.call('HSET', KEYS[1], 'version', ARGV[3], 'body', ARGV[4])
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[3], ARGV[6])
else
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
end
redis.call('PUBLISH', KEYS[4], ARGV[3] .. ' ' .. ARGV[6])
return 1
";

/// Fenced delete: `KEYS[1]` token hash, `KEYS[2]` lease key, `KEYS[3]` the due index;
/// `ARGV[1]` `<owner>:<fencing>`, `ARGV[2]` the store key. Returns 1 (removed, or absent)
/// or -1 (lease lost: nothing removed).
const DELETE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
";

/// Adds a set saved before the due index existed to it: `KEYS[1]` token hash, `KEYS[2]`
/// the due index; `ARGV[1]` the version the set was read at, `ARGV[2]` its keep-alive
/// instant in ms, `ARGV[3]` the store key. Adds nothing if the hash changed since it was
/// read (a save wrote the index itself) or the key is indexed already. Returns how many
/// keys it added (0 or 1).
const BACKFILL: &str = r"
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  return 0
end
return redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[3])
";

/// A [`TokenStore`] in Redis, for applications that run several replicas on several
/// machines. See the [module documentation](self) for the layout and the fencing.
///
/// Cheap to clone: clones share one auto-reconnecting connection. While the server is
/// unreachable every operation fails with [`StoreError::Unavailable`]; the connection is
/// re-established when the server is back.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tokenkeeper::store::redis::RedisStore;
/// let store = RedisStore::connect("redis://127.0.0.1:6379/0").await?
///     .with_prefix("myapp:tokens:");
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    /// For the watch's subscriptions (a connection of their own each).
    client: redis::Client,
    prefix: Arc<str>,
    /// The URL without its password, for Debug.
    redacted_url: Arc<str>,
    scripts: Arc<Scripts>,
    /// What `connect` found that can make the server lose keys.
    durability: Arc<[&'static str]>,
    /// Set by the first [`TokenStore::due`] of this store (and prefix), which looks for
    /// sets saved before the due index existed.
    due_index_checked: Arc<AtomicBool>,
}

struct Scripts {
    acquire: Script,
    backfill: Script,
    delete: Script,
    release: Script,
    release_owner: Script,
    renew: Script,
    save: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The connection string with any password replaced by `***`.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            let query: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password")
                    {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !query.is_empty() {
                parsed.query_pairs_mut().clear().extend_pairs(query);
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// A URL the redis crate refused, described by kind only (its error may quote the URL,
/// password included).
fn invalid_url(e: redis::RedisError) -> StoreError {
    StoreError::Misconfigured(InvalidUrl(format!("{:?}", e.kind())).to_string())
}

/// Whether the URL's host is this machine (`localhost`, `127.0.0.0/8`, `::1`).
fn host_is_loopback(url: &url::Url) -> bool {
    match url.host() {
        // `redis://` is no special scheme to the URL parser: its IP addresses come as
        // names.
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => true,
    }
}

/// Why the URL given to [`RedisStore::connect`] was refused (never quotes it).
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL: {0}")]
struct InvalidUrl(String);

impl RedisStore {
    /// Connects to the Redis server at `url`: `redis://[user[:password]@]host[:port][/db]`,
    /// or `rediss://...` for TLS (rustls; the server's certificate is verified against
    /// the system's root certificates and must name the host: see
    /// [`RedisStore::connect_with_root_certificates`] for a private CA). A plaintext
    /// connection to a host that is not loopback is logged at warn. Fails with
    /// [`StoreError::Misconfigured`] for a URL it cannot use or a Redis Cluster node, and
    /// [`StoreError::Unavailable`] if the server cannot be reached (or its certificate is
    /// refused).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // redis builds its TLS configuration from rustls's process default.
        let _provider = crate::tls::provider();
        let client = redis::Client::open(url).map_err(invalid_url)?;
        Self::connect_client(client, url).await
    }

    /// [`RedisStore::connect`] over TLS (`rediss://`) verifying the server's certificate
    /// against `root_certificates_pem` (one or more PEM certificates: a private CA)
    /// instead of the system's roots.
    pub async fn connect_with_root_certificates(
        url: &str,
        root_certificates_pem: &[u8],
    ) -> Result<Self, StoreError> {
        if !url.starts_with("rediss://") {
            return Err(StoreError::Misconfigured(
                "root certificates are for a TLS connection: the URL must start with rediss://"
                    .into(),
            ));
        }
        let _provider = crate::tls::provider();
        let client = redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_certificates_pem.to_vec()),
            },
        )
        .map_err(invalid_url)?;
        Self::connect_client(client, url).await
    }

    async fn connect_client(client: redis::Client, url: &str) -> Result<Self, StoreError> {
        let redacted_url = redact(url);
        if let Ok(parsed) = url::Url::parse(url)
            && parsed.scheme() == "redis"
            && !host_is_loopback(&parsed)
        {
            tracing::warn!(url = %redacted_url, "connecting to Redis in plaintext over the network: the tokens and the password travel in clear; use rediss://");
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| super::tls_refusal(StoreError::unavailable(e)))?;
        refuse_cluster(&mut connection.clone()).await?;
        Ok(Self {
            connection,
            client,
            prefix: Arc::from("tokenkeeper:"),
            redacted_url: Arc::from(redacted_url),
            scripts: Arc::new(Scripts {
                acquire: Script::new(ACQUIRE),
                backfill: Script::new(BACKFILL),
                delete: Script::new(DELETE),
                release: Script::new(RELEASE),
                release_owner: Script::new(RELEASE_OWNER),
                renew: Script::new(RENEW),
                save: Script::new(SAVE),
            }),
            durability: Arc::from([]),
            due_index_checked: Arc::new(AtomicBool::new(false)),
        }
        .checked_for_durability()
        .await)
    }

    /// What [`RedisStore::connect`] found in the server's configuration that can make it
    /// lose keys (each also logged at warn when connecting); empty when nothing was found
    /// or the configuration could not be read (`CONFIG` disabled).
    pub fn durability_warnings(&self) -> &[&'static str] {
        &self.durability
    }

    /// Warns (once, at connect) when the server can lose keys: a restart without an
    /// append-only file or snapshots, or an eviction policy that may evict keys without
    /// an expiry (`allkeys-*`). A lost key makes every source that knew it restore its
    /// newest set, and one that never did present its initial refresh token, which the
    /// provider may have seen already. Servers that forbid `CONFIG GET` (many managed
    /// ones) are not checked.
    async fn checked_for_durability(mut self) -> Self {
        let mut connection = self.connection.clone();
        let mut values = Vec::new();
        // One parameter per CONFIG GET: Redis before 7 takes only one.
        for name in ["appendonly", "save", "maxmemory-policy", "appendfsync"] {
            let pair: Result<Vec<String>, _> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut connection)
                .await;
            match pair {
                Ok(pair) => values.push(pair.get(1).cloned()),
                Err(_) => {
                    tracing::debug!(url = %self.redacted_url, "cannot read the Redis configuration; durability not checked");
                    return self;
                }
            }
        }
        let warnings = durability_warnings(
            values[0].as_deref(),
            values[1].as_deref(),
            values[2].as_deref(),
            values[3].as_deref(),
        );
        for warning in &warnings {
            tracing::warn!(url = %self.redacted_url, "{warning}");
        }
        self.durability = Arc::from(warnings);
        self
    }

    /// Prefixes every Redis key this store uses with `prefix` (default `"tokenkeeper:"`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self.due_index_checked = Arc::new(AtomicBool::new(false));
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn token_key(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(format!("{}token:{key}", self.prefix))
    }

    /// `lease`'s record, if it is this store's lease on `key` ([`StoreError::LeaseLost`]
    /// otherwise: a write with it changes nothing).
    fn held<'l>(&self, key: &str, lease: &'l Lease) -> Result<&'l RedisLease, StoreError> {
        let lease_key = self.lease_key(key);
        lease
            .guard()
            .and_then(|g| (g as &dyn std::any::Any).downcast_ref::<RedisLease>())
            .filter(|held| held.lease_key == lease_key)
            .ok_or(StoreError::LeaseLost)
    }

    fn lease_key(&self, key: &str) -> String {
        format!("{}lease:{key}", self.prefix)
    }

    fn fencing_key(&self, key: &str) -> String {
        format!("{}fencing:{key}", self.prefix)
    }

    fn due_key(&self) -> String {
        format!("{}due", self.prefix)
    }

    /// The channel the save script publishes `"<version> <key>"` on, for
    /// [`TokenStore::watch`].
    fn saved_channel(&self) -> String {
        format!("{}saved", self.prefix)
    }

    /// The prefix of every token hash (`p` `token:`), and the `SCAN` pattern that matches
    /// them all.
    fn token_pattern(&self) -> (String, String) {
        let token_prefix = format!("{}token:", self.prefix);
        let glob: String = token_prefix
            .chars()
            .flat_map(|c| match c {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        (token_prefix, format!("{glob}*"))
    }

    /// One `SCAN` page of token hashes from `cursor`: the next cursor (0: done) and the
    /// hashes found, with their store keys.
    async fn scan_tokens(
        &self,
        connection: &mut ConnectionManager,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(String, String)>), StoreError> {
        let (token_prefix, pattern) = self.token_pattern();
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(count)
            .query_async(connection)
            .await
            .map_err(StoreError::unavailable)?;
        let found = batch
            .into_iter()
            .filter_map(|hash| {
                let key = hash.strip_prefix(&token_prefix)?.to_owned();
                Some((hash, key))
            })
            .collect();
        Ok((next, found))
    }

    /// Of `hashes` (token hashes and their store keys), the sets that have a keep-alive
    /// instant but are not in the due index (saved before it existed), with the version
    /// each was read at; and the keys whose set could not be read.
    async fn unindexed(
        &self,
        connection: &mut ConnectionManager,
        hashes: &[(String, String)],
    ) -> Result<(Vec<Unindexed>, Vec<StoreError>), StoreError> {
        if hashes.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let due_key = self.due_key();
        let mut scores = redis::pipe();
        for (_, key) in hashes {
            scores.cmd("ZSCORE").arg(&due_key).arg(key);
        }
        let scores: Vec<Option<f64>> = scores
            .query_async(connection)
            .await
            .map_err(StoreError::unavailable)?;
        let missing: Vec<&(String, String)> = hashes
            .iter()
            .zip(scores)
            .filter_map(|(hash, score)| score.is_none().then_some(hash))
            .collect();
        if missing.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut reads = redis::pipe();
        for (hash, _) in &missing {
            reads.cmd("HMGET").arg(hash).arg("version").arg("body");
        }
        let reads: Vec<(Option<String>, Option<Vec<u8>>)> = reads
            .query_async(connection)
            .await
            .map_err(StoreError::unavailable)?;
        let (mut found, mut unreadable) = (Vec::new(), Vec::new());
        for ((hash, key), read) in missing.into_iter().zip(reads) {
            match read {
                // Deleted since the scan.
                (None, None) => {}
                (Some(version), Some(body)) => match decode(key, &body) {
                    Ok(stored) => {
                        if let Some(at) = stored.value.keep_alive_at() {
                            found.push(Unindexed {
                                hash: hash.clone(),
                                key: key.clone(),
                                version,
                                due_ms: epoch_ms(at),
                            });
                        }
                    }
                    Err(e) => unreadable.push(e),
                },
                _ => unreadable.push(StoreError::Corrupt {
                    key: key.clone(),
                    reason: "the Redis hash lacks its version or body field".into(),
                }),
            }
        }
        Ok((found, unreadable))
    }

    /// Adds to the due index (`p` `due`) every stored set that has a keep-alive instant
    /// but is not in it: sets saved by versions before the index existed, which
    /// [`TokenStore::due`] never lists, so that a sweep never keeps them alive, until
    /// their next save. Run it once after upgrading from such a version (the first
    /// [`TokenStore::due`] of a store warns when it finds such sets); it is idempotent,
    /// and safe while the store is in use: it `SCAN`s the token hashes, reads each one
    /// missing from the index, and adds it with a Lua script that writes only if the
    /// hash still holds the version it read (a save in between indexed the key itself).
    /// A set that cannot be read is left out, logged at warn. Returns how many keys it
    /// added.
    pub async fn backfill_due(&self) -> Result<u64, StoreError> {
        let due_key = self.due_key();
        let mut connection = self.connection.clone();
        let (mut cursor, mut added) = (0u64, 0u64);
        loop {
            let (next, hashes) = self.scan_tokens(&mut connection, cursor, 1000).await?;
            let (found, unreadable) = self.unindexed(&mut connection, &hashes).await?;
            for e in unreadable {
                tracing::warn!(error = %e, "backfilling the Redis due index: skipped an unreadable token set");
            }
            for set in found {
                let indexed: i64 = self
                    .scripts
                    .backfill
                    .key(&set.hash)
                    .key(&due_key)
                    .arg(&set.version)
                    .arg(set.due_ms)
                    .arg(&set.key)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(StoreError::unavailable)?;
                added += u64::try_from(indexed).unwrap_or(0);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tracing::info!(prefix = %self.prefix, added, "backfilled the Redis due index");
        Ok(added)
    }

    /// Looks at one `SCAN` page of token hashes for sets saved before the due index
    /// existed, and warns if it finds one: they are never due until their next save.
    async fn check_due_index(&self) {
        let mut connection = self.connection.clone();
        let sample = async {
            let (_, hashes) = self.scan_tokens(&mut connection, 0, 100).await?;
            let (found, _) = self.unindexed(&mut connection, &hashes).await?;
            Ok::<_, StoreError>((hashes.len(), found.len()))
        };
        match sample.await {
            Ok((_, 0)) => {}
            Ok((sampled, unindexed)) => tracing::warn!(
                prefix = %self.prefix,
                sampled,
                unindexed,
                "token sets saved before the Redis due index existed are never due, so no \
                 sweep keeps them alive: call RedisStore::backfill_due() once"
            ),
            Err(e) => {
                tracing::debug!(error = %e, "could not check the Redis due index for sets saved before it");
            }
        }
    }
}

/// A stored set with a keep-alive instant that is not in the due index.
struct Unindexed {
    hash: String,
    key: String,
    /// The hash's `version` field when it was read.
    version: String,
    due_ms: i64,
}

/// `at` in whole milliseconds since the Unix epoch (rounded down): the due index's score.
fn epoch_ms(at: OffsetDateTime) -> i64 {
    let ms = at.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "empty",
        });
    }
    Ok(())
}

#[async_trait]
impl TokenStore for RedisStore {
    /// Subscribes to the channel the save script publishes on (`p` `saved`), on a
    /// connection of its own, from a task (call it inside a tokio runtime). It starts
    /// with a [`Change::Resync`](super::Change::Resync) once subscribed (saves between the
    /// call and the subscription are covered by it), and after every lost subscription
    /// it subscribes again (100 ms doubling to 5 s) and sends another. It ends when the
    /// watch is dropped.
    fn watch(&self) -> Result<super::Watch, StoreError> {
        let (sender, receiver) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(subscribe(
            self.client.clone(),
            self.saved_channel(),
            Arc::clone(&self.redacted_url),
            sender,
        ));
        Ok(Box::pin(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move { receiver.recv().await.map(|change| (change, receiver)) },
        )))
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut connection = self.connection.clone();
        let (mut cursor, mut keys) = (0u64, Vec::new());
        loop {
            let (next, batch) = self.scan_tokens(&mut connection, cursor, 1000).await?;
            keys.extend(batch.into_iter().map(|(_, key)| key));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        if !self.due_index_checked.swap(true, Ordering::Relaxed) {
            self.check_due_index().await;
        }
        let mut connection = self.connection.clone();
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.due_key())
            .arg("-inf")
            .arg(epoch_ms(before))
            .arg("LIMIT")
            .arg(0)
            .arg(i64::try_from(limit).unwrap_or(i64::MAX))
            .query_async(&mut connection)
            .await
            .map_err(StoreError::unavailable)
    }

    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        let token_key = self.token_key(key)?;
        let mut connection = self.connection.clone();
        let (version, body): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&token_key)
            .arg("version")
            .arg("body")
            .query_async(&mut connection)
            .await
            .map_err(StoreError::unavailable)?;
        let (version, body) = match (version, body) {
            (None, None) => return Ok(None),
            (Some(version), Some(body)) => (version, body),
            _ => {
                return Err(StoreError::Corrupt {
                    key: key.to_owned(),
                    reason: "the Redis hash lacks its version or body field".into(),
                });
            }
        };
        let versioned = decode(key, &body)?;
        if version.parse::<u64>().ok() != Some(versioned.version) {
            return Err(StoreError::Corrupt {
                key: key.to_owned(),
                reason: "the version field disagrees with the stored record".into(),
            });
        }
        Ok(Some(versioned))
    }

    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        let token_key = self.token_key(key)?;
        let held = self.held(key, lease)?;
        let version = next_version(key, expected)?;
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let due_at = token
            .keep_alive_at()
            .map(|at| epoch_ms(at).to_string())
            .unwrap_or_default();
        let mut connection = self.connection.clone();
        let outcome: i64 = self
            .scripts
            .save
            .key(&token_key)
            .key(&held.lease_key)
            .key(self.due_key())
            .key(self.saved_channel())
            .arg(&held.value)
            .arg(expected)
            .arg(version.to_string())
            .arg(encode(token, version))
            .arg(due_at)
            .arg(key)
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::unavailable)?;
        match outcome {
            1 => Ok(version),
            -1 => Err(StoreError::LeaseLost),
            _ => Err(StoreError::Conflict),
        }
    }

    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let token_key = self.token_key(key)?;
        let held = self.held(key, lease)?;
        let mut connection = self.connection.clone();
        let outcome: i64 = self
            .scripts
            .delete
            .key(&token_key)
            .key(&held.lease_key)
            .key(self.due_key())
            .arg(&held.value)
            .arg(key)
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::unavailable)?;
        match outcome {
            1 => Ok(()),
            _ => Err(StoreError::LeaseLost),
        }
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        check_key(key)?;
        let lease_key = self.lease_key(key);
        let fencing_key = self.fencing_key(key);
        let owner = format!("{:032x}", rand::random::<u128>());
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let errors = std::sync::atomic::AtomicU32::new(0);
        let (lease_key_ref, fencing_key_ref, owner_ref, errors_ref) =
            (&lease_key, &fencing_key, &owner, &errors);
        let give_up = super::deadline_after(ttl);
        let taken = poll_lease(key, ttl, || async move {
            let mut connection = self.connection.clone();
            // Taken before asking: the lease surely ends no later than this plus ttl.
            let asked_at = Instant::now();
            // No attempt outlasts the wait: a lease() that returns has no request of its
            // own still unanswered, unless it frees it below.
            let left = give_up
                .saturating_duration_since(asked_at)
                .max(Duration::from_millis(100));
            let answer = tokio::time::timeout(
                left,
                self.scripts
                    .acquire
                    .key(lease_key_ref)
                    .key(fencing_key_ref)
                    .arg(owner_ref)
                    .arg(ttl_ms)
                    .invoke_async::<(i64, i64)>(&mut connection),
            )
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no answer within the lease wait",
                )))
            });
            let (fencing, _remaining_ms) = match answer {
                Ok(answer) => answer,
                // The grant may have happened with its answer lost: ask again as the same
                // owner (the script is idempotent), a few times.
                Err(e)
                    if errors_ref.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                        < LEASE_ERRORS_TOLERATED =>
                {
                    tracing::debug!(error = %e, "asking for the Redis lease failed; asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Ok(None);
                }
                Err(e) => return Err(StoreError::unavailable(e)),
            };
            // A negative fencing number means another holder has the lease.
            Ok(u64::try_from(fencing).ok().map(|fencing| {
                Lease::new(
                    fencing,
                    Some(deadline_from(asked_at, ttl)),
                    RedisLease {
                        connection,
                        scripts: Arc::clone(&self.scripts),
                        lease_key: lease_key_ref.clone(),
                        value: format!("{owner_ref}:{fencing}"),
                    },
                )
            }))
        })
        .await;
        if taken.is_err() && errors.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            // A grant whose answer was lost would block every taker until it expires:
            // free it as soon as the server answers again.
            let (mut connection, scripts) = (self.connection.clone(), Arc::clone(&self.scripts));
            tokio::spawn(async move {
                // A request of this taker may still be on its way (a delayed packet): free
                // a grant again a little later too. The owner is never reused, so this
                // can only free a lease nobody holds knowingly.
                for delay in super::FREE_LOST_GRANTS_AFTER {
                    tokio::time::sleep(delay).await;
                    let freed: Result<i64, _> = scripts
                        .release_owner
                        .key(&lease_key)
                        .arg(&owner)
                        .invoke_async(&mut connection)
                        .await;
                    if let Err(e) = freed {
                        tracing::debug!(error = %e, "could not free a Redis lease whose grant was lost; it will expire");
                    }
                }
            });
        }
        taken
    }

    async fn renew(&self, _key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        let Some(held) = lease
            .guard()
            .and_then(|g| (g as &dyn std::any::Any).downcast_ref::<RedisLease>())
        else {
            return Err(StoreError::LeaseLost);
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let asked_at = Instant::now();
        let mut connection = self.connection.clone();
        let renewed: i64 = self
            .scripts
            .renew
            .key(&held.lease_key)
            .arg(&held.value)
            .arg(ttl_ms)
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::unavailable)?;
        if renewed == 1 {
            lease.set_expires_at(deadline_from(asked_at, ttl));
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }
}

/// What can make this Redis server lose a key, from its `CONFIG GET` answers.
fn durability_warnings(
    appendonly: Option<&str>,
    save: Option<&str>,
    maxmemory_policy: Option<&str>,
    appendfsync: Option<&str>,
) -> Vec<&'static str> {
    let mut warnings = Vec::new();
    if appendonly == Some("yes") && appendfsync.is_some_and(|f| f != "always") {
        warnings.push(
            "this Redis server does not fsync every write (appendfsync is not always): a crash loses the last acknowledged rotations. Use appendfsync always",
        );
    }
    if appendonly == Some("no") && save.is_some_and(|s| s.trim().is_empty()) {
        warnings.push(
            "this Redis server keeps nothing on disk (appendonly no, no snapshots): a restart loses every stored grant. Use appendonly yes with appendfsync always",
        );
    } else if appendonly == Some("no") {
        warnings.push(
            "this Redis server persists by snapshots only: a crash loses the rotations since the last snapshot. Use appendonly yes",
        );
    }
    if maxmemory_policy.is_some_and(|p| p.starts_with("allkeys")) {
        warnings.push(
            "this Redis server may evict any key under memory pressure (maxmemory-policy allkeys-*): stored grants can vanish. Use noeviction (or a volatile-* policy: token keys have no expiry)",
        );
    }
    warnings
}

/// A held Redis lease, released by compare-and-delete; otherwise it expires.
struct RedisLease {
    connection: ConnectionManager,
    scripts: Arc<Scripts>,
    lease_key: String,
    /// `<owner>:<fencing>`.
    value: String,
}

impl fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLease")
            .field("lease_key", &self.lease_key)
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LeaseRelease for RedisLease {
    /// Compare-and-delete: frees the lease only if it is still this one.
    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        let _deleted: i64 = self
            .scripts
            .release
            .key(&self.lease_key)
            .arg(&self.value)
            .invoke_async(&mut self.connection)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
    }
}

/// Refuses a Redis Cluster node (`cluster_enabled:1`; a server whose `INFO` is disabled
/// is taken for a standalone one). Why: the save script writes a key's set and the
/// grant-wide due index in one atomic step, which a cluster can only do within one hash
/// slot; and a cluster fails over to replicas fed asynchronously, so an acknowledged save
/// of a rotated refresh token can be lost, after which the consumed token is presented
/// again and the grant revoked.
async fn refuse_cluster(connection: &mut ConnectionManager) -> Result<(), StoreError> {
    let info: Result<String, _> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(connection)
        .await;
    match info {
        Ok(info) if info.lines().any(|line| line.trim() == "cluster_enabled:1") => {
            Err(StoreError::Misconfigured(
                "this Redis server is a Redis Cluster node, which RedisStore refuses: a save \
                 updates a key and the due index atomically, which a cluster allows only \
                 within one hash slot, and a cluster failover can lose an acknowledged save \
                 of a rotated refresh token (the consumed token would then be presented \
                 again); use a standalone Redis (with replicas only for reads and backups), \
                 or PostgreSQL"
                    .into(),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn servers_that_can_lose_keys_are_named() {
        use super::durability_warnings as check;
        let always = Some("always");
        assert_eq!(
            check(Some("no"), Some(""), Some("noeviction"), always).len(),
            1
        );
        assert_eq!(
            check(Some("no"), Some("3600 1"), Some("noeviction"), always).len(),
            1
        );
        assert_eq!(
            check(Some("yes"), Some(""), Some("allkeys-lru"), always).len(),
            1
        );
        assert_eq!(
            check(Some("yes"), Some(""), Some("noeviction"), Some("everysec")).len(),
            1
        );
        assert!(check(Some("yes"), Some(""), Some("noeviction"), always).is_empty());
        assert!(check(Some("yes"), Some(""), Some("volatile-lru"), always).is_empty());
        assert!(check(None, None, None, None).is_empty());
    }

    #[test]
    fn passwords_never_reach_debug() {
        let shown = redact("redis://user:hunter2@example.com:6380/1?pass=hunter3");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("example.com:6380"), "{shown}");
        assert_eq!(redact("not a url"), "<unparseable URL>");
    }
}

#[cfg(test)]
mod loopback_tests {
    #[test]
    fn loopback_hosts_are_recognized_whatever_the_parser_makes_of_them() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://localhost/0",
            "redis://[::1]:6379",
            "redis://127.1.2.3",
        ] {
            assert!(
                super::host_is_loopback(&url::Url::parse(url).unwrap()),
                "{url}"
            );
        }
        for url in ["redis://10.0.0.5:6379", "redis://redis.internal"] {
            assert!(
                !super::host_is_loopback(&url::Url::parse(url).unwrap()),
                "{url}"
            );
        }
    }
}

/// The longest a watch's subscription attempt may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The watch's task: subscribes to `channel`, forwards each `"<version> <key>"` as a
/// save, and resubscribes after a loss, with a resync each time; ends when the watch is
/// dropped.
async fn subscribe(
    client: redis::Client,
    channel: String,
    url: Arc<str>,
    sender: tokio::sync::mpsc::Sender<super::Change>,
) {
    use futures_util::StreamExt;
    let mut pause = Duration::from_millis(100);
    loop {
        let subscribed = async {
            // Bounded: a connection the network swallows must not stop the watch for good.
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "subscribing timed out")))?
        };
        let mut pubsub = tokio::select! {
            () = sender.closed() => return,
            subscribed = subscribed => match subscribed {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    tracing::debug!(url = %url, error = %e, "cannot subscribe to saves; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        pause = Duration::from_millis(100);
        // Whatever was saved before this subscription, or while there was none.
        if sender.send(super::Change::Resync).await.is_err() {
            return;
        }
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                () = sender.closed() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else {
                tracing::debug!(url = %url, "the subscription to saves was lost; subscribing again");
                break;
            };
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            let Some(saved) = super::saved_from_announcement(&payload) else {
                continue;
            };
            if sender.send(saved).await.is_err() {
                return;
            }
        }
    }
}

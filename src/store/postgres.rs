//! [`PostgresStore`]: token sets in one PostgreSQL table, shared by every machine that
//! reaches the database (feature `postgres`).
//!
//! # Schema
//!
//! [`PostgresStore::create_schema`] runs [`PostgresStore::schema_sql`], which for the
//! default table name is:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS tokenkeeper_tokens (
//!     key              text PRIMARY KEY,
//!     version          bigint,          -- NULL while only a lease was ever taken
//!     body             text,            -- the encoded token set (embeds the version too)
//!     lease_owner      text,            -- random per lease; NULL when released
//!     lease_fencing    bigint NOT NULL DEFAULT 0,
//!     lease_expires_at timestamptz,     -- judged by the database's clock
//!     CHECK ((version IS NULL) = (body IS NULL))
//! );
//! ```
//!
//! The role the store connects as needs `SELECT`, `INSERT` and `UPDATE` on the table
//! (and `CREATE` once, for `create_schema`). The body holds secrets in plain text:
//! protect the table like a password store.
//!
//! # Leases and fencing
//!
//! A lease is one upsert on the key's row that succeeds only if the row's lease is absent,
//! released or expired (`lease_expires_at <= clock_timestamp()`); it sets a new random
//! owner, increments `lease_fencing` and sets the expiry to `clock_timestamp() + ttl`,
//! returning the fencing number. A waiting taker polls every few milliseconds for up to
//! `ttl`, then gives up with [`StoreError::LeaseTimeout`]. A holder that dies releases by
//! expiry; expiries use the database's clock alone, never the clients'.
//!
//! A save is one `UPDATE ... WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3
//! AND lease_expires_at > clock_timestamp() AND version IS NOT DISTINCT FROM $expected`:
//! a holder whose lease expired (even if nobody took it over yet) writes nothing and gets
//! [`StoreError::LeaseLost`]; a stale version gets [`StoreError::Conflict`]. Release
//! clears the lease only if it still carries this lease's owner and fencing number.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use super::{Lease, LeaseRelease, StoreError, TokenStore, Versioned, decode, encode, poll_lease};
use crate::token::TokenSet;

/// The default table name.
pub const DEFAULT_TABLE: &str = "tokenkeeper_tokens";

/// A [`TokenStore`] in a PostgreSQL table, for applications that run several replicas on
/// several machines. See the [module documentation](self) for the schema and the fencing.
///
/// Cheap to clone: clones share one connection pool. While the database is unreachable
/// every operation fails with [`StoreError::Unavailable`]; new connections are made when
/// it is back. TLS is not enabled (`NoTls`): use a local socket, a private network or a
/// TLS-terminating proxy, or build the pool yourself and use [`PostgresStore::from_pool`].
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tokenkeeper::store::postgres::PostgresStore;
/// let store = PostgresStore::connect("postgresql://app@db.internal/app").await?;
/// store.create_schema().await?; // once; idempotent
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    shared: Arc<Shared>,
}

struct Shared {
    table: String,
    /// Where the pool connects, without credentials, for Debug.
    target: String,
    sql: Sql,
}

struct Sql {
    load: String,
    lease: String,
    release: String,
    save: String,
    lease_held: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        Self {
            load: format!("SELECT version, body FROM {t} WHERE key = $1 AND version IS NOT NULL"),
            lease: format!(
                "INSERT INTO {t} AS t (key, lease_owner, lease_fencing, lease_expires_at) \
                 VALUES ($1, $2, 1, clock_timestamp() + $3::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET lease_owner = EXCLUDED.lease_owner, \
                     lease_fencing = t.lease_fencing + 1, \
                     lease_expires_at = EXCLUDED.lease_expires_at \
                 WHERE t.lease_expires_at IS NULL OR t.lease_expires_at <= clock_timestamp() \
                 RETURNING t.lease_fencing"
            ),
            release: format!(
                "UPDATE {t} SET lease_owner = NULL, lease_expires_at = NULL \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3"
            ),
            save: format!(
                "UPDATE {t} SET version = $4, body = $5 \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3 \
                   AND lease_expires_at > clock_timestamp() \
                   AND version IS NOT DISTINCT FROM $6::bigint"
            ),
            lease_held: format!(
                "SELECT lease_owner = $2 AND lease_fencing = $3 \
                        AND lease_expires_at > clock_timestamp() \
                 FROM {t} WHERE key = $1"
            ),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.shared.target)
            .field("table", &self.shared.table)
            .finish_non_exhaustive()
    }
}

/// A configuration problem found before connecting (never quotes the connection string).
#[derive(Debug, thiserror::Error)]
#[error("invalid PostgreSQL configuration: {0}")]
struct InvalidConfig(&'static str);

/// Where a config connects, without user credentials.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
        })
        .collect();
    format!(
        "user={} hosts=[{}] dbname={}",
        config.get_user().unwrap_or("(default)"),
        hosts.join(","),
        config.get_dbname().unwrap_or("(default)")
    )
}

fn valid_table_name(name: &str) -> bool {
    let mut parts = name.split('.');
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), None, None) => ok(a),
        (Some(a), Some(b), None) => ok(a) && ok(b),
        _ => false,
    }
}

impl PostgresStore {
    /// Connects to the database described by `config`: a URL
    /// (`postgresql://user[:password]@host[:port]/dbname`) or a `key=value` string, as
    /// `tokio_postgres::Config` parses them. Makes one connection to check that the
    /// database is reachable ([`StoreError::Unavailable`] otherwise), and keeps a pool of
    /// up to 8.
    pub async fn connect(config: &str) -> Result<Self, StoreError> {
        let mut pg: tokio_postgres::Config = config
            .parse()
            .map_err(|_| StoreError::unavailable(InvalidConfig("unparseable connection string")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        let target = describe(&pg);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(StoreError::unavailable)?;
        let store = Self::with_pool(pool, target);
        drop(store.client().await?);
        Ok(store)
    }

    /// A store over a pool you built (for TLS, or your own pool settings).
    pub fn from_pool(pool: Pool) -> Self {
        Self::with_pool(pool, "(caller's pool)".into())
    }

    fn with_pool(pool: Pool, target: String) -> Self {
        Self {
            pool,
            shared: Arc::new(Shared {
                sql: Sql::new(DEFAULT_TABLE),
                table: DEFAULT_TABLE.into(),
                target,
            }),
        }
    }

    /// Uses table `name` (`[a-z_][a-z0-9_]*`, optionally `schema.table`) instead of
    /// [`DEFAULT_TABLE`].
    ///
    /// # Panics
    ///
    /// If `name` is not such an identifier (it is spliced into SQL).
    pub fn with_table(mut self, name: &str) -> Self {
        assert!(
            valid_table_name(name),
            "PostgresStore table names are [a-z_][a-z0-9_]* or schema.table"
        );
        self.shared = Arc::new(Shared {
            sql: Sql::new(name),
            table: name.to_owned(),
            target: self.shared.target.clone(),
        });
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.shared.table
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement [`PostgresStore::create_schema`] runs.
    pub fn schema_sql(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n\
             \x20   key              text PRIMARY KEY,\n\
             \x20   version          bigint,\n\
             \x20   body             text,\n\
             \x20   lease_owner      text,\n\
             \x20   lease_fencing    bigint NOT NULL DEFAULT 0,\n\
             \x20   lease_expires_at timestamptz,\n\
             \x20   CHECK ((version IS NULL) = (body IS NULL))\n\
             )",
            self.shared.table
        )
    }

    /// Creates the table if it does not exist. Idempotent, and safe to run from several
    /// processes at once (serialized by a transaction-scoped advisory lock).
    pub async fn create_schema(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(7317180650301923); {}; COMMIT;",
                self.schema_sql()
            ))
            .await
            .map_err(StoreError::unavailable)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(StoreError::unavailable)
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "empty",
        });
    }
    if key.contains('\0') {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "PostgreSQL text cannot hold NUL",
        });
    }
    Ok(())
}

fn to_db(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::Conflict)
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        check_key(key)?;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.load)
            .await
            .map_err(StoreError::unavailable)?;
        let row = client
            .query_opt(&statement, &[&key])
            .await
            .map_err(StoreError::unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get(0).map_err(StoreError::unavailable)?;
        let body: String = row.try_get(1).map_err(StoreError::unavailable)?;
        let versioned = decode(key, body.as_bytes())?;
        if u64::try_from(version).ok() != Some(versioned.version) {
            return Err(StoreError::Corrupt {
                key: key.to_owned(),
                reason: "the version column disagrees with the stored record".into(),
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
        check_key(key)?;
        let Some(held) = lease
            .guard()
            .and_then(|g| (g as &dyn std::any::Any).downcast_ref::<PostgresLease>())
            .filter(|held| held.key == key && held.shared.table == self.shared.table)
        else {
            return Err(StoreError::LeaseLost);
        };
        let version = expected.map_or(1, |v| v + 1);
        let body =
            String::from_utf8(encode(token, version)).expect("serde_json always writes UTF-8");
        let expected_db = expected.map(to_db).transpose()?;
        let (version_db, fencing_db) = (to_db(version)?, to_db(held.fencing)?);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.save)
            .await
            .map_err(StoreError::unavailable)?;
        let written = client
            .execute(
                &statement,
                &[
                    &key,
                    &held.owner,
                    &fencing_db,
                    &version_db,
                    &body,
                    &expected_db,
                ],
            )
            .await
            .map_err(StoreError::unavailable)?;
        if written == 1 {
            return Ok(version);
        }
        // Nothing was written: say why. The lease is checked first, as the write did.
        let statement = client
            .prepare_cached(&self.shared.sql.lease_held)
            .await
            .map_err(StoreError::unavailable)?;
        let held_now: Option<bool> = client
            .query_opt(&statement, &[&key, &held.owner, &fencing_db])
            .await
            .map_err(StoreError::unavailable)?
            .and_then(|row| row.get(0));
        if held_now == Some(true) {
            Err(StoreError::Conflict)
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        check_key(key)?;
        let owner = format!("{:032x}", rand::random::<u128>());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.lease)
            .await
            .map_err(StoreError::unavailable)?;
        let (client, statement, owner) = (&client, &statement, &owner);
        poll_lease(key, ttl, || async move {
            // Taken before asking: the lease surely ends no later than this plus ttl.
            let asked_at = Instant::now();
            let row = client
                .query_opt(statement, &[&key, owner, &ttl_ms])
                .await
                .map_err(StoreError::unavailable)?;
            // No row: another holder has the lease.
            let Some(row) = row else {
                return Ok(None);
            };
            let fencing: i64 = row.try_get(0).map_err(StoreError::unavailable)?;
            let fencing = u64::try_from(fencing).unwrap_or(0);
            Ok(Some(Lease::new(
                fencing,
                Some(asked_at + ttl),
                PostgresLease {
                    pool: self.pool.clone(),
                    shared: Arc::clone(&self.shared),
                    key: key.to_owned(),
                    owner: owner.clone(),
                    fencing,
                },
            )))
        })
        .await
    }
}

/// A held lease row, cleared on release; otherwise it expires.
struct PostgresLease {
    pool: Pool,
    shared: Arc<Shared>,
    key: String,
    owner: String,
    fencing: u64,
}

impl fmt::Debug for PostgresLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLease")
            .field("key", &self.key)
            .field("fencing", &self.fencing)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LeaseRelease for PostgresLease {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(StoreError::unavailable)?;
        let statement = client
            .prepare_cached(&self.shared.sql.release)
            .await
            .map_err(StoreError::unavailable)?;
        client
            .execute(&statement, &[&self.key, &self.owner, &to_db(self.fencing)?])
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{describe, valid_table_name};

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(valid_table_name("tokenkeeper_tokens"));
        assert!(valid_table_name("auth.tokens2"));
        assert!(!valid_table_name("tokens; DROP TABLE x"));
        assert!(!valid_table_name("Tokens"));
        assert!(!valid_table_name("a.b.c"));
        assert!(!valid_table_name(""));
    }

    #[test]
    fn passwords_never_reach_debug() {
        let config: tokio_postgres::Config = "postgresql://app:hunter2@db.internal:6543/tokens"
            .parse()
            .unwrap();
        let shown = describe(&config);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.internal:6543"), "{shown}");
    }
}

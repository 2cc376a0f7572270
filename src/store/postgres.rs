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
//!     due_at           timestamptz,     -- the set's keep-alive instant; 'infinity': none;
//!                                       -- NULL: not known yet (see below)
//!     CHECK ((version IS NULL) = (body IS NULL))
//! );
//! -- Tables created by earlier versions get the column and the indexes (only when missing):
//! ALTER TABLE tokenkeeper_tokens ADD COLUMN IF NOT EXISTS due_at timestamptz;
//! CREATE INDEX IF NOT EXISTS tokenkeeper_tokens_due_at_idx
//!     ON tokenkeeper_tokens (due_at) WHERE due_at IS NOT NULL;
//! CREATE INDEX IF NOT EXISTS tokenkeeper_tokens_due_at_unknown_idx
//!     ON tokenkeeper_tokens (key) WHERE due_at IS NULL AND version IS NOT NULL;
//! ```
//!
//! `due_at` is [`TokenSet::keep_alive_at`] of the stored set (`'infinity'` when it has
//! none), written by the same statement as the body, so it never disagrees with it;
//! [`TokenStore::due`] reads it through `..._due_at_idx`. An index name longer than
//! PostgreSQL's 63 bytes keeps the start of the table name and a hash of all of it
//! (earlier versions cut it short, so that two tables sharing a 52-byte prefix shared the
//! name and the second got no index; a table named that long gets its index under the
//! new name, and the one the earlier version made can be dropped).
//!
//! # Upgrading from a version without `due_at`
//!
//! Until `create_schema` runs, saves work as the earlier version's did (the store warns
//! once that the table lacks `due_at`) and `due` fails with [`StoreError::Misconfigured`]
//! naming `create_schema`. `create_schema` adds the column and indexes without touching
//! the rows, then fills `due_at` of every row that lacks it (rows saved before, or by a
//! replica still running an earlier version): without it, `due` would never list an idle
//! grant, the very one a sweep exists for. It reads them 1,000 at a time by key through
//! `..._due_at_unknown_idx`, decodes each set in Rust, and writes `due_at` only if the row
//! still holds the version it read (a save meanwhile wrote it itself). A row whose set
//! cannot be decoded is left without `due_at`, logged, and read again by the next call;
//! otherwise a later call reads nothing. The upgrade is skipped once done: later calls
//! neither lock the table against its users nor need to own it.
//!
//! The role the store connects as needs `SELECT`, `INSERT` and `UPDATE` on the table
//! (and `CREATE` once, for `create_schema`; upgrading a table made by an earlier version
//! needs its owner, once). The body holds secrets in plain text: protect the table like
//! a password store.
//!
//! # Leases and fencing
//!
//! A lease is one upsert on the key's row that succeeds only if the row's lease is absent,
//! released or expired (`lease_expires_at <= clock_timestamp()`), or already this owner's;
//! it sets a new random owner, increments `lease_fencing` and sets the expiry to
//! `clock_timestamp() + ttl`, returning the fencing number. A waiting taker polls every
//! few milliseconds for up to `ttl`, taking a pooled connection for each attempt only
//! (waiters never starve a holder's save of connections), then gives up with
//! [`StoreError::LeaseTimeout`]. When an attempt fails (its answer may be lost) the taker
//! asks again as the same owner; if it gives up, it frees any grant made to it. A holder
//! that dies releases by expiry; expiries use the database's clock alone, never the
//! clients'. A holder renews with an `UPDATE` of the expiry that checks owner, fencing
//! number and that the lease has not expired.
//!
//! # Timeouts
//!
//! Every operation (a pooled connection and its statements) is bounded by
//! [`PostgresStore::with_operation_timeout`] (default 5 s); a connection whose operation
//! timed out is closed rather than returned to the pool, so a connection the network
//! silently dropped stalls nothing for long. [`PostgresStore::connect`] also sets the
//! server's `statement_timeout` to the default bound, 5 s (unless the connection string
//! sets one: `options=-c statement_timeout=...`), and TCP keepalives.
//!
//! A missing table, or `due` on one an earlier version made and `create_schema` has not
//! upgraded (without `due_at`; loads and saves still work), is
//! [`StoreError::Misconfigured`], naming the table and [`PostgresStore::create_schema`],
//! which the store never runs by itself (the role that serves tokens need not be allowed
//! to create tables).
//!
//! A save is one `UPDATE ... WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3
//! AND lease_expires_at > clock_timestamp() AND version IS NOT DISTINCT FROM $expected`:
//! a holder whose lease expired (even if nobody took it over yet) writes nothing and gets
//! [`StoreError::LeaseLost`]; a stale version gets [`StoreError::Conflict`]. Release
//! clears the lease only if it still carries this lease's owner and fencing number.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

mod listen;
mod tls;

use super::{
    LEASE_ERRORS_TOLERATED, Lease, LeaseRelease, StoreError, TokenStore, Versioned, deadline_from,
    decode, encode, next_version, poll_lease,
};
use crate::token::TokenSet;

/// The default table name.
pub const DEFAULT_TABLE: &str = "tokenkeeper_tokens";

/// A [`TokenStore`] in a PostgreSQL table, for applications that run several replicas on
/// several machines. See the [module documentation](self) for the schema and the fencing.
///
/// Cheap to clone: clones share one connection pool. While the database is unreachable
/// every operation fails with [`StoreError::Unavailable`]; new connections are made when
/// it is back. TLS is rustls, configured by libpq's `sslmode` and `sslrootcert` in the
/// connection string (see [`PostgresStore::connect`]); or build the pool yourself and use
/// [`PostgresStore::from_pool`].
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
    /// How a watch opens its own connection (`None`: a pool given by the caller).
    listener: Option<Arc<listen::Listener>>,
}

struct Shared {
    table: String,
    /// Where the pool connects, without credentials, for Debug.
    target: String,
    sql: Sql,
    /// The bound on one operation (a pool checkout and its statements).
    op_timeout: Duration,
    /// Set once a save found the table without `due_at` (and said so).
    warned_without_due_at: AtomicBool,
}

/// The default bound on one operation.
const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(5);

struct Sql {
    load: String,
    keys: String,
    lease: String,
    renew: String,
    release: String,
    release_owner: String,
    save: String,
    /// Empties a key's row (its lease columns stay), under its lease.
    delete: String,
    /// The same for a table an earlier version made, without `due_at`.
    delete_without_due_at: String,
    /// The save of versions before `due_at`, for a table `create_schema` has not upgraded.
    save_without_due_at: String,
    lease_held: String,
    due: String,
    /// A page of rows whose `due_at` is not known (saved before the column existed).
    backfill_read: String,
    /// Fills `due_at` of such rows, each only if it still holds the version read.
    backfill_write: String,
}

/// How many rows the `due_at` backfill reads at a time.
const BACKFILL_PAGE: i64 = 1000;

/// The `timestamptz` for microseconds since the Unix epoch in parameter `$n` (NULL for
/// NULL), computed exactly in integers (no floating point rounding).
fn timestamptz_from_micros(n: u8) -> String {
    format!(
        "(to_timestamp(${n}::bigint / 1000000) + (${n}::bigint % 1000000) * interval '1 microsecond')"
    )
}

/// `at` in microseconds since the Unix epoch (rounded down), clamped to what PostgreSQL's
/// `timestamptz` holds (clamping keeps the order, so `due` stays right).
fn epoch_micros(at: OffsetDateTime) -> i64 {
    /// About 4370 BC; PostgreSQL's `timestamptz` starts at 4713 BC.
    const EARLIEST: i128 = -200_000_000_000 * 1_000_000;
    /// About 31,700 AD; `time` stops at 9999 anyway.
    const LATEST: i128 = 1_000_000_000_000 * 1_000_000;
    let micros = at
        .unix_timestamp_nanos()
        .div_euclid(1_000)
        .clamp(EARLIEST, LATEST);
    i64::try_from(micros).unwrap_or_default()
}

impl Sql {
    fn new(t: &str) -> Self {
        Self {
            load: format!("SELECT version, body FROM {t} WHERE key = $1 AND version IS NOT NULL"),
            keys: format!("SELECT key FROM {t} WHERE version IS NOT NULL ORDER BY key"),
            lease: format!(
                "INSERT INTO {t} AS t (key, lease_owner, lease_fencing, lease_expires_at) \
                 VALUES ($1, $2, 1, clock_timestamp() + $3::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET lease_owner = EXCLUDED.lease_owner, \
                     lease_fencing = CASE WHEN t.lease_owner = EXCLUDED.lease_owner \
                                     THEN t.lease_fencing ELSE t.lease_fencing + 1 END, \
                     lease_expires_at = EXCLUDED.lease_expires_at \
                 WHERE t.lease_expires_at IS NULL OR t.lease_expires_at <= clock_timestamp() \
                    OR t.lease_owner = EXCLUDED.lease_owner \
                 RETURNING t.lease_fencing"
            ),
            renew: format!(
                "UPDATE {t} SET lease_expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3 \
                   AND lease_expires_at > clock_timestamp()"
            ),
            release_owner: format!(
                "UPDATE {t} SET lease_owner = NULL, lease_expires_at = NULL \
                 WHERE key = $1 AND lease_owner = $2"
            ),
            release: format!(
                "UPDATE {t} SET lease_owner = NULL, lease_expires_at = NULL \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3"
            ),
            // The notification is part of the statement: sent when, and only if, the
            // save commits.
            save: format!(
                "WITH saved AS (UPDATE {t} SET version = $4, body = $5, \
                     due_at = COALESCE({due_at}, 'infinity') \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3 \
                   AND lease_expires_at > clock_timestamp() \
                   AND version IS NOT DISTINCT FROM $6::bigint \
                 RETURNING key, version) \
                 SELECT pg_notify('{channel}', version || ' ' || key) FROM saved",
                due_at = timestamptz_from_micros(7),
                channel = listen::channel(t),
            ),
            delete: format!(
                "UPDATE {t} SET version = NULL, body = NULL, due_at = NULL \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3 \
                   AND lease_expires_at > clock_timestamp()"
            ),
            delete_without_due_at: format!(
                "UPDATE {t} SET version = NULL, body = NULL \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3 \
                   AND lease_expires_at > clock_timestamp()"
            ),
            save_without_due_at: format!(
                "WITH saved AS (UPDATE {t} SET version = $4, body = $5 \
                 WHERE key = $1 AND lease_owner = $2 AND lease_fencing = $3 \
                   AND lease_expires_at > clock_timestamp() \
                   AND version IS NOT DISTINCT FROM $6::bigint \
                 RETURNING key, version) \
                 SELECT pg_notify('{channel}', version || ' ' || key) FROM saved",
                channel = listen::channel(t),
            ),
            backfill_read: format!(
                "SELECT key, version, body FROM {t} \
                 WHERE due_at IS NULL AND version IS NOT NULL AND key > $1 \
                 ORDER BY key LIMIT $2"
            ),
            backfill_write: format!(
                "UPDATE {t} AS t SET due_at = COALESCE(to_timestamp(b.due / 1000000) \
                     + (b.due % 1000000) * interval '1 microsecond', 'infinity') \
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS b(key, version, due) \
                 WHERE t.key = b.key AND t.version = b.version AND t.due_at IS NULL"
            ),
            due: format!(
                "SELECT key FROM {t} WHERE due_at <= {before} ORDER BY due_at, key LIMIT $2",
                before = timestamptz_from_micros(1)
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

/// Whether every host of `pg` is this machine (loopback or a Unix socket).
fn only_loopback(pg: &tokio_postgres::Config) -> bool {
    pg.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => true,
    })
}

/// The schema version [`PostgresStore::create_schema`] brings a table to (see
/// [`PostgresStore::table_version`]).
pub const TABLE_VERSION: u32 = 2;

/// SQL for the schema version of table `t` (which exists): its comment's, or else 2 with
/// a `due_at` column and 1 without.
fn table_version_sql(t: &str) -> String {
    format!(
        "coalesce(\
           substring(obj_description(to_regclass('{t}'), 'pg_class') from '^tokenkeeper schema ([0-9]+)$')::int, \
           CASE WHEN EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{t}') \
                             AND attname = 'due_at' AND NOT attisdropped) THEN 2 ELSE 1 END)"
    )
}

impl PostgresStore {
    /// Connects to the database described by `config`: a URL
    /// (`postgresql://user[:password]@host[:port]/dbname`) or a `key=value` string, as
    /// `tokio_postgres::Config` parses them, plus libpq's TLS parameters: `sslmode`
    /// (`disable`; `prefer`, the default, and `require`: encrypted, the certificate not
    /// checked unless `sslrootcert` is given; `verify-ca`: signed by a trusted root;
    /// `verify-full`: and naming the host) and `sslrootcert` (a PEM file of trusted roots,
    /// or `system`, the default). TLS is rustls. Makes one connection to check that the
    /// database is reachable ([`StoreError::Unavailable`] otherwise;
    /// [`StoreError::Misconfigured`] for a refused certificate or a server without the TLS
    /// the mode requires), and keeps a pool of up to 8. A plaintext connection to a host
    /// that is not loopback is logged at warn.
    pub async fn connect(config: &str) -> Result<Self, StoreError> {
        let (config, tls) = tls::split(config)?;
        let mut pg: tokio_postgres::Config = config.parse().map_err(|_| {
            StoreError::Misconfigured("the PostgreSQL connection string cannot be parsed".into())
        })?;
        let tls = tls.settle(pg.get_ssl_mode())?;
        pg.ssl_mode(tls.mode.negotiation());
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        // A statement the server runs longer than an operation may take is cancelled
        // there too, and a silently dead connection is noticed by TCP keepalives.
        let options = pg.get_options().unwrap_or_default().to_owned();
        if !options.contains("statement_timeout") {
            let ms = DEFAULT_OP_TIMEOUT.as_millis();
            pg.options(format!("{options} -c statement_timeout={ms}").trim_start());
        }
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let target = describe(&pg);
        if !only_loopback(&pg) {
            match tls.mode {
                tls::SslMode::Disable => {
                    tracing::warn!(target = %target, "connecting to PostgreSQL in plaintext over the network (sslmode=disable): the tokens and the password travel in clear");
                }
                tls::SslMode::Prefer => {
                    tracing::warn!(target = %target, "sslmode=prefer (the default) over the network: plaintext if the server offers no TLS, and no certificate checked; use sslmode=verify-full");
                }
                _ => {}
            }
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let connector = tls::connector(&tls)?;
        let listener = Arc::new(listen::Listener {
            pg: pg.clone(),
            tls: connector.clone(),
            target: target.clone(),
        });
        let manager = match connector {
            Some(connector) => Manager::from_config(pg, connector, manager_config),
            None => Manager::from_config(pg, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(DEFAULT_OP_TIMEOUT))
            .create_timeout(Some(DEFAULT_OP_TIMEOUT))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(StoreError::unavailable)?;
        let mut store = Self::with_pool(pool, target);
        store.listener = Some(listener);
        drop(store.client().await.map_err(super::tls_refusal)?);
        Ok(store)
    }

    /// A store over a pool you built (for TLS, or your own pool settings).
    pub fn from_pool(pool: Pool) -> Self {
        Self::with_pool(pool, "(caller's pool)".into())
    }

    fn with_pool(pool: Pool, target: String) -> Self {
        Self {
            pool,
            listener: None,
            shared: Arc::new(Shared {
                sql: Sql::new(DEFAULT_TABLE),
                table: DEFAULT_TABLE.into(),
                target,
                op_timeout: DEFAULT_OP_TIMEOUT,
                warned_without_due_at: AtomicBool::new(false),
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
            op_timeout: self.shared.op_timeout,
            warned_without_due_at: AtomicBool::new(false),
        });
        self
    }

    /// Bounds each operation (a connection from the pool and its statements) by
    /// `timeout` (default 5 s). A connection whose operation timed out is closed, never
    /// handed out again: a silently dropped connection cannot stall later operations.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.shared = Arc::new(Shared {
            sql: Sql::new(&self.shared.table),
            table: self.shared.table.clone(),
            target: self.shared.target.clone(),
            op_timeout: timeout,
            warned_without_due_at: AtomicBool::new(false),
        });
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.shared.table
    }

    /// The statements [`PostgresStore::create_schema`] runs: `CREATE TABLE IF NOT EXISTS`,
    /// then a `DO` block that refuses a table of a newer schema version than
    /// [`TABLE_VERSION`], adds what a table made by an earlier version lacks, only when it
    /// is missing, and records the version in the table's comment: the `due_at` column (`ALTER TABLE ... ADD COLUMN IF NOT
    /// EXISTS`), its index, and the index of the rows whose `due_at` is not known yet
    /// (`CREATE INDEX IF NOT EXISTS`). Once upgraded, running them takes no lock on the
    /// table and needs no ownership of it. (`create_schema` then fills `due_at` where it
    /// is not known, which takes Rust to decode the sets: not part of this SQL.)
    pub fn schema_sql(&self) -> String {
        let t = &self.shared.table;
        let (due, qualified_due) = index_name(t, DUE_INDEX_SUFFIX);
        let (unknown, qualified_unknown) = index_name(t, UNKNOWN_DUE_INDEX_SUFFIX);
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (\n\
             \x20   key              text PRIMARY KEY,\n\
             \x20   version          bigint,\n\
             \x20   body             text,\n\
             \x20   lease_owner      text,\n\
             \x20   lease_fencing    bigint NOT NULL DEFAULT 0,\n\
             \x20   lease_expires_at timestamptz,\n\
             \x20   due_at           timestamptz,\n\
             \x20   CHECK ((version IS NULL) = (body IS NULL))\n\
             );\n\
             DO $upgrade$\n\
             DECLARE\n\
             \x20   v int := {TABLE_VERSION_SQL};\n\
             BEGIN\n\
             \x20   IF v > {TABLE_VERSION} THEN\n\
             \x20       RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', MESSAGE =\n\
             \x20           format('tokenkeeper: the table {t} has schema version %s; this version of tokenkeeper knows versions up to {TABLE_VERSION}: upgrade tokenkeeper', v);\n\
             \x20   END IF;\n\
             \x20   -- Version 2: due_at and its indexes.\n\
             \x20   IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{t}'::regclass\n\
             \x20                  AND attname = 'due_at' AND NOT attisdropped) THEN\n\
             \x20       ALTER TABLE {t} ADD COLUMN IF NOT EXISTS due_at timestamptz;\n\
             \x20   END IF;\n\
             \x20   IF to_regclass('{qualified_due}') IS NULL THEN\n\
             \x20       CREATE INDEX IF NOT EXISTS {due} ON {t} (due_at) WHERE due_at IS NOT NULL;\n\
             \x20   END IF;\n\
             \x20   IF to_regclass('{qualified_unknown}') IS NULL THEN\n\
             \x20       -- Only speeds up the backfill: without it (a role that does not own the\n\
             \x20       -- table), create_schema reads the table through instead.\n\
             \x20       BEGIN\n\
             \x20           CREATE INDEX IF NOT EXISTS {unknown} ON {t} (key)\n\
             \x20               WHERE due_at IS NULL AND version IS NOT NULL;\n\
             \x20       EXCEPTION WHEN insufficient_privilege THEN\n\
             \x20           RAISE NOTICE 'not creating {unknown}: %', SQLERRM;\n\
             \x20       END;\n\
             \x20   END IF;\n\
             \x20   IF obj_description('{t}'::regclass, 'pg_class') IS DISTINCT FROM\n\
             \x20          'tokenkeeper schema {TABLE_VERSION}' THEN\n\
             \x20       BEGIN\n\
             \x20           COMMENT ON TABLE {t} IS 'tokenkeeper schema {TABLE_VERSION}';\n\
             \x20       EXCEPTION WHEN insufficient_privilege THEN\n\
             \x20           RAISE NOTICE 'not recording the schema version of {t}: %', SQLERRM;\n\
             \x20       END;\n\
             \x20   END IF;\n\
             END\n\
             $upgrade$",
            TABLE_VERSION_SQL = table_version_sql(t),
        )
    }

    /// Creates the table if it does not exist, and upgrades one made by an earlier version
    /// (see [`PostgresStore::schema_sql`]; existing rows are kept). Idempotent, and safe to
    /// run from several processes at once (serialized by a transaction-scoped advisory
    /// lock), and while the store is in use.
    ///
    /// Then fills `due_at` of the rows that do not have it yet (saved before the column
    /// existed, or by a replica still running such a version): [`TokenStore::due`] never
    /// lists a row without it, so a sweep would let an idle grant die. It reads those
    /// rows 1,000 at a time (by key), decodes each set, and writes its keep-alive instant
    /// (`'infinity'` for a set without one), each only if the row still holds the version
    /// it read: a save meanwhile wrote `due_at` itself. A row whose set cannot be read is
    /// left as it is (logged at warn, and read again by the next call).
    pub async fn create_schema(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let created = client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(7317180650301923); {}; COMMIT;",
                self.schema_sql()
            ))
            .await;
        if created.is_err() {
            // The failed statement left its transaction open on this connection: close it
            // rather than hand it out again.
            drop(deadpool_postgres::Object::take(client));
        } else {
            drop(client);
        }
        created.map_err(|e| match e.as_db_error() {
            Some(db) if db.message().starts_with("tokenkeeper:") => {
                StoreError::Misconfigured(db.message().to_owned())
            }
            Some(db) if db.code() == &SqlState::INSUFFICIENT_PRIVILEGE => {
                StoreError::Misconfigured(format!(
                    "create_schema needs to create or upgrade the table {}, which takes its \
                     owner (or CREATE on the schema): {}",
                    self.shared.table,
                    db.message()
                ))
            }
            _ => StoreError::unavailable(e),
        })?;
        self.backfill_due_at().await
    }

    /// The schema version of the table: `None` when it does not exist. Version 1 is the
    /// first table; version 2 added `due_at` ([`TokenStore::due`]). [`create_schema`]
    /// upgrades an older table to [`TABLE_VERSION`] in place (rows kept) and records the
    /// version in the table's comment (a table upgraded by a role that does not own it,
    /// or by tokenkeeper before versions were recorded, is recognized by its columns),
    /// and refuses a table of a newer version with [`StoreError::Misconfigured`].
    ///
    /// [`create_schema`]: PostgresStore::create_schema
    pub async fn table_version(&self) -> Result<Option<u32>, StoreError> {
        let t = &self.shared.table;
        let sql = format!(
            "SELECT CASE WHEN to_regclass('{t}') IS NULL THEN NULL ELSE {} END",
            table_version_sql(t)
        );
        let row = self
            .idempotent(|| {
                async |client| {
                    client
                        .query_one(sql.as_str(), &[])
                        .await
                        .map_err(StoreError::unavailable)
                }
            })
            .await?;
        let version: Option<i32> = row.get(0);
        Ok(version.and_then(|v| u32::try_from(v).ok()))
    }

    /// Fills `due_at` where it is not known (see [`PostgresStore::create_schema`]). A
    /// row a concurrent save replaced without writing `due_at` (an earlier version's
    /// replica, or a save on the table just before it was upgraded) is picked up by
    /// another pass, up to three.
    async fn backfill_due_at(&self) -> Result<(), StoreError> {
        let (mut filled, mut unreadable) = (0u64, 0u64);
        for _pass in 0..3 {
            let (mut after, mut replaced) = (String::new(), 0u64);
            loop {
                let page = self
                    .idempotent(|| async |client| self.backfill_page(client, &after).await)
                    .await?;
                filled += page.filled;
                replaced += page.replaced;
                unreadable += page.unreadable;
                match page.last_key {
                    Some(last) if page.full => after = last,
                    _ => break,
                }
            }
            if replaced == 0 {
                break;
            }
            unreadable = 0;
        }
        if filled > 0 {
            tracing::info!(table = %self.shared.table, filled, "filled due_at of rows saved before it existed");
        }
        if unreadable > 0 {
            tracing::warn!(table = %self.shared.table, unreadable, "rows whose token set cannot be read have no due_at: TokenStore::due never lists them");
        }
        Ok(())
    }

    /// One page of the `due_at` backfill: the rows after key `after`.
    async fn backfill_page(
        &self,
        client: &deadpool_postgres::Client,
        after: &str,
    ) -> Result<BackfillPage, StoreError> {
        let read = client
            .prepare_cached(&self.shared.sql.backfill_read)
            .await
            .map_err(|e| self.pg_error(e))?;
        let rows = client
            .query(&read, &[&after, &BACKFILL_PAGE])
            .await
            .map_err(|e| self.pg_error(e))?;
        let mut page = BackfillPage {
            full: i64::try_from(rows.len()).is_ok_and(|n| n >= BACKFILL_PAGE),
            ..BackfillPage::default()
        };
        let (mut keys, mut versions, mut dues) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let key: String = row.try_get(0).map_err(StoreError::unavailable)?;
            let version: i64 = row.try_get(1).map_err(StoreError::unavailable)?;
            let body: String = row.try_get(2).map_err(StoreError::unavailable)?;
            match decode(&key, body.as_bytes()) {
                Ok(stored) => {
                    dues.push(stored.value.keep_alive_at().map(epoch_micros));
                    versions.push(version);
                    keys.push(key.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "filling due_at: skipped a row whose token set cannot be read");
                    page.unreadable += 1;
                }
            }
            page.last_key = Some(key);
        }
        if !keys.is_empty() {
            let write = client
                .prepare_cached(&self.shared.sql.backfill_write)
                .await
                .map_err(|e| self.pg_error(e))?;
            let written = client
                .execute(&write, &[&keys, &versions, &dues])
                .await
                .map_err(|e| self.pg_error(e))?;
            page.filled = written;
            page.replaced = (keys.len() as u64).saturating_sub(written);
        }
        Ok(page)
    }

    /// Says once that saves go to a table without `due_at`.
    fn warn_without_due_at(&self) {
        if !self
            .shared
            .warned_without_due_at
            .swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                table = %self.shared.table,
                "the table has no due_at column (an earlier version made it): saves work, \
                 but TokenStore::due cannot list the grants to keep alive (a sweep fails) \
                 until PostgresStore::create_schema() upgrades it; run it once"
            );
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        checkout(&self.pool, self.shared.op_timeout).await
    }

    /// Maps a database error: a missing table is a configuration mistake, named.
    fn pg_error(&self, e: tokio_postgres::Error) -> StoreError {
        pg_error(&self.shared, e)
    }

    /// One operation of `once`-only statements (a save: its answer decides what the
    /// caller does next), on a pooled connection, bounded.
    async fn once<T>(
        &self,
        work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        bounded(self.shared.op_timeout, self.client().await?, work).await
    }

    /// One idempotent operation (see [`idempotent`]).
    async fn idempotent<T, W>(&self, work: impl Fn() -> W) -> Result<T, StoreError>
    where
        W: AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, StoreError>,
    {
        idempotent(&self.pool, self.shared.op_timeout, work).await
    }
}

/// A pooled connection, within `timeout`.
async fn checkout(pool: &Pool, timeout: Duration) -> Result<deadpool_postgres::Client, StoreError> {
    match tokio::time::timeout(timeout, pool.get()).await {
        Ok(client) => client.map_err(StoreError::unavailable),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// Maps a database error: a missing table, or a table an earlier version made and
/// `create_schema` did not upgrade, is a configuration mistake, named.
fn pg_error(shared: &Shared, e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
        return StoreError::Misconfigured(format!(
            "the table {} does not exist: call PostgresStore::create_schema() once (it is idempotent)",
            shared.table
        ));
    }
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) {
        return StoreError::Misconfigured(format!(
            "the table {} lacks a column this version uses (an earlier version made it): \
             call PostgresStore::create_schema() once to upgrade it (its rows are kept)",
            shared.table
        ));
    }
    StoreError::unavailable(e)
}

/// Runs one operation's statements on `client`, bounded by `timeout`. A connection that
/// did not answer in time is closed, not returned to the pool.
async fn bounded<T>(
    timeout: Duration,
    client: deadpool_postgres::Client,
    work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, work(&client)).await {
        Ok(result) => result,
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            Err(StoreError::Timeout(timeout))
        }
    }
}

/// True when `e` says the connection was closed under the statement (the network cut it,
/// often while it sat idle in the pool).
fn connection_closed(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(source) => source
            .downcast_ref::<tokio_postgres::Error>()
            .is_some_and(tokio_postgres::Error::is_closed),
        _ => false,
    }
}

/// Runs an idempotent operation (a read, a lease asked for by its owner, a renewal, a
/// release: running it twice is running it once) and, if its connection turns out to have
/// been closed, once more on another connection. After a network cut the pool can hold
/// several connections that died idle; without this, each would cost a caller a failed
/// call after the database is reachable again.
async fn idempotent<T, W>(
    pool: &Pool,
    timeout: Duration,
    work: impl Fn() -> W,
) -> Result<T, StoreError>
where
    W: AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, StoreError>,
{
    match bounded(timeout, checkout(pool, timeout).await?, work()).await {
        Err(e) if connection_closed(&e) => {
            tracing::debug!(error = %e, "a pooled PostgreSQL connection was closed; asking again on another");
            bounded(timeout, checkout(pool, timeout).await?, work()).await
        }
        outcome => outcome,
    }
}

/// What one page of the `due_at` backfill did.
#[derive(Default)]
struct BackfillPage {
    /// Rows whose `due_at` it wrote.
    filled: u64,
    /// Rows a save replaced between the read and the write (left to the next pass).
    replaced: u64,
    /// Rows whose set cannot be decoded (left without `due_at`).
    unreadable: u64,
    /// The last key read.
    last_key: Option<String>,
    /// Whether the page was full: more rows may follow.
    full: bool,
}

/// The suffix of the index `due` reads.
const DUE_INDEX_SUFFIX: &str = "_due_at_idx";
/// The suffix of the index of rows whose `due_at` is not known yet.
const UNKNOWN_DUE_INDEX_SUFFIX: &str = "_due_at_unknown_idx";

/// The name of table `table`'s (`[schema.]name`) index ending in `suffix`, and that name
/// qualified like the table (an index lives in its table's schema).
///
/// PostgreSQL cuts names at 63 bytes, so a table name too long for `name` + `suffix`
/// is cut to leave room for `_` and 8 hex digits of a hash of the whole name: tables
/// whose names share a long prefix get distinct index names. (Names that fit are kept as
/// they are, as earlier versions named them.)
fn index_name(table: &str, suffix: &str) -> (String, String) {
    const MAX: usize = 63;
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    };
    let index = if name.len() + suffix.len() <= MAX {
        format!("{name}{suffix}")
    } else {
        // FNV-1a: stable across Rust versions and platforms, unlike std's hashers.
        let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        // Table names are ASCII: any byte is a char boundary.
        let kept = MAX - suffix.len() - 9;
        format!("{}_{hash:08x}{suffix}", &name[..kept])
    };
    let qualified = match schema {
        Some(schema) => format!("{schema}.{index}"),
        None => index.clone(),
    };
    (index, qualified)
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
    /// `LISTEN`s, on a connection of its own (from a task: call it inside a tokio
    /// runtime), on the channel every save notifies in its own statement. It starts with a
    /// [`Change::Resync`](super::Change::Resync) once listening, and after every lost
    /// connection it connects again (100 ms doubling to 5 s) and sends another. A store
    /// over a pool you built ([`PostgresStore::from_pool`]) cannot watch.
    fn watch(&self) -> Result<super::Watch, StoreError> {
        let Some(listener) = &self.listener else {
            return Err(StoreError::Unsupported(
                "watch (a store over a pool you built)",
            ));
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(listen::listen(
            Arc::clone(listener),
            listen::channel(&self.shared.table),
            sender,
        ));
        Ok(Box::pin(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move { receiver.recv().await.map(|change| (change, receiver)) },
        )))
    }

    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        check_key(key)?;
        let held = held_lease(lease, key, &self.shared)?;
        let fencing_db = to_db(held.fencing)?;
        self.once(async |client| {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&key, &held.owner, &fencing_db];
            let emptied = match client.prepare_cached(&self.shared.sql.delete).await {
                Ok(statement) => client.execute(&statement, &params).await,
                // A table without `due_at` (not upgraded yet), as `save` allows.
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) => {
                    let statement = client
                        .prepare_cached(&self.shared.sql.delete_without_due_at)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client.execute(&statement, &params).await
                }
                Err(e) => Err(e),
            }
            .map_err(|e| self.pg_error(e))?;
            // The row exists while its lease is held: no row changed, no lease.
            if emptied == 1 {
                Ok(())
            } else {
                Err(StoreError::LeaseLost)
            }
        })
        .await
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .idempotent(|| {
                async |client| {
                    let statement = client
                        .prepare_cached(&self.shared.sql.keys)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client
                        .query(&statement, &[])
                        .await
                        .map_err(|e| self.pg_error(e))
                }
            })
            .await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0).map_err(StoreError::unavailable))
            .collect()
    }

    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let before = epoch_micros(before);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .idempotent(|| {
                async |client| {
                    let statement = client
                        .prepare_cached(&self.shared.sql.due)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client
                        .query(&statement, &[&before, &limit])
                        .await
                        .map_err(|e| self.pg_error(e))
                }
            })
            .await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0).map_err(StoreError::unavailable))
            .collect()
    }

    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        check_key(key)?;
        let row = self
            .idempotent(|| {
                async |client| {
                    let statement = client
                        .prepare_cached(&self.shared.sql.load)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client
                        .query_opt(&statement, &[&key])
                        .await
                        .map_err(|e| self.pg_error(e))
                }
            })
            .await?;
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
        let held = held_lease(lease, key, &self.shared)?;
        let version = next_version(key, expected)?;
        let body = String::from_utf8(encode(token, version))
            .map_err(|_| StoreError::unavailable(InvalidConfig("a record that is not UTF-8")))?;
        let expected_db = expected.map(to_db).transpose()?;
        let (version_db, fencing_db) = (to_db(version)?, to_db(held.fencing)?);
        let due_at = token.keep_alive_at().map(epoch_micros);
        self.once(async |client| {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                &key,
                &held.owner,
                &fencing_db,
                &version_db,
                &body,
                &expected_db,
                &due_at,
            ];
            let written = match client.prepare_cached(&self.shared.sql.save).await {
                Ok(statement) => client.execute(&statement, &params).await,
                // A table an earlier version made, not upgraded yet: save as that version
                // did (preparing failed, so nothing ran), rather than refuse every save
                // until somebody runs create_schema.
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) => {
                    self.warn_without_due_at();
                    let statement = client
                        .prepare_cached(&self.shared.sql.save_without_due_at)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client.execute(&statement, &params[..6]).await
                }
                Err(e) => Err(e),
            }
            .map_err(|e| self.pg_error(e))?;
            if written == 1 {
                return Ok(version);
            }
            // Nothing was written: say why. The lease is checked first, as the write did.
            let statement = client
                .prepare_cached(&self.shared.sql.lease_held)
                .await
                .map_err(|e| self.pg_error(e))?;
            let held_now: Option<bool> = client
                .query_opt(&statement, &[&key, &held.owner, &fencing_db])
                .await
                .map_err(|e| self.pg_error(e))?
                .and_then(|row| row.get(0));
            if held_now == Some(true) {
                Err(StoreError::Conflict)
            } else {
                Err(StoreError::LeaseLost)
            }
        })
        .await
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        check_key(key)?;
        let owner = format!("{:032x}", rand::random::<u128>());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let errors = std::sync::atomic::AtomicU32::new(0);
        let (owner_ref, errors_ref) = (&owner, &errors);
        // A connection per attempt: a waiting taker never holds one of the pool's
        // connections while the holder needs it to save.
        let give_up = super::deadline_after(ttl);
        let taken = poll_lease(key, ttl, || async move {
            // Taken before asking: the lease surely ends no later than this plus ttl.
            let asked_at = Instant::now();
            // No attempt outlasts the wait: a lease() that returns has no request of its
            // own still in flight that could grant it later.
            let left = give_up
                .saturating_duration_since(asked_at)
                .max(Duration::from_millis(100));
            let attempt = async {
                self.idempotent(|| async |client| {
                    let statement = client
                        .prepare_cached(&self.shared.sql.lease)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client
                        .query_opt(&statement, &[&key, owner_ref, &ttl_ms])
                        .await
                        .map_err(|e| self.pg_error(e))
                })
                .await
            };
            let attempt = tokio::time::timeout(left, attempt);
            let row = match attempt.await.unwrap_or(Err(StoreError::Timeout(left))) {
                Ok(row) => row,
                // The grant may have happened with its answer lost: ask again as the same
                // owner (the upsert is idempotent for it), a few times.
                Err(e)
                    if e.is_transient()
                        && errors_ref.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                            < LEASE_ERRORS_TOLERATED =>
                {
                    tracing::debug!(error = %e, "asking for the PostgreSQL lease failed; asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            // No row: another holder has the lease.
            let Some(row) = row else {
                return Ok(None);
            };
            let fencing: i64 = row.try_get(0).map_err(StoreError::unavailable)?;
            let fencing = u64::try_from(fencing).unwrap_or(0);
            Ok(Some(Lease::new(
                fencing,
                Some(deadline_from(asked_at, ttl)),
                PostgresLease {
                    pool: self.pool.clone(),
                    shared: Arc::clone(&self.shared),
                    key: key.to_owned(),
                    owner: owner_ref.clone(),
                    fencing,
                },
            )))
        })
        .await;
        if taken.is_err() && errors.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            // A grant whose answer was lost would block every taker until it expires:
            // free it as soon as the database answers again.
            let (store, key) = (self.clone(), key.to_owned());
            tokio::spawn(async move {
                // A request of this taker may still be on its way (a delayed packet): free
                // a grant again a little later too. The owner is never reused, so this
                // can only free a lease nobody holds knowingly.
                for delay in super::FREE_LOST_GRANTS_AFTER {
                    tokio::time::sleep(delay).await;
                    let freed = async {
                        store
                            .idempotent(|| {
                                async |client| {
                                    let statement = client
                                        .prepare_cached(&store.shared.sql.release_owner)
                                        .await
                                        .map_err(|e| store.pg_error(e))?;
                                    client
                                        .execute(&statement, &[&key, &owner])
                                        .await
                                        .map_err(|e| store.pg_error(e))
                                }
                            })
                            .await
                    };
                    if let Err(e) = freed.await {
                        tracing::debug!(error = %e, "could not free a PostgreSQL lease whose grant was lost; it will expire");
                    }
                }
            });
        }
        taken
    }

    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        check_key(key)?;
        let held = held_lease(lease, key, &self.shared)?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let fencing_db = to_db(held.fencing)?;
        let asked_at = Instant::now();
        let renewed = self
            .idempotent(|| {
                async |client| {
                    let statement = client
                        .prepare_cached(&self.shared.sql.renew)
                        .await
                        .map_err(|e| self.pg_error(e))?;
                    client
                        .execute(&statement, &[&key, &held.owner, &fencing_db, &ttl_ms])
                        .await
                        .map_err(|e| self.pg_error(e))
                }
            })
            .await?;
        if renewed == 1 {
            lease.set_expires_at(deadline_from(asked_at, ttl));
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }
}

/// The PostgreSQL lease behind `lease`, if it is this store's lease on `key`.
fn held_lease<'l>(
    lease: &'l Lease,
    key: &str,
    shared: &Shared,
) -> Result<&'l PostgresLease, StoreError> {
    lease
        .guard()
        .and_then(|g| (g as &dyn std::any::Any).downcast_ref::<PostgresLease>())
        .filter(|held| held.key == key && held.shared.table == shared.table)
        .ok_or(StoreError::LeaseLost)
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
        let fencing = to_db(self.fencing)?;
        idempotent(&self.pool, self.shared.op_timeout, || {
            async |client| {
                let statement = client
                    .prepare_cached(&self.shared.sql.release)
                    .await
                    .map_err(|e| pg_error(&self.shared, e))?;
                client
                    .execute(&statement, &[&self.key, &self.owner, &fencing])
                    .await
                    .map_err(|e| pg_error(&self.shared, e))?;
                Ok(())
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::{
        DUE_INDEX_SUFFIX, UNKNOWN_DUE_INDEX_SUFFIX, describe, index_name, valid_table_name,
    };

    #[test]
    fn index_names_fit_and_stay_distinct() {
        // Names that fit keep the names earlier versions gave them.
        assert_eq!(
            index_name("tokenkeeper_tokens", DUE_INDEX_SUFFIX),
            (
                "tokenkeeper_tokens_due_at_idx".to_owned(),
                "tokenkeeper_tokens_due_at_idx".to_owned()
            )
        );
        assert_eq!(
            index_name("auth.tokens2", DUE_INDEX_SUFFIX),
            (
                "tokens2_due_at_idx".to_owned(),
                "auth.tokens2_due_at_idx".to_owned()
            )
        );
        let long = |tail: &str| format!("{}{tail}", "t".repeat(60));
        for suffix in [DUE_INDEX_SUFFIX, UNKNOWN_DUE_INDEX_SUFFIX] {
            let (a, _) = index_name(&long("abc"), suffix);
            let (b, _) = index_name(&long("abd"), suffix);
            assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
            assert!(a.ends_with(suffix) && b.ends_with(suffix), "{a} {b}");
            assert_ne!(a, b);
            assert_eq!(index_name(&long("abc"), suffix).0, a, "stable");
            let (qualified, _) = index_name(&format!("s.{}", long("abc")), suffix);
            assert_eq!(qualified, a, "the schema does not change the name");
        }
    }

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

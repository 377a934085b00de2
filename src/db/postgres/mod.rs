//! The PostgreSQL backend: every store of [`crate::db`] over one connection pool.
//!
//! Production runs here: several processes share the database, so every cross-process rule (the
//! log-head lock, the registry's leases, the relay's lease) is a row lock or a conditional
//! statement, never process memory.

mod index;
mod reservations;
mod query;
mod read;
mod registry;
mod state;
pub mod tls;

pub use index::SELECT_VERSIONS;

use super::read::ReadSchema;
use super::{Database, DbError, Migration, Schema};
use crate::config::DatabaseConfig;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;

/// The stores over a pool for `url`.
pub(super) fn open(config: &DatabaseConfig) -> Result<Database, DbError> {
    let (url, pool_size) = (config.url.expose(), config.pool_size);
    let index_commit = if config.synchronous_index_commit { SYNCHRONOUS_COMMIT } else { ASYNCHRONOUS_COMMIT };
    let pg = Pg { text_search: Arc::new(config.text_search_configs()), index_commit, ..Pg::connect(url, pool_size)? };
    let store = Arc::new(pg.clone());
    // The registry's own connections, planned once per statement (`Plans::Cached`), and
    // committing without the WAL flush unless configured otherwise (`Commits`).
    let commits = if config.synchronous_registry_commit { Commits::Flushed } else { Commits::Unflushed };
    let registry = registry::PgRegistry { pool: pool(url, pool_size, Plans::Cached, commits)? };
    Ok(Database {
        index: store.clone(),
        registry: Arc::new(registry),
        read: store.clone(),
        checkpoints: store.clone(),
        leases: store.clone(),
        stages: store.clone(),
        schema: store,
        postgres: Some(pg),
    })
}

/// Migrations, applied in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_log_index",
        sql: include_str!("../../../migrations/postgres/0001_log_index.sql"),
    },
    Migration {
        name: "0002_processed_events",
        sql: include_str!("../../../migrations/postgres/0002_processed_events.sql"),
    },
    Migration {
        name: "0003_relay",
        sql: include_str!("../../../migrations/postgres/0003_relay.sql"),
    },
    Migration {
        name: "0004_read_models",
        sql: include_str!("../../../migrations/postgres/0004_read_models.sql"),
    },
    Migration {
        name: "0005_read_schema",
        sql: include_str!("../../../migrations/postgres/0005_read_schema.sql"),
    },
    Migration {
        name: "0006_projection_failures",
        sql: include_str!("../../../migrations/postgres/0006_projection_failures.sql"),
    },
    Migration {
        name: "0007_stage_liveness",
        sql: include_str!("../../../migrations/postgres/0007_stage_liveness.sql"),
    },
    Migration {
        name: "0008_stage_position",
        sql: include_str!("../../../migrations/postgres/0008_stage_position.sql"),
    },
    Migration {
        name: "0009_failed_events",
        sql: include_str!("../../../migrations/postgres/0009_failed_events.sql"),
    },
    Migration {
        name: "0010_log_reservations",
        sql: include_str!("../../../migrations/postgres/0010_log_reservations.sql"),
    },
    Migration {
        name: "0011_datetime_instants",
        sql: include_str!("../../../migrations/postgres/0011_datetime_instants.sql"),
    },
];
/// A pooled PostgreSQL connection set.
#[derive(Clone)]
pub struct Pg {
    pool: Pool,
    /// The text search configurations `q=` may search in, each with its index on the read
    /// models (`read::ddl`).
    text_search: Arc<Vec<String>>,
    /// How the serial writer's batch transaction ends (`database.synchronous_index_commit`).
    pub(super) index_commit: &'static str,
}

/// Ends a batch transaction once the WAL is flushed.
pub(super) const SYNCHRONOUS_COMMIT: &str = "COMMIT";
/// Ends a batch transaction without waiting for the WAL flush: the rows describe a segment
/// already durable in the log (`docs/design.md`, "The index commit and the WAL flush").
pub(super) const ASYNCHRONOUS_COMMIT: &str = "SET LOCAL synchronous_commit TO off; COMMIT";

/// How a pool's connections plan prepared statements.
#[derive(Clone, Copy)]
enum Plans {
    /// Every execution, with the table as it is now. A prepared statement's generic plan is
    /// cached after a few runs; made while `aggregate_versions` was empty, the version look-up
    /// became a hash join over a full scan of the table, on every batch, for ever where
    /// autovacuum is off (2.4x fewer commands/s measured). The index's and read models'
    /// statements (joins, `= ANY`, ranges) plan this way.
    Fresh,
    /// PostgreSQL's default: a generic plan once it is as cheap as the custom ones. For the
    /// registry, whose statements each read one table by key (its primary key, or the failed
    /// events' partial index), with no join or range whose best plan depends on the table's
    /// size, so no generic plan of theirs can be worse; planning them at every execution cost
    /// 15-28 % of the end-to-end throughput (pipeline bench, `docs/design.md`).
    Cached,
}

/// Whether a pool's connections wait for the WAL flush when a transaction commits.
#[derive(Clone, Copy)]
enum Commits {
    /// The server's setting (`synchronous_commit`, normally on).
    Flushed,
    /// `synchronous_commit = off`: a commit is visible to every session at once, as usual, and
    /// reaches the disk within a few hundred milliseconds; a server crash before then loses
    /// it. For the registry's claims, heartbeats and `done`s, which the log makes good
    /// (`docs/design.md`, "The registry's commits").
    Unflushed,
}

/// A pool for `url`, with TLS as its `sslmode` and `sslrootcert` say ([`tls`]).
fn pool(url: &str, pool_size: usize, plans: Plans, commits: Commits) -> Result<Pool, DbError> {
    let tls = tls::PgTls::from_url(url)?;
    let mut config = tokio_postgres::Config::from_str(&tls.url)?;
    config.connect_timeout(Duration::from_secs(5));
    let mut options: Vec<&str> = config.get_options().filter(|o| !o.is_empty()).into_iter().collect();
    if let Plans::Fresh = plans {
        options.push("-c plan_cache_mode=force_custom_plan");
    }
    if let Commits::Unflushed = commits {
        options.push("-c synchronous_commit=off");
    }
    if !options.is_empty() {
        let options = options.join(" ");
        config.options(&options);
    }
    let recycling = || ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match tls.client_config()? {
        None => Manager::from_config(config, NoTls, recycling()),
        Some(rustls) => Manager::from_config(config, tokio_postgres_rustls::MakeRustlsConnect::new(rustls), recycling()),
    };
    Pool::builder(manager)
        .max_size(pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Setup(e.to_string()))
}

impl Pg {
    /// A pool for `url`, with TLS as its `sslmode` and `sslrootcert` say ([`tls`]), whose
    /// connections plan every execution afresh ([`Plans::Fresh`]).
    pub fn connect(url: &str, pool_size: usize) -> Result<Pg, DbError> {
        let pool = pool(url, pool_size, Plans::Fresh, Commits::Flushed)?;
        Ok(Pg { pool, text_search: Arc::new(vec!["simple".to_string()]), index_commit: SYNCHRONOUS_COMMIT })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Applies pending migrations under an advisory lock, so concurrent starts do not race.
    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock(7363697065640001);
             CREATE TABLE IF NOT EXISTS spiced_migrations (
                 name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let done: Vec<String> = tx
            .query("SELECT name FROM spiced_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut applied = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| !done.iter().any(|d| d == m.name)) {
            tx.batch_execute(m.sql).await?;
            tx.execute("INSERT INTO spiced_migrations (name) VALUES ($1)", &[&m.name])
                .await?;
            applied.push(m.name.to_string());
        }
        // The live read models are not a numbered migration: a rebuild creates the same tables
        // under another name.
        tx.batch_execute(&read::ddl(&ReadSchema::live(), &self.text_search)).await?;
        tx.commit().await?;
        Ok(applied)
    }
}


#[async_trait]
impl Schema for Pg {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<Vec<String>, DbError> {
        Pg::migrate(self).await
    }
}

/// The qualified name of one of the schema's tables.
fn table(schema: &ReadSchema, table: &str) -> String {
    format!("\"{}\".{table}", schema.name())
}

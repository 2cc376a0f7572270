//! `PostgresStore` against a real PostgreSQL cluster (feature `postgres`; the server comes
//! from Debian's `postgresql` package, see scripts/install-test-deps.sh).
#![cfg(feature = "postgres")]

#[path = "support/scenarios.rs"]
mod scenarios;
#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;

use servers::PostgresServer;
use tokenkeeper::TokenStore;
use tokenkeeper::store::conformance::{self, Leases};
use tokenkeeper::store::postgres::PostgresStore;

async fn connect(server: &PostgresServer) -> PostgresStore {
    let store = PostgresStore::connect(&server.url())
        .await
        .expect("connect to the test PostgreSQL server");
    store.create_schema().await.expect("create the schema");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let server = PostgresServer::start();
    conformance::run(&connect(&server).await, Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_with_another_table() {
    let server = PostgresServer::start();
    let store = PostgresStore::connect(&server.url())
        .await
        .unwrap()
        .with_table("public.other_tokens");
    store.create_schema().await.unwrap();
    // Idempotent, and concurrent calls are fine.
    let (a, b) = tokio::join!(store.create_schema(), store.create_schema());
    a.unwrap();
    b.unwrap();
    conformance::run(&store, Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_persists_across_instances() {
    let server = PostgresServer::start();
    conformance::persists_across_instances(&connect(&server).await, &connect(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_holder_is_fenced_off() {
    let server = PostgresServer::start();
    scenarios::paused_holder_is_fenced_off(&connect(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_source_takes_over_an_abandoned_lease() {
    let server = PostgresServer::start();
    scenarios::a_source_takes_over_an_abandoned_lease(Arc::new(connect(&server).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_gives_storage_errors_then_recovers() {
    let mut server = PostgresServer::start();
    let store: Arc<dyn TokenStore> = Arc::new(connect(&server).await);
    scenarios::outage_then_recovery(store, &mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dying_during_a_refresh_loses_nothing() {
    let mut server = PostgresServer::start();
    let store: Arc<dyn TokenStore> = Arc::new(connect(&server).await);
    scenarios::store_dies_during_a_refresh(store, &mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_debug_hides_the_password() {
    let server = PostgresServer::start();
    let url = format!(
        "postgresql://postgres:s3cr3t-pw@127.0.0.1:{}/postgres",
        server.port()
    );
    // Trust authentication ignores the password.
    let store = PostgresStore::connect(&url).await.unwrap();
    let shown = format!("{store:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    assert!(shown.contains("127.0.0.1"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_server_is_unavailable() {
    let port = servers::free_port();
    let result = PostgresStore::connect(&format!(
        "postgresql://postgres:s3cr3t-pw@127.0.0.1:{port}/postgres"
    ))
    .await;
    match result {
        Err(e @ tokenkeeper::store::StoreError::Unavailable(_)) => {
            assert!(!format!("{e:?}").contains("s3cr3t-pw"));
        }
        other => panic!("got {other:?}"),
    }
}

//! The conformance suite, run by the built-in stores.

use tokenkeeper::store::conformance::{self, Leases};
use tokenkeeper::{FileStore, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    conformance::run(&MemoryStore::new(), Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run(&FileStore::new(dir.path()), Leases::ProcessBound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_persists_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    conformance::persists_across_instances(
        &FileStore::new(dir.path()),
        &FileStore::new(dir.path()),
    )
    .await;
}

//! The conformance suite, run by the built-in stores.

use tokenkeeper::store::conformance::{self, Leases};
use tokenkeeper::{FileStore, MemoryStore, TokenStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    conformance::run(&MemoryStore::new(), Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    assert!(store.watch().is_ok(), "a FileStore watches");
    conformance::run(&store, Leases::ProcessBound).await;
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

/// The same with the watch listing the directory instead of the OS's notifications (the
/// fallback, and the mode for network file systems).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_watching_by_polling_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).watch_by_polling(std::time::Duration::from_millis(20));
    assert!(store.watch().is_ok(), "a FileStore watches");
    conformance::run(&store, Leases::ProcessBound).await;
}

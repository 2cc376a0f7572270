//! [`FileStore`]'s watch: the operating system's file-system notifications (inotify,
//! kqueue, ReadDirectoryChangesW, through the `notify` crate), or polling the directory
//! where those are unavailable (an exhausted inotify limit, a platform without them) or
//! blind (a network file system shared by several machines: see
//! [`FileStore::watch_by_polling`]).
//!
//! Either way a change names a file; the watch reads that file for its version, so a
//! save is reported only once it can be read, and with the version it returned. Every
//! save renames a new file over the key's (a new inode), so neither way can miss one
//! that lands within the file system's timestamp resolution.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{FileStore, blocking, unescape};
use crate::store::{Change, StoreError, Watch};

/// How many changed keys wait, at most, between the notifier's thread and the stream;
/// beyond that the stream reports a [`Change::Resync`] for what it dropped.
const QUEUED: usize = 4096;

/// The polling interval when notifications are unavailable.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What the notifier tells the stream.
enum Signal {
    /// A token file changed: its key.
    Changed(String),
    /// Notifications were lost (the kernel's queue overflowed).
    Rescan,
}

/// The key of the token file at `path`, if it is one (not a temporary or lock file).
fn key_of(path: &Path) -> Option<String> {
    unescape(path.file_name()?.to_str()?.strip_suffix(".json")?)
}

pub(super) fn watch(store: &FileStore) -> Result<Watch, StoreError> {
    store.create_dir().map_err(StoreError::unavailable)?;
    let source = match store.poll_interval {
        Some(interval) => Source::Polling(Poller::new(interval)),
        None => match notifier(&store.dir) {
            Ok(notifier) => Source::Notified(notifier),
            Err(e) => {
                tracing::warn!(dir = %store.dir.display(), error = %e, "file-system notifications are unavailable; polling the token directory every 250 ms instead");
                Source::Polling(Poller::new(DEFAULT_POLL_INTERVAL))
            }
        },
    };
    let store = store.clone();
    Ok(Box::pin(futures_util::stream::unfold(
        (source, store, VecDeque::new()),
        |(mut source, store, mut ready)| async move {
            loop {
                if let Some(change) = ready.pop_front() {
                    return Some((change, (source, store, ready)));
                }
                let keys = match source.next(&store).await? {
                    Next::Keys(keys) => keys,
                    Next::Resync => return Some((Change::Resync, (source, store, ready))),
                };
                ready.extend(read_versions(&store, keys).await);
            }
        },
    )))
}

/// The saves `keys` stand for: each key's stored version. A file that vanished since is
/// no save to report; one that cannot be read is skipped (whoever reads it next gets the
/// error).
async fn read_versions(store: &FileStore, keys: Vec<String>) -> Vec<Change> {
    let store = store.clone();
    blocking(move || {
        Ok(keys
            .into_iter()
            .filter_map(|key| match store.read(&key) {
                Ok(Some(stored)) => Some(Change::Saved {
                    key,
                    version: stored.version,
                }),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(key = %key, error = %e, "a changed token file cannot be read; not reported");
                    None
                }
            })
            .collect())
    })
    .await
    .unwrap_or_default()
}

enum Next {
    Keys(Vec<String>),
    Resync,
}

enum Source {
    Notified(Notifier),
    Polling(Poller),
}

impl Source {
    /// The next batch of changed keys; `None` when the watch cannot go on.
    async fn next(&mut self, store: &FileStore) -> Option<Next> {
        match self {
            Source::Notified(notifier) => {
                let signal = notifier.receiver.recv().await?;
                // Changes dropped while the queue was full: the consumer reads again.
                if notifier.overflowed.swap(false, Ordering::AcqRel) {
                    return Some(Next::Resync);
                }
                Some(match signal {
                    Signal::Changed(key) => Next::Keys(vec![key]),
                    Signal::Rescan => Next::Resync,
                })
            }
            Source::Polling(poller) => Some(poller.next(store).await),
        }
    }
}

/// The OS notifications for the directory, forwarded from the notifier's thread.
struct Notifier {
    /// Kept for as long as the watch: dropping it stops the notifications.
    _watcher: notify::RecommendedWatcher,
    receiver: mpsc::Receiver<Signal>,
    overflowed: Arc<AtomicBool>,
}

fn notifier(dir: &Path) -> notify::Result<Notifier> {
    use notify::Watcher;
    let (sender, receiver) = mpsc::channel(QUEUED);
    let overflowed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&overflowed);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let signals: Vec<Signal> = match event {
            Ok(event) if event.need_rescan() => vec![Signal::Rescan],
            // A file read or removed is no save (a save renames a new file into place).
            Ok(event) if event.kind.is_access() || event.kind.is_remove() => Vec::new(),
            Ok(event) => event
                .paths
                .iter()
                .filter_map(|path| key_of(path))
                .map(Signal::Changed)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "file-system notifications failed; the token files are read again");
                vec![Signal::Rescan]
            }
        };
        for signal in signals {
            if sender.try_send(signal).is_err() {
                flag.store(true, Ordering::Release);
            }
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(Notifier {
        _watcher: watcher,
        receiver,
        overflowed,
    })
}

/// What identifies one write of a token file: a save renames a new file over the old
/// one, so its inode (or, without one, its modification time and length) differs.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified: Option<std::time::SystemTime>,
    len: u64,
}

impl Stamp {
    fn of(metadata: &fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(metadata);
        #[cfg(not(unix))]
        let inode = 0;
        Stamp {
            inode,
            modified: metadata.modified().ok(),
            len: metadata.len(),
        }
    }
}

/// Lists the directory every `interval` and reports the token files whose stamp changed.
struct Poller {
    interval: Duration,
    /// The stamps of the last listing; `None` before the first.
    seen: Option<HashMap<String, Stamp>>,
}

impl Poller {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: None,
        }
    }

    async fn next(&mut self, store: &FileStore) -> Next {
        loop {
            let first = self.seen.is_none();
            if !first {
                tokio::time::sleep(self.interval).await;
            }
            let dir = store.dir.clone();
            let listing = blocking(move || stamps(&dir).map_err(StoreError::unavailable)).await;
            let listing = match listing {
                Ok(listing) => listing,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the token directory to watch it");
                    continue;
                }
            };
            let Some(seen) = self.seen.replace(listing) else {
                // Saves between the call and this first listing are not told apart from
                // older ones: the consumer reads again.
                return Next::Resync;
            };
            let current = self.seen.as_ref().expect("just set");
            let changed: Vec<String> = current
                .iter()
                .filter(|(key, stamp)| seen.get(*key) != Some(stamp))
                .map(|(key, _)| key.clone())
                .collect();
            if !changed.is_empty() {
                return Next::Keys(changed);
            }
        }
    }
}

/// The stamp of every token file in `dir`.
fn stamps(dir: &Path) -> io::Result<HashMap<String, Stamp>> {
    let mut stamps = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(key) = key_of(&entry.path()) else {
            continue;
        };
        match entry.metadata() {
            Ok(metadata) => {
                stamps.insert(key, Stamp::of(&metadata));
            }
            // Replaced or removed since it was listed: the next listing sees it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(stamps)
}

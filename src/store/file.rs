//! [`FileStore`]: one JSON file per key in a directory, shared by the processes of a machine.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    Lease, LeaseRelease, StoreError, TokenStore, Versioned, decode, encode, next_version,
    poll_lease,
};
use crate::token::TokenSet;

mod watch;

/// The suffix of temporary files.
const TEMP_SUFFIX: &str = ".tmp";

/// A directory of token files: `<key>.json`, each written atomically (temporary file,
/// fsync, rename, fsync of the directory) and readable by its owner only (mode 0600 from
/// the first byte; the directory is created 0700).
///
/// The lease is an OS lock (`File::lock`) on a sidecar `<key>.json.lock` file: it excludes
/// other processes and other tasks alike, and the OS releases it if the holder dies, so
/// it never expires while its holder lives.
///
/// A file that cannot be read as a token set is reported as [`StoreError::Corrupt`] and
/// never overwritten: move it away to start over.
///
/// A save writes `.<stem>~XXXXXX.tmp` (random `XXXXXX`) after recording that name in the
/// key's lock file, and removes the temporary file the previous save of the key recorded
/// if it is still there (its writer died before renaming it). A save therefore never lists
/// the directory: its cost does not grow with the number of keys. Temporary files left by
/// earlier versions, which did not record their names, are not removed by saves: delete
/// `.*~*.tmp` files by hand while no process uses the directory.
///
/// [`TokenStore::due`] reads every token file (a scan: for operators and schedulers,
/// not for every request); a file it cannot read is skipped with a warning naming its key.
///
/// [`TokenStore::watch`] follows the directory with the operating system's file-system
/// notifications (inotify on Linux, kqueue on macOS and the BSDs, ReadDirectoryChangesW
/// on Windows), or, where those are unavailable (an exhausted inotify limit), by listing
/// it every 250 ms. Notifications see the writes of this machine only: a directory on a
/// network file system shared by several machines needs
/// [`FileStore::watch_by_polling`].
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
    /// Watch by listing the directory at this interval instead of by notifications.
    poll_interval: Option<Duration>,
}

impl FileStore {
    /// A store in `dir`, created on first use.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            poll_interval: None,
        }
    }

    /// Watches the directory by listing it every `interval` (at least 10 ms) instead of
    /// by file-system notifications: for a network file system that several machines
    /// write (notifications report this machine's writes only). Each listing reads the
    /// metadata of every token file, so its cost grows with the number of keys.
    pub fn watch_by_polling(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `key`'s token set.
    pub fn path_for(&self, key: &str) -> Result<PathBuf, StoreError> {
        Ok(self.dir.join(format!("{}.json", file_stem(key)?)))
    }

    /// Where versions before 0.2 kept `key` (upper-case letters unescaped), when that
    /// differs from [`FileStore::path_for`]: read when the current file is absent, and
    /// removed by the next save.
    fn legacy_path_for(&self, key: &str) -> Option<PathBuf> {
        let legacy = legacy_file_stem(key)?;
        (file_stem(key).ok()? != legacy).then(|| self.dir.join(format!("{legacy}.json")))
    }

    /// `lease`'s lock, if it is this store's lease on `key` ([`StoreError::LeaseLost`]
    /// otherwise: a write with it changes nothing).
    fn held<'l>(&self, key: &str, lease: &'l Lease) -> Result<&'l FileLock, StoreError> {
        let lock_path = self.lock_path(key)?;
        lease
            .guard()
            .and_then(|g| (g as &dyn std::any::Any).downcast_ref::<FileLock>())
            .filter(|lock| lock.path == lock_path)
            .ok_or(StoreError::LeaseLost)
    }

    fn lock_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        Ok(self.dir.join(format!("{}.json.lock", file_stem(key)?)))
    }

    fn create_dir(&self) -> io::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir)
    }

    /// The keys of the token files in the directory (current and legacy names), sorted;
    /// temporary and lock files are not token files.
    fn list(&self) -> Result<Vec<String>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::unavailable(e)),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let name = entry.map_err(StoreError::unavailable)?.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(key) = unescape(stem) {
                keys.push(key);
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// [`TokenStore::due`]: reads every token file. One that cannot be read is skipped,
    /// with a warning naming its key (never its content).
    fn scan_due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut due = Vec::new();
        for key in self.list()? {
            match self.read(&key) {
                Ok(Some(stored)) => {
                    if let Some(at) = stored.value.keep_alive_at()
                        && at <= before
                    {
                        due.push((at, key));
                    }
                }
                // Removed since it was listed (a legacy file moved by a save).
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    key = %key,
                    error = %e,
                    "skipping a token file that cannot be read while looking for due keys"
                ),
            }
        }
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, key)| key).collect())
    }

    fn read(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        match read_file(&self.path_for(key)?)? {
            Some(bytes) => decode(key, &bytes).map(Some),
            None => match self.legacy_path_for(key) {
                Some(legacy) => match read_file(&legacy)? {
                    Some(bytes) => decode(key, &bytes).map(Some),
                    None => Ok(None),
                },
                None => Ok(None),
            },
        }
    }

    /// Creates the key's next temporary file, `.<stem>~XXXXXX.tmp`, after removing the
    /// one the key's previous save recorded in `lock` (the key's locked lock file) if it
    /// is still there: its writer died before renaming it (we hold the lock). The new
    /// name is recorded in `lock` before the file exists, so a writer killed at any point
    /// leaves nothing the next save does not know about. No directory listing: the cost
    /// does not grow with the number of keys. (The record is not fsynced: after a power
    /// loss, unlike a killed process, a leftover may go unrecorded and stay.)
    fn create_temp(&self, key: &str, lock: &File) -> io::Result<tempfile::NamedTempFile> {
        // `~` never occurs in a stem, so no other key's temporary file matches.
        let prefix = format!(".{}~", file_stem(key).map_err(io::Error::other)?);
        if let Some(leftover) = recorded_temp(lock, &prefix)?
            && let Err(e) = fs::remove_file(self.dir.join(&leftover))
            && e.kind() != io::ErrorKind::NotFound
        {
            // Not worth failing the save for; the file name holds no secret.
            tracing::warn!(file = %leftover, error = %e, "cannot remove a dead writer's temporary file");
        }
        // Mode 0600 from the first byte, O_EXCL (a name that exists is retried with
        // another), in the same directory so that the rename is atomic.
        tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(TEMP_SUFFIX)
            .make_in(&self.dir, |path| {
                record_temp(lock, path)?;
                let mut options = OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                options.open(path)
            })
    }

    /// Writes through a temporary file named after the key (see
    /// [`FileStore::create_temp`]), fsynced, renamed over the key's file, and the
    /// directory fsynced. Called under the key's lease; `lock` is its locked file.
    fn write_atomically(&self, key: &str, lock: &File, bytes: &[u8]) -> io::Result<()> {
        let mut temp = self.create_temp(key, lock)?;
        temp.write_all(bytes)?;
        temp.as_file().sync_all()?;
        temp.persist(self.path_for(key).map_err(io::Error::other)?)
            .map_err(|e| e.error)?;
        if let Some(legacy) = self.legacy_path_for(key) {
            match fs::remove_file(legacy) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        sync_dir(&self.dir)
    }
}

/// The longest temporary file name recorded in a lock file.
const MAX_RECORDED: u64 = 512;

/// The temporary file name the key's last save recorded in its lock file, if it is one
/// of this key's (`prefix`…`.tmp`, a plain name): anything else there (an empty file, a
/// write cut short) names nothing.
fn recorded_temp(mut lock: &File, prefix: &str) -> io::Result<Option<String>> {
    let mut recorded = Vec::new();
    lock.seek(SeekFrom::Start(0))?;
    lock.take(MAX_RECORDED).read_to_end(&mut recorded)?;
    let Ok(name) = String::from_utf8(recorded) else {
        return Ok(None);
    };
    let plain = !name.contains(['/', '\\', '\0']);
    Ok((plain && name.starts_with(prefix) && name.ends_with(TEMP_SUFFIX)).then_some(name))
}

/// Records `temp`'s file name in the key's lock file, replacing the previous one.
fn record_temp(mut lock: &File, temp: &Path) -> io::Result<()> {
    let name = temp
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("a temporary file name that is not UTF-8"))?;
    lock.set_len(0)?;
    lock.seek(SeekFrom::Start(0))?;
    lock.write_all(name.as_bytes())
}

fn read_file(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => file
            .read_to_end(&mut bytes)
            .map_err(StoreError::unavailable)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::unavailable(e)),
    };
    Ok(Some(bytes))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// The longest file stem: file systems cap names at 255 bytes, and the lock file
/// (`.json.lock`) and temporary files (`.<stem>~XXXXXX.tmp`) add to it.
const MAX_STEM: usize = 200;

/// Keys become file names: `[a-z0-9_-]` and `.` (not leading) stay, every other byte
/// (upper-case letters included) is written `%XX`, so distinct keys never share a file,
/// even on case-insensitive file systems (macOS, Windows). A key whose name would exceed
/// [`MAX_STEM`] bytes is [`StoreError::InvalidKey`].
fn file_stem(key: &str) -> Result<String, StoreError> {
    let stem = escape(key, |b| b.is_ascii_lowercase())?;
    if stem.len() > MAX_STEM {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "too long for a file name (at most 200 bytes once escaped)",
        });
    }
    Ok(stem)
}

/// The stem versions before 0.2 used: upper-case letters kept as they are.
fn legacy_file_stem(key: &str) -> Option<String> {
    escape(key, |b| b.is_ascii_alphabetic()).ok()
}

fn escape(key: &str, keep_letter: impl Fn(u8) -> bool) -> Result<String, StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "empty",
        });
    }
    let mut stem = String::with_capacity(key.len());
    for (i, b) in key.bytes().enumerate() {
        match b {
            b if keep_letter(b) => stem.push(char::from(b)),
            b'0'..=b'9' | b'_' | b'-' => stem.push(char::from(b)),
            b'.' if i > 0 => stem.push('.'),
            _ => stem.push_str(&format!("%{b:02X}")),
        }
    }
    Ok(stem)
}

/// The key a file stem stands for (current or legacy escaping); `None` for names this
/// store did not write (temporary files start with a dot).
fn unescape(stem: &str) -> Option<String> {
    if stem.is_empty() || stem.starts_with('.') {
        return None;
    }
    let bytes = stem.as_bytes();
    let mut key = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            key.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            key.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(key).ok()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StoreError::unavailable)?
}

#[async_trait]
impl TokenStore for FileStore {
    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        file_stem(key).map(drop)
    }

    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        let (store, key) = (self.clone(), key.to_owned());
        blocking(move || store.read(&key)).await
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let store = self.clone();
        blocking(move || store.list()).await
    }

    fn watch(&self) -> Result<super::Watch, StoreError> {
        watch::watch(self)
    }

    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let lock = self.held(key, lease)?;
        // Held open until done, as a save does (a caller that stops waiting does not
        // unlock the key under the removal).
        let locked = Arc::clone(&lock.file);
        let store = self.clone();
        let key = key.to_owned();
        blocking(move || {
            let _locked = locked;
            let paths = [Some(store.path_for(&key)?), store.legacy_path_for(&key)];
            for path in paths.into_iter().flatten() {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(StoreError::unavailable(e));
                    }
                    _ => {}
                }
            }
            sync_dir(&store.dir).map_err(StoreError::unavailable)
        })
        .await
    }

    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let store = self.clone();
        blocking(move || store.scan_due(before, limit)).await
    }

    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        let lock = self.held(key, lease)?;
        // The write holds the locked file open until it is done: a caller that stops
        // waiting and releases the lease does not unlock the key under a write still in
        // progress (the OS lock lasts as long as any handle to it).
        let locked = Arc::clone(&lock.file);
        let (store, key, token) = (self.clone(), key.to_owned(), token.clone());
        blocking(move || {
            let current = store.read(&key)?.map(|v| v.version);
            if current != expected {
                return Err(StoreError::Conflict);
            }
            let version = next_version(&key, current)?;
            store
                .write_atomically(&key, &locked, &encode(&token, version))
                .map_err(StoreError::unavailable)?;
            Ok(version)
        })
        .await
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let path = self.lock_path(key)?;
        let path_for_lock = path.clone();
        let store = self.clone();
        let file = blocking(move || {
            store.create_dir().map_err(StoreError::unavailable)?;
            let mut options = OpenOptions::new();
            // Read and written too: it records the key's temporary file name.
            options.create(true).truncate(false).read(true).write(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(&path).map_err(StoreError::unavailable)
        })
        .await?;
        // The lease owns the locked file: taken out of here once, on success.
        let mut file = Some(file);
        poll_lease(key, ttl, || {
            let taken = match file.as_ref().map(File::try_lock) {
                Some(Ok(())) => Ok(file.take().map(|file| {
                    Lease::new(
                        0,
                        None,
                        FileLock {
                            path: path_for_lock.clone(),
                            file: Arc::new(file),
                        },
                    )
                })),
                Some(Err(TryLockError::WouldBlock)) | None => Ok(None),
                Some(Err(TryLockError::Error(e))) => Err(StoreError::unavailable(e)),
            };
            std::future::ready(taken)
        })
        .await
    }
}

/// The held lock file; when the last handle to it closes, the lock is released.
#[derive(Debug)]
struct FileLock {
    path: PathBuf,
    file: Arc<File>,
}

#[async_trait]
impl LeaseRelease for FileLock {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }

    fn releases_on_drop(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::file_stem;

    /// The key's lock file, as a lease opens it (without locking it: these tests write
    /// from one thread).
    fn lock_file(store: &super::FileStore, key: &str) -> std::fs::File {
        store.create_dir().unwrap();
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(store.lock_path(key).unwrap())
            .unwrap()
    }

    fn names_in(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_dead_writers_temporary_file_is_removed_by_the_next_save() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::new(dir.path());
        let lock = lock_file(&store, "k");
        // A writer killed after writing part of its temporary file: no destructor runs.
        let mut dead = store.create_temp("k", &lock).unwrap();
        dead.write_all(b"partial").unwrap();
        let dead = dead.into_temp_path().keep().unwrap();
        assert!(dead.exists());
        std::fs::write(dir.path().join(".other~live.tmp"), b"partial").unwrap();
        store.write_atomically("k", &lock, b"{}").unwrap();
        assert_eq!(
            names_in(dir.path()),
            [".other~live.tmp", "k.json", "k.json.lock"]
        );
        // And again after a save that completed: nothing is left either.
        let mut dead = store.create_temp("k", &lock).unwrap();
        dead.write_all(b"partial").unwrap();
        dead.into_temp_path().keep().unwrap();
        store.write_atomically("k", &lock, b"{}").unwrap();
        store.write_atomically("k", &lock, b"{}").unwrap();
        assert_eq!(
            names_in(dir.path()),
            [".other~live.tmp", "k.json", "k.json.lock"]
        );
    }

    /// What a lock file records never makes a save remove a file that is not one of the
    /// key's temporary files.
    #[test]
    fn a_lock_file_naming_another_file_removes_nothing() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::new(dir.path());
        // A directory that a name with a `/` could go through.
        std::fs::create_dir(dir.path().join(".k~")).unwrap();
        for recorded in [
            "other.json",
            ".other~x.tmp",
            "../k.json",
            ".k~/../.other~x.tmp",
        ] {
            std::fs::write(dir.path().join("other.json"), b"{}").unwrap();
            std::fs::write(dir.path().join(".other~x.tmp"), b"{}").unwrap();
            let mut lock = lock_file(&store, "k");
            lock.set_len(0).unwrap();
            lock.write_all(recorded.as_bytes()).unwrap();
            store.write_atomically("k", &lock, b"{}").unwrap();
            assert_eq!(
                names_in(dir.path()),
                [".k~", ".other~x.tmp", "k.json", "k.json.lock", "other.json"],
                "{recorded}"
            );
        }
    }

    /// `due` skips a file it cannot read (a warning names the key, never the content) and
    /// still lists the others; temporary and lock files are not token files.
    #[test]
    fn due_skips_an_unreadable_file_with_a_warning_naming_its_key() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Logs(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Logs {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::new(dir.path());
        let mut set = crate::TokenSet::from_refresh_token(
            crate::RefreshToken::new("rt-good"),
            time::macros::datetime!(1971-01-01 0:00 UTC),
        );
        set.refresh_expires_at = Some(set.obtained_at + time::Duration::hours(1));
        let at = set.keep_alive_at().unwrap();
        std::fs::write(store.path_for("good").unwrap(), super::encode(&set, 1)).unwrap();
        std::fs::write(
            store.path_for("bad").unwrap(),
            br#"{"schema": 1, "version": "rt-secret-in-a-broken-file"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(".good~x.tmp"), b"partial").unwrap();
        std::fs::write(dir.path().join("good.json.lock"), b".good~x.tmp").unwrap();
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let due = tracing::subscriber::with_default(subscriber, || store.scan_due(at, 10));
        assert_eq!(due.unwrap(), ["good"]);
        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("WARN") && logs.contains("bad"), "{logs}");
        assert!(!logs.contains("rt-secret"), "{logs}");
    }

    /// A write still running when its caller gave up (and released the lease) keeps the
    /// key locked until it is done: no other holder writes under it.
    #[tokio::test]
    async fn a_write_in_flight_keeps_the_lock_after_the_lease_is_released() {
        use crate::store::{StoreError, TokenStore};
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::new(dir.path());
        let lease = store.lease("k", Duration::from_secs(5)).await.unwrap();
        let in_flight = lease
            .guard()
            .and_then(|g| (g as &dyn std::any::Any).downcast_ref::<super::FileLock>())
            .map(|lock| std::sync::Arc::clone(&lock.file))
            .unwrap();
        lease.release().await.unwrap();
        let other = store.lease("k", Duration::from_millis(100)).await;
        assert!(
            matches!(other, Err(StoreError::LeaseTimeout { .. })),
            "{other:?}"
        );
        drop(in_flight);
        store
            .lease("k", Duration::from_millis(500))
            .await
            .expect("free once the write is done");
    }

    #[test]
    fn distinct_keys_get_distinct_safe_file_names() {
        assert_eq!(file_stem("lucid:user-42").unwrap(), "lucid%3Auser-42");
        assert_eq!(file_stem("../etc").unwrap(), "%2E.%2Fetc");
        assert_ne!(file_stem("a%3Ab").unwrap(), file_stem("a:b").unwrap());
        assert!(file_stem("").is_err());
    }

    #[test]
    fn keys_differing_only_in_case_get_names_differing_in_more_than_case() {
        let (upper, lower) = (file_stem("User-1").unwrap(), file_stem("user-1").unwrap());
        assert_eq!(upper, "%55ser-1");
        assert_ne!(upper.to_ascii_lowercase(), lower.to_ascii_lowercase());
    }

    #[test]
    fn a_key_too_long_for_a_file_name_is_an_invalid_key() {
        let err = file_stem(&"k".repeat(201)).unwrap_err();
        assert!(
            matches!(err, super::StoreError::InvalidKey { .. }),
            "{err:?}"
        );
        assert!(file_stem(&"k".repeat(200)).is_ok());
        // Escaping counts: 67 colons are 201 bytes of name.
        assert!(file_stem(&":".repeat(67)).is_err());
    }

    #[test]
    fn a_file_written_by_an_older_version_under_an_upper_case_key_is_read_then_moved() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::FileStore::new(dir.path());
        let set = crate::TokenSet::from_refresh_token(
            crate::RefreshToken::new("rt-legacy"),
            time::OffsetDateTime::UNIX_EPOCH,
        );
        std::fs::write(dir.path().join("User-1.json"), super::encode(&set, 7)).unwrap();
        let loaded = store
            .read("User-1")
            .unwrap()
            .expect("the legacy file is read");
        assert_eq!((loaded.value, loaded.version), (set.clone(), 7));
        store
            .write_atomically(
                "User-1",
                &lock_file(&store, "User-1"),
                &super::encode(&set, 8),
            )
            .unwrap();
        assert!(
            !dir.path().join("User-1.json").exists(),
            "the legacy file is gone"
        );
        assert_eq!(store.read("User-1").unwrap().unwrap().version, 8);
    }
}

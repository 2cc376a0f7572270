//! The configuration file: where it is, reading one `[profiles.NAME]` table, and
//! recording a profile after `login` or `import`.
//!
//! ```toml
//! [profiles.default]
//! provider = "lucid"
//! client_id = "..."
//! client_secret = "..."          # optional; keep the file mode 0600
//! token_url = "https://..."      # optional overrides
//! scopes = ["offline_access"]
//! store = "/home/me/.local/share/tokenkeeper/grants"
//! key = "default"
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::Failure;

/// The keys a `[profiles.NAME]` table may hold.
pub(crate) const KNOWN_KEYS: [&str; 11] = [
    "provider",
    "client_id",
    "client_secret",
    "base_url",
    "token_url",
    "authorization_url",
    "device_authorization_url",
    "revocation_url",
    "scopes",
    "store",
    "key",
];

/// A non-empty, absolute path from an environment variable (the XDG base directory
/// specification ignores relative ones).
pub(crate) fn env_dir(name: &str) -> Option<PathBuf> {
    let value = std::env::var_os(name)?;
    let path = PathBuf::from(value);
    (path.is_absolute()).then_some(path)
}

/// `$HOME`, when set and absolute.
pub(crate) fn home() -> Option<PathBuf> {
    env_dir("HOME")
}

/// The configuration file: `--config` / `$TOKENKEEPER_CONFIG` (given), else
/// `$XDG_CONFIG_HOME/tokenkeeper/config.toml`, else `$HOME/.config/tokenkeeper/config.toml`.
pub(crate) fn config_path(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(path) = given.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(path);
    }
    if let Some(dir) = env_dir("XDG_CONFIG_HOME") {
        return Ok(dir.join("tokenkeeper").join("config.toml"));
    }
    match home() {
        Some(home) => Ok(home.join(".config").join("tokenkeeper").join("config.toml")),
        None => Err(Failure::config(
            "cannot locate the configuration file: pass --config FILE, or set TOKENKEEPER_CONFIG, XDG_CONFIG_HOME or HOME",
        )),
    }
}

/// The default grant store: `$XDG_DATA_HOME/tokenkeeper/grants`, else
/// `$HOME/.local/share/tokenkeeper/grants`.
pub(crate) fn default_store_dir() -> Result<PathBuf, Failure> {
    if let Some(dir) = env_dir("XDG_DATA_HOME") {
        return Ok(dir.join("tokenkeeper").join("grants"));
    }
    match home() {
        Some(home) => Ok(home
            .join(".local")
            .join("share")
            .join("tokenkeeper")
            .join("grants")),
        None => Err(Failure::config(
            "cannot locate the default grant store: pass --store, or set TOKENKEEPER_STORE, XDG_DATA_HOME or HOME",
        )),
    }
}

/// Creates `dir` (and its missing parents) with mode 0700 on Unix.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// One `[profiles.NAME]` table, as read from the file.
#[derive(Debug, Default, Clone)]
pub(crate) struct FileProfile {
    pub(crate) provider: Option<String>,
    pub(crate) client_id: Option<String>,
    pub(crate) client_secret: Option<String>,
    pub(crate) base_url: Option<String>,
    pub(crate) token_url: Option<String>,
    pub(crate) authorization_url: Option<String>,
    pub(crate) device_authorization_url: Option<String>,
    pub(crate) revocation_url: Option<String>,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) store: Option<String>,
    pub(crate) key: Option<String>,
}

/// The configuration file as read: the path, whether it exists, the selected profile.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) path: PathBuf,
    pub(crate) exists: bool,
    /// The profile's name.
    pub(crate) name: String,
    /// Whether the file has a `[profiles.NAME]` table for it.
    pub(crate) has_profile: bool,
    pub(crate) profile: FileProfile,
}

impl Config {
    /// Where a missing setting could have come from, for error messages.
    pub(crate) fn describe(&self) -> String {
        if !self.exists {
            format!("{} does not exist", self.path.display())
        } else if !self.has_profile {
            format!(
                "{} has no [profiles.{}] table",
                self.path.display(),
                self.name
            )
        } else {
            format!("[profiles.{}] in {}", self.name, self.path.display())
        }
    }
}

/// Reads the file (a missing file is an empty configuration) and the profile `name`.
/// Values are never quoted in errors: the file may hold a secret.
pub(crate) fn load(path: PathBuf, name: &str) -> Result<Config, Failure> {
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Config {
                path,
                exists: false,
                name: name.to_owned(),
                has_profile: false,
                profile: FileProfile::default(),
            });
        }
        Err(e) => {
            return Err(Failure::config(format!(
                "cannot read the configuration file {}: {e}",
                path.display()
            )));
        }
    };
    let document = parse_document(&path, &text)?;
    warn_if_exposed(&path, &document);
    let table = match document.get("profiles") {
        None => None,
        Some(toml::Value::Table(profiles)) => match profiles.get(name) {
            None => None,
            Some(toml::Value::Table(table)) => Some(table),
            Some(_) => {
                return Err(Failure::config(format!(
                    "{}: profiles.{name} must be a table ([profiles.{name}])",
                    path.display()
                )));
            }
        },
        Some(_) => {
            return Err(Failure::config(format!(
                "{}: `profiles` must be a table of profiles ([profiles.NAME])",
                path.display()
            )));
        }
    };
    let profile = match table {
        Some(table) => read_profile(&path, name, table)?,
        None => FileProfile::default(),
    };
    Ok(Config {
        path,
        exists: true,
        name: name.to_owned(),
        has_profile: table.is_some(),
        profile,
    })
}

/// Parses the whole file. A syntax error is reported by line and message only.
fn parse_document(path: &Path, text: &str) -> Result<toml::Table, Failure> {
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
        Failure::config(format!(
            "the configuration file {} is not valid TOML{at}: {}",
            path.display(),
            e.message().trim_end()
        ))
    })
}

fn read_profile(path: &Path, name: &str, table: &toml::Table) -> Result<FileProfile, Failure> {
    let wrong = |key: &str, expected: &str| {
        Failure::config(format!(
            "{}: [profiles.{name}] {key} must be {expected}",
            path.display()
        ))
    };
    for key in table.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(Failure::config(format!(
                "{}: [profiles.{name}] has an unknown key `{key}` (known keys: {})",
                path.display(),
                KNOWN_KEYS.join(", ")
            )));
        }
    }
    let string = |key: &str| -> Result<Option<String>, Failure> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(wrong(key, "a string")),
        }
    };
    let scopes = match table.get("scopes") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.split_whitespace().map(str::to_owned).collect()),
        Some(toml::Value::Array(items)) => {
            let mut scopes = Vec::new();
            for item in items {
                match item {
                    toml::Value::String(s) => {
                        scopes.extend(s.split_whitespace().map(str::to_owned))
                    }
                    _ => return Err(wrong("scopes", "an array of strings")),
                }
            }
            Some(scopes)
        }
        Some(_) => return Err(wrong("scopes", "an array of strings")),
    };
    Ok(FileProfile {
        provider: string("provider")?,
        client_id: string("client_id")?,
        client_secret: string("client_secret")?,
        base_url: string("base_url")?,
        token_url: string("token_url")?,
        authorization_url: string("authorization_url")?,
        device_authorization_url: string("device_authorization_url")?,
        revocation_url: string("revocation_url")?,
        scopes,
        store: string("store")?,
        key: string("key")?,
    })
}

/// Whether a store setting holds a password (`redis://:pw@host`, `postgres://u:pw@host`).
pub(crate) fn has_password(store: &str) -> bool {
    url::Url::parse(store).is_ok_and(|u| u.password().is_some()) || store.contains("password=")
}

/// Warns on stderr when the file holds a secret (a client secret, a store password) and
/// group or others may read it.
fn warn_if_exposed(path: &Path, document: &toml::Table) {
    let holds_secret = document
        .get("profiles")
        .and_then(toml::Value::as_table)
        .is_some_and(|profiles| {
            profiles
                .values()
                .filter_map(toml::Value::as_table)
                .any(|p| {
                    p.contains_key("client_secret")
                        || p.get("store")
                            .and_then(toml::Value::as_str)
                            .is_some_and(has_password)
                })
        });
    if !holds_secret {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "tokenkeeper: warning: {} holds a secret and is readable by group or others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The non-secret settings a `login` or `import` used, to record in the profile.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    pub(crate) values: Vec<(&'static str, toml::Value)>,
}

impl Recorded {
    pub(crate) fn set(&mut self, key: &'static str, value: impl Into<toml::Value>) {
        self.values.push((key, value.into()));
    }
}

/// Writes `recorded` into `[profiles.NAME]` of the file at `path`, keeping every other
/// profile, every other key of this one (a `client_secret` in particular) and the file's
/// mode; a new file is created with mode 0600 (its directory 0700). Written through a
/// temporary file and a rename, so that a reader never sees half a file.
pub(crate) fn record(path: &Path, name: &str, recorded: &Recorded) -> Result<(), Failure> {
    let cannot = |e: &dyn std::fmt::Display| {
        Failure::config(format!(
            "cannot write the configuration file {}: {e}",
            path.display()
        ))
    };
    // Write through a symbolic link (a dotfiles manager's) rather than replace it.
    let path = match fs::canonicalize(path) {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(cannot(&e)),
    };
    let (mut document, mode) = match fs::read_to_string(&path) {
        Ok(text) => {
            let document = parse_document(&path, &text)?;
            #[cfg(unix)]
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                fs::metadata(&path)
                    .map_err(|e| cannot(&e))?
                    .permissions()
                    .mode()
                    & 0o7777
            };
            #[cfg(not(unix))]
            let mode = 0o600;
            (document, mode)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (toml::Table::new(), 0o600),
        Err(e) => return Err(cannot(&e)),
    };
    let profiles = document
        .entry("profiles")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(profiles) = profiles.as_table_mut() else {
        return Err(Failure::config(format!(
            "{}: `profiles` must be a table of profiles ([profiles.NAME])",
            path.display()
        )));
    };
    let profile = profiles
        .entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(profile) = profile.as_table_mut() else {
        return Err(Failure::config(format!(
            "{}: profiles.{name} must be a table ([profiles.{name}])",
            path.display()
        )));
    };
    for (key, value) in &recorded.values {
        profile.insert((*key).to_owned(), value.clone());
    }
    let text = toml::to_string(&document).map_err(|e| cannot(&e))?;

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    create_private_dir(&dir).map_err(|e| cannot(&e))?;
    // tempfile creates the file with mode 0600.
    let mut temp = tempfile::Builder::new()
        .prefix(".config.toml.")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| cannot(&e))?;
    temp.write_all(text.as_bytes()).map_err(|e| cannot(&e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(temp.path(), fs::Permissions::from_mode(mode))
            .map_err(|e| cannot(&e))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    temp.as_file().sync_all().map_err(|e| cannot(&e))?;
    temp.persist(&path).map_err(|e| cannot(&e.error))?;
    Ok(())
}

//! Settings: a flag, else its environment variable (both through clap), else the key of
//! the configuration file's `[profiles.NAME]` table.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, TokenStore};
use url::Url;

use crate::Failure;
use crate::config::{self, Config, Recorded};

/// The providers the command knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Provider {
    /// Lucid (api.lucid.co).
    Lucid,
    /// Lucid at its legacy endpoints (users.lucidchart.com).
    LucidLegacy,
    /// HighQ Collaborate (needs --base-url).
    Highq,
    /// Autodesk Platform Services.
    Autodesk,
    /// Any RFC 6749 provider (needs --token-url).
    Generic,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Lucid => "lucid",
            Provider::LucidLegacy => "lucid-legacy",
            Provider::Highq => "highq",
            Provider::Autodesk => "autodesk",
            Provider::Generic => "generic",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::value_variants()
            .iter()
            .copied()
            .find(|p| p.name() == name)
    }
}

/// The settings of every command that talks to a provider or a store.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct Settings {
    /// The provider: lucid, lucid-legacy, highq, autodesk or generic [config: provider]
    #[arg(long, env = "TOKENKEEPER_PROVIDER", value_enum, hide_env_values = true)]
    pub(crate) provider: Option<Provider>,
    /// The OAuth client id [config: client_id]. The client secret is read only from
    /// TOKENKEEPER_CLIENT_SECRET or the config file's client_secret, never from a flag
    #[arg(
        long,
        env = "TOKENKEEPER_CLIENT_ID",
        value_name = "ID",
        hide_env_values = true
    )]
    pub(crate) client_id: Option<String>,
    /// The HighQ instance URL, such as https://host/instance/ [config: base_url]
    #[arg(
        long,
        env = "TOKENKEEPER_BASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) base_url: Option<Url>,
    /// The token endpoint (required for generic) [config: token_url]
    #[arg(
        long,
        env = "TOKENKEEPER_TOKEN_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) token_url: Option<Url>,
    /// The authorization endpoint, where a person consents [config: authorization_url]
    #[arg(
        long,
        env = "TOKENKEEPER_AUTHORIZATION_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) authorization_url: Option<Url>,
    /// The device authorization endpoint (RFC 8628) [config: device_authorization_url]
    #[arg(
        long,
        env = "TOKENKEEPER_DEVICE_AUTHORIZATION_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) device_authorization_url: Option<Url>,
    /// The revocation endpoint (RFC 7009) [config: revocation_url]
    #[arg(
        long,
        env = "TOKENKEEPER_REVOCATION_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) revocation_url: Option<Url>,
    /// A scope to ask for at consent; repeat it or separate scopes with spaces (default:
    /// the provider's) [config: scopes]
    #[arg(
        long = "scope",
        env = "TOKENKEEPER_SCOPE",
        value_name = "SCOPE",
        hide_env_values = true
    )]
    pub(crate) scopes: Vec<String>,
    /// Where grants are stored: a directory, a redis:// or rediss:// URL, or a
    /// postgres:// or postgresql:// URL (default: $XDG_DATA_HOME/tokenkeeper/grants)
    /// [config: store]
    #[arg(
        long,
        env = "TOKENKEEPER_STORE",
        value_name = "DIR|URL",
        hide_env_values = true
    )]
    pub(crate) store: Option<String>,
    /// The grant's key in the store (default: default) [config: key]
    #[arg(long, env = "TOKENKEEPER_KEY", hide_env_values = true)]
    pub(crate) key: Option<String>,
}

/// Where grants live.
#[derive(Debug, Clone)]
pub(crate) enum StoreSpec {
    Dir(PathBuf),
    Redis(String),
    Postgres(String),
}

impl StoreSpec {
    /// Parses a store setting; a relative directory is taken relative to `base` (the
    /// config file's directory for a value from the file), else to the current directory.
    fn parse(text: &str, base: Option<&std::path::Path>) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("redis://") || lower.starts_with("rediss://") {
            return Ok(Self::Redis(text.to_owned()));
        }
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_owned()));
        }
        if let Some((scheme, _)) = text.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(format!(
                "has the unsupported scheme {scheme}:// (use a directory, redis://, rediss://, postgres:// or postgresql://)"
            ));
        }
        let path = match text.strip_prefix("~/") {
            Some(rest) => match config::home() {
                Some(home) => home.join(rest),
                None => return Err("starts with ~/ but HOME is not set".into()),
            },
            None => PathBuf::from(text),
        };
        let path = match base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path,
        };
        let path = std::path::absolute(&path)
            .map_err(|e| format!("cannot be made an absolute path: {e}"))?;
        Ok(Self::Dir(path))
    }

    /// For messages: the directory, or the URL without its password.
    pub(crate) fn display(&self) -> String {
        match self {
            StoreSpec::Dir(dir) => dir.display().to_string(),
            StoreSpec::Redis(url) | StoreSpec::Postgres(url) => redact(url),
        }
    }

    /// The value recorded in the configuration file.
    fn recorded(&self) -> String {
        match self {
            StoreSpec::Dir(dir) => dir.display().to_string(),
            StoreSpec::Redis(url) | StoreSpec::Postgres(url) => url.clone(),
        }
    }

    /// Opens the store. `create` creates a missing directory (mode 0700); a reader does
    /// not create anything.
    pub(crate) async fn open(&self, create: bool) -> Result<Arc<dyn TokenStore>, Failure> {
        match self {
            StoreSpec::Dir(dir) => {
                if create {
                    config::create_private_dir(dir).map_err(|e| {
                        Failure::config(format!(
                            "cannot create the grant store directory {}: {e}",
                            dir.display()
                        ))
                    })?;
                }
                Ok(Arc::new(FileStore::new(dir)))
            }
            StoreSpec::Redis(url) => {
                let store = tokenkeeper::store::redis::RedisStore::connect(url)
                    .await
                    .map_err(|e| Failure::store(&e, &self.display()))?;
                Ok(Arc::new(store))
            }
            StoreSpec::Postgres(url) => {
                let store = tokenkeeper::store::postgres::PostgresStore::connect(url)
                    .await
                    .map_err(|e| Failure::store(&e, &self.display()))?;
                store
                    .create_schema()
                    .await
                    .map_err(|e| Failure::store(&e, &self.display()))?;
                Ok(Arc::new(store))
            }
        }
    }
}

/// `url` with its password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "(an unparsable store URL)".into(),
    }
}

/// Where the grant lives: the store and the key.
#[derive(Debug, Clone)]
pub(crate) struct Location {
    pub(crate) store: StoreSpec,
    pub(crate) key: String,
}

/// Everything needed to talk to the provider.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) provider: Provider,
    pub(crate) profile: ProviderProfile,
    pub(crate) credentials: ClientCredentials,
    pub(crate) has_secret: bool,
    /// Explicit scopes (else the profile's default).
    pub(crate) scopes: Option<Vec<String>>,
    /// The overrides used, for the record.
    base_url: Option<Url>,
    token_url: Option<Url>,
    authorization_url: Option<Url>,
    device_authorization_url: Option<Url>,
    revocation_url: Option<Url>,
}

/// A URL setting: the flag (or its variable, parsed by clap), else the file's key.
fn url_setting(
    flag: &Option<Url>,
    file: &Option<String>,
    key: &str,
    config: &Config,
) -> Result<Option<Url>, Failure> {
    if let Some(url) = flag {
        return Ok(Some(url.clone()));
    }
    match file {
        None => Ok(None),
        Some(text) => Url::parse(text.trim()).map(Some).map_err(|e| {
            Failure::config(format!(
                "{key} in {} is not a valid URL: {e}",
                config.describe()
            ))
        }),
    }
}

fn missing(flag: &str, var: &str, key: &str, config: &Config, hint: &str) -> Failure {
    Failure::config(format!(
        "no {what}{hint}: pass {flag}, set {var}, or set `{key}` in the configuration file ({})",
        config.describe(),
        what = flag.trim_start_matches("--").replace('-', " "),
    ))
}

impl Settings {
    /// The store and key.
    pub(crate) fn location(&self, config: &Config) -> Result<Location, Failure> {
        let file = &config.profile;
        let store = match self.store.as_ref().or(file.store.as_ref()) {
            Some(text) => StoreSpec::parse(
                text,
                if self.store.is_some() {
                    None
                } else {
                    config.path.parent()
                },
            )
            .map_err(|why| {
                let from = if self.store.is_some() {
                    "--store (TOKENKEEPER_STORE)".to_owned()
                } else {
                    format!("store in {}", config.describe())
                };
                Failure::config(format!("{from} {why}"))
            })?,
            None => StoreSpec::Dir(config::default_store_dir()?),
        };
        let key = self
            .key
            .clone()
            .or_else(|| file.key.clone())
            .unwrap_or_else(|| "default".into());
        if key.is_empty() {
            return Err(Failure::config(
                "the key is empty: pass --key, set TOKENKEEPER_KEY, or set `key` in the configuration file",
            ));
        }
        Ok(Location { store, key })
    }

    /// The provider profile and client credentials.
    pub(crate) fn client(&self, config: &Config) -> Result<Client, Failure> {
        let file = &config.profile;
        let provider = match (self.provider, &file.provider) {
            (Some(p), _) => p,
            (None, Some(name)) => Provider::from_name(name.trim()).ok_or_else(|| {
                Failure::config(format!(
                    "provider in {} is not one of lucid, lucid-legacy, highq, autodesk, generic",
                    config.describe()
                ))
            })?,
            (None, None) => {
                return Err(missing(
                    "--provider",
                    "TOKENKEEPER_PROVIDER",
                    "provider",
                    config,
                    " (lucid, lucid-legacy, highq, autodesk or generic)",
                ));
            }
        };
        let client_id = self
            .client_id
            .clone()
            .or_else(|| file.client_id.clone())
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                missing(
                    "--client-id",
                    "TOKENKEEPER_CLIENT_ID",
                    "client_id",
                    config,
                    "",
                )
            })?;
        let secret = std::env::var("TOKENKEEPER_CLIENT_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| file.client_secret.clone().filter(|s| !s.is_empty()));
        let has_secret = secret.is_some();
        let credentials = match secret {
            Some(secret) => ClientCredentials::new(client_id, secret),
            None => ClientCredentials::public(client_id),
        };

        let base_url = url_setting(&self.base_url, &file.base_url, "base_url", config)?;
        let token_url = url_setting(&self.token_url, &file.token_url, "token_url", config)?;
        let authorization_url = url_setting(
            &self.authorization_url,
            &file.authorization_url,
            "authorization_url",
            config,
        )?;
        let device_authorization_url = url_setting(
            &self.device_authorization_url,
            &file.device_authorization_url,
            "device_authorization_url",
            config,
        )?;
        let revocation_url = url_setting(
            &self.revocation_url,
            &file.revocation_url,
            "revocation_url",
            config,
        )?;
        let scopes: Vec<String> = self
            .scopes
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_owned)
            .collect();
        let scopes = if scopes.is_empty() {
            file.scopes.clone()
        } else {
            Some(scopes)
        };

        if base_url.is_some() && provider != Provider::Highq {
            return Err(Failure::config(format!(
                "--base-url (TOKENKEEPER_BASE_URL, base_url) applies only to --provider highq, not {}",
                provider.name()
            )));
        }
        let mut profile = match provider {
            Provider::Lucid => ProviderProfile::lucid(),
            Provider::LucidLegacy => ProviderProfile::lucid_legacy(),
            Provider::Autodesk => ProviderProfile::autodesk(),
            Provider::Highq => match &base_url {
                Some(base) => ProviderProfile::highq(base.clone()),
                None => {
                    return Err(missing(
                        "--base-url",
                        "TOKENKEEPER_BASE_URL",
                        "base_url",
                        config,
                        " (the HighQ instance URL, such as https://host/instance/)",
                    ));
                }
            },
            Provider::Generic => match &token_url {
                Some(url) => ProviderProfile::generic(url.clone()),
                None => {
                    return Err(missing(
                        "--token-url",
                        "TOKENKEEPER_TOKEN_URL",
                        "token_url",
                        config,
                        " (the generic provider needs its token endpoint)",
                    ));
                }
            },
        };
        if let Some(url) = &token_url {
            profile.token_url = url.clone();
        }
        if let Some(url) = &authorization_url {
            profile.authorization_url = Some(url.clone());
        }
        if let Some(url) = &device_authorization_url {
            profile.device_authorization_url = Some(url.clone());
        }
        if let Some(url) = &revocation_url {
            profile.revocation_url = Some(url.clone());
        }
        if let Some(scopes) = &scopes {
            profile.default_scopes = scopes.clone();
        }
        profile.validate().map_err(Failure::from)?;
        Ok(Client {
            provider,
            profile,
            credentials,
            has_secret,
            scopes,
            base_url,
            token_url,
            authorization_url,
            device_authorization_url,
            revocation_url,
        })
    }
}

/// What `login` and `import` record: every non-secret setting used. A store URL holding
/// a password is not recorded (a note says so).
pub(crate) fn recorded(client: &Client, location: &Location) -> Recorded {
    let mut r = Recorded::default();
    r.set("provider", client.provider.name());
    r.set("client_id", client.credentials.id());
    let urls = [
        ("base_url", &client.base_url),
        ("token_url", &client.token_url),
        ("authorization_url", &client.authorization_url),
        ("device_authorization_url", &client.device_authorization_url),
        ("revocation_url", &client.revocation_url),
    ];
    for (key, url) in urls {
        if let Some(url) = url {
            r.set(key, url.as_str());
        }
    }
    if let Some(scopes) = &client.scopes {
        r.set(
            "scopes",
            toml::Value::Array(scopes.iter().cloned().map(toml::Value::String).collect()),
        );
    }
    let store = location.store.recorded();
    if config::has_password(&store) {
        eprintln!(
            "tokenkeeper: note: the store URL holds a password, so it is not written to the configuration file; set TOKENKEEPER_STORE for later commands"
        );
    } else {
        r.set("store", store);
    }
    r.set("key", location.key.as_str());
    r
}

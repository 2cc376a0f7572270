//! `tokenkeeper`: obtain an OAuth 2.0 grant once, then print a valid access token
//! whenever a script, a cron job or an operator asks for one.
//!
//! Messages go to stderr, data to stdout; no secret is ever taken from the command line
//! (the client secret comes from `TOKENKEEPER_CLIENT_SECRET` or the config file, refresh
//! tokens and pasted codes from stdin).
//!
//! Exit codes: 0 ok; 2 usage; 4 a person must consent again (`tokenkeeper login`);
//! 75 (EX_TEMPFAIL) a transient failure, try again later; 78 (EX_CONFIG) a configuration
//! error or rejected client credentials; 1 anything else.

mod config;
mod duration;
mod settings;
mod simulate;

use std::error::Error as StdError;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokenkeeper::consent::{Consent, Grant};
use tokenkeeper::store::StoreError;
use tokenkeeper::{RefreshingTokenSource, TokenSet, TokenStore};
use url::Url;

use crate::config::Config;
use crate::settings::{Client, Location, Settings};

/// Exit code: a person must consent again.
const EXIT_REAUTHORIZE: u8 = 4;
/// Exit code (sysexits EX_TEMPFAIL): nothing is lost, try again later.
const EXIT_TEMPFAIL: u8 = 75;
/// Exit code (sysexits EX_CONFIG): the configuration is wrong.
const EXIT_CONFIG: u8 = 78;
/// Exit code: anything else.
const EXIT_OTHER: u8 = 1;

/// Keeps OAuth 2.0 access tokens valid: consent once with `login`, then get a valid
/// access token with `token` from any script or cron job.
///
/// Settings come from flags, else environment variables, else the `[profiles.NAME]`
/// table of the config file, which `login` and `import` write. The client secret is read
/// only from TOKENKEEPER_CLIENT_SECRET or the config file's `client_secret`.
///
/// Exit codes: 0 ok, 2 usage, 4 a person must consent again (run `tokenkeeper login`),
/// 75 temporary failure (retry later), 78 configuration error or rejected client
/// credentials, 1 anything else.
#[derive(Parser, Debug)]
#[command(name = "tokenkeeper", version, about, long_about)]
struct Cli {
    /// The config file [default: $XDG_CONFIG_HOME/tokenkeeper/config.toml, else
    /// $HOME/.config/tokenkeeper/config.toml]
    #[arg(
        long,
        global = true,
        env = "TOKENKEEPER_CONFIG",
        value_name = "FILE",
        hide_env_values = true
    )]
    config: Option<PathBuf>,
    /// The profile of the config file to use ([profiles.NAME])
    #[arg(
        long,
        global = true,
        env = "TOKENKEEPER_PROFILE",
        value_name = "NAME",
        hide_env_values = true,
        default_value = "default"
    )]
    profile: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask a person to consent, store the grant, and record the profile in the config file
    Login(LoginArgs),
    /// Print a valid access token on stdout (and nothing else)
    Token(TokenArgs),
    /// Show every stored grant: expiries, time left before re-consent, last refresh and error
    Status(StatusArgs),
    /// Forget the stored grant (--revoke: revoke it at the provider too)
    Logout(LogoutArgs),
    /// Store a refresh token read from stdin, and record the profile in the config file
    Import(ImportArgs),
    /// Run the provider simulator (rotating single-use refresh tokens, reuse detection)
    /// on 127.0.0.1 until interrupted, and print its URLs, client credentials and a
    /// refresh token per grant: for testing a script or a service without credentials
    Simulate(simulate::SimulateArgs),
}

#[derive(Args, Debug)]
struct LoginArgs {
    #[command(flatten)]
    settings: Settings,
    /// No loopback listener: print the URL, then read the redirect URL (or the bare code)
    /// from stdin
    #[arg(long, conflicts_with = "device")]
    paste: bool,
    /// The device grant: print a code to enter on another device
    #[arg(long)]
    device: bool,
    /// The loopback listener's port, for a redirect URI registered with a fixed port
    /// (default: any free port)
    #[arg(long, value_name = "PORT", conflicts_with = "device")]
    port: Option<u16>,
    /// The redirect URI registered with the provider, for --paste (default: the
    /// provider's copy-code page, else http://127.0.0.1[:PORT]/callback)
    #[arg(long, value_name = "URL", requires = "paste")]
    redirect_uri: Option<Url>,
    /// Do not try to open a browser
    #[arg(long)]
    no_browser: bool,
    /// How long to wait for the consent [default: 5m; --device: until the code expires]
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    timeout: Option<Duration>,
}

#[derive(Args, Debug)]
struct TokenArgs {
    #[command(flatten)]
    settings: Settings,
    /// The printed token stays valid at least this long (30s, 5m, 1h...), refreshing
    /// first if needed (capped at half the token's lifetime)
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, default_value = "1m")]
    min_valid: Duration,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    settings: Settings,
    /// One JSON document on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct LogoutArgs {
    #[command(flatten)]
    settings: Settings,
    /// Revoke the grant at the provider too (else it is only forgotten by the store)
    #[arg(long)]
    revoke: bool,
}

#[derive(Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    settings: Settings,
}

/// A failed command: its exit code and message (never a secret).
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
    hint: Option<String>,
}

impl Failure {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_CONFIG,
            message: message.into(),
            hint: None,
        }
    }

    pub(crate) fn other(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_OTHER,
            message: message.into(),
            hint: None,
        }
    }

    /// A store failure, by what it means.
    pub(crate) fn store(e: &StoreError, store: &str) -> Self {
        let code = if e.is_transient() {
            EXIT_TEMPFAIL
        } else if matches!(
            e,
            StoreError::Misconfigured(_)
                | StoreError::InvalidKey { .. }
                | StoreError::Unsupported(_)
        ) {
            EXIT_CONFIG
        } else {
            EXIT_OTHER
        };
        Self {
            code,
            message: format!("the store {store} failed: {}", chain(e)),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl From<tokenkeeper::Error> for Failure {
    fn from(e: tokenkeeper::Error) -> Self {
        use tokenkeeper::Error;
        let code = if e.needs_reauthorization() {
            EXIT_REAUTHORIZE
        } else if e.is_transient() {
            EXIT_TEMPFAIL
        } else {
            match &e {
                Error::Config(_) | Error::ClientRejected { .. } | Error::RequestRejected { .. } => {
                    EXIT_CONFIG
                }
                Error::Storage(
                    StoreError::Misconfigured(_)
                    | StoreError::InvalidKey { .. }
                    | StoreError::Unsupported(_),
                ) => EXIT_CONFIG,
                _ => EXIT_OTHER,
            }
        };
        let mut failure = Self {
            code,
            message: chain(&e),
            hint: None,
        };
        if let Some(wait) = e.retry_after() {
            failure.hint = Some(format!(
                "retry in {} or later",
                duration::human(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX).max(1))
            ));
        }
        failure
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The global options every command shares.
struct Context {
    config_path: PathBuf,
    profile: String,
}

impl Context {
    fn load(&self) -> Result<Config, Failure> {
        config::load(self.config_path.clone(), &self.profile)
    }
}

#[tokio::main]
async fn main() {
    let code = run().await;
    // Exits at once: a read of stdin that timed out (`login --paste`) would otherwise keep
    // the runtime from shutting down. Everything that matters was awaited.
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code))
}

async fn run() -> u8 {
    let cli = Cli::parse();
    let profile = cli.profile.clone();
    let result = async {
        let context = move || -> Result<Context, Failure> {
            Ok(Context {
                config_path: config::config_path(cli.config)?,
                profile: cli.profile,
            })
        };
        match cli.command {
            Command::Login(args) => login(&context()?, args).await,
            Command::Token(args) => token(&context()?, args).await,
            Command::Status(args) => status(&context()?, args).await,
            Command::Logout(args) => logout(&context()?, args).await,
            Command::Import(args) => import(&context()?, args).await,
            // No config file: the simulator needs none.
            Command::Simulate(args) => simulate::simulate(args).await,
        }
    }
    .await;
    match result {
        Ok(()) => 0,
        Err(failure) => {
            eprintln!("tokenkeeper: {}", failure.message);
            if failure.code == EXIT_REAUTHORIZE {
                let login = if profile == "default" {
                    "tokenkeeper login".to_owned()
                } else {
                    format!("tokenkeeper --profile {profile} login")
                };
                eprintln!("tokenkeeper: run `{login}` to sign in again");
            }
            if let Some(hint) = failure.hint {
                eprintln!("tokenkeeper: {hint}");
            }
            failure.code
        }
    }
}

/// A source over the configured store and key.
fn source(
    client: &Client,
    location: &Location,
    store: Arc<dyn TokenStore>,
) -> Result<RefreshingTokenSource, Failure> {
    Ok(
        RefreshingTokenSource::builder(client.profile.clone(), client.credentials.clone())
            .shared_store(store)
            .key(location.key.clone())
            .build()?,
    )
}

/// Adds what to do about rejected client credentials.
fn client_hint(failure: Failure, client: &Client) -> Failure {
    if failure.code != EXIT_CONFIG || failure.hint.is_some() {
        return failure;
    }
    if !client.has_secret {
        failure.hint(
            "no client secret was given: set TOKENKEEPER_CLIENT_SECRET or client_secret in the config file",
        )
    } else {
        failure
    }
}

/// Reads one line from stdin, trimmed, within `timeout`.
async fn read_line(timeout: Option<Duration>, what: &str) -> Result<String, Failure> {
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    });
    let line = match timeout {
        Some(timeout) => tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| Failure::other(format!("no {what} was given in time")))?,
        None => read.await,
    }
    .map_err(|e| Failure::other(format!("cannot read stdin: {e}")))?
    .map_err(|e| Failure::other(format!("cannot read stdin: {e}")))?;
    let line = line.trim().to_owned();
    if line.is_empty() {
        return Err(Failure::other(format!("no {what} was given on stdin")));
    }
    Ok(line)
}

async fn login(context: &Context, args: LoginArgs) -> Result<(), Failure> {
    let config = context.load()?;
    let location = args.settings.location(&config)?;
    let client = args.settings.client(&config)?;
    // The store and the key are checked before anyone is asked to consent.
    let store = location.store.open(true).await?;
    let source = source(&client, &location, store)?;
    let profile = client.profile.clone();
    let credentials = client.credentials.clone();
    if args.device && profile.device_authorization_url.is_none() {
        return Err(Failure::config(
            "this provider has no known device authorization endpoint: pass --device-authorization-url (TOKENKEEPER_DEVICE_AUTHORIZATION_URL, device_authorization_url in the config file), or sign in without --device",
        ));
    }
    if !args.device && profile.authorization_url.is_none() {
        return Err(Failure::config(
            "this provider has no known authorization endpoint: pass --authorization-url (TOKENKEEPER_AUTHORIZATION_URL, authorization_url in the config file)",
        ));
    }
    let grant: Result<Grant, tokenkeeper::Error> = if args.device {
        let consent = Consent::device(profile, credentials)?.start().await?;
        eprintln!(
            "To sign in, open {} and enter the code: {}",
            consent.verification_uri(),
            consent.user_code()
        );
        if let Some(complete) = consent.verification_uri_complete() {
            eprintln!("(or open {complete})");
        }
        eprintln!("Waiting for the authorization...");
        match args.timeout {
            Some(timeout) => tokio::time::timeout(timeout, consent.finish())
                .await
                .unwrap_or_else(|_| {
                    Err(tokenkeeper::Error::Consent {
                        reason: tokenkeeper::ConsentFailure::TimedOut,
                        provider: None,
                    })
                }),
            None => consent.finish().await,
        }
    } else if args.paste {
        let timeout = args.timeout.unwrap_or(Duration::from_secs(300));
        let mut flow = Consent::authorization_code(profile, credentials)?.timeout(timeout);
        let redirect = match (&args.redirect_uri, &client.profile.copy_code_redirect_uri) {
            (Some(uri), _) => Some(uri.clone()),
            (None, Some(_)) => None,
            (None, None) => {
                let port = args.port.map(|p| format!(":{p}")).unwrap_or_default();
                Some(
                    Url::parse(&format!("http://127.0.0.1{port}/callback"))
                        .map_err(|e| Failure::config(format!("invalid redirect URI: {e}")))?,
                )
            }
        };
        if let Some(uri) = redirect {
            flow = flow.redirect_uri(uri);
        }
        let consent = flow.paste()?;
        eprintln!("Open this URL to sign in:\n{}", consent.url());
        if client.profile.copy_code_redirect_uri.is_some() && args.redirect_uri.is_none() {
            eprintln!("Then paste the code the page shows (or the whole address) here:");
        } else {
            eprintln!(
                "After you consent, your browser goes to {} (the page may not load): paste that whole address from the address bar here:",
                consent.redirect_uri()
            );
        }
        let pasted = read_line(Some(timeout), "redirect URL or code").await?;
        consent.finish(&pasted).await
    } else {
        let timeout = args.timeout.unwrap_or(Duration::from_secs(300));
        let mut flow = Consent::authorization_code(profile, credentials)?.timeout(timeout);
        if let Some(port) = args.port {
            flow = flow.port(port);
        }
        let consent = flow.listen().await?;
        eprintln!("Open this URL to sign in:\n{}", consent.url());
        if !args.no_browser && consent.open_browser().is_err() {
            eprintln!("(no browser could be started: open the URL yourself)");
        }
        eprintln!(
            "Waiting up to {} for the browser to come back to {}",
            duration::human(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX)),
            consent.redirect_uri()
        );
        consent.finish().await
    };
    let grant = grant.map_err(|e| client_hint(e.into(), &client))?;
    // Whom the provider signed in: the person can tell a grant that is not theirs (a
    // redirect forged where the server does not echo `state`, as HighQ's may not).
    if let Some(who) = identity(grant.token_set()) {
        eprintln!("The provider signed in {who}.");
    }
    grant.save(&source).await?;
    source.flush().await;
    eprintln!(
        "Signed in: the grant is stored in {} under key {:?}.",
        location.store.display(),
        location.key
    );
    record(&config, &client, &location)
}

/// The account a token response names, if any (HighQ's `useremail`, Lucid's `user_id` or
/// `account_id`).
fn identity(set: &TokenSet) -> Option<String> {
    ["useremail", "email", "user_id", "account_id"]
        .into_iter()
        .find_map(|field| {
            let value = set.extra.get(field)?;
            let value = value
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            Some(format!("{field} {value}"))
        })
}

/// Records the profile after `login` or `import`.
fn record(config: &Config, client: &Client, location: &Location) -> Result<(), Failure> {
    config::record(
        &config.path,
        &config.name,
        &settings::recorded(client, location),
    )?;
    eprintln!(
        "Saved profile {:?} in {}.",
        config.name,
        config.path.display()
    );
    Ok(())
}

async fn token(context: &Context, args: TokenArgs) -> Result<(), Failure> {
    let config = context.load()?;
    let location = args.settings.location(&config)?;
    let client = args.settings.client(&config)?;
    let store = location.store.open(false).await?;
    let source = RefreshingTokenSource::builder(client.profile.clone(), client.credentials.clone())
        .shared_store(Arc::clone(&store))
        .key(location.key.clone())
        .leeway(args.min_valid)
        .build()?;
    let result = source.fresh_access_token().await;
    // A rotated token set must be saved, and any lease given back, before the process
    // exits.
    source.flush().await;
    let token = result.map_err(|e| client_hint(e.into(), &client))?;
    if let Some(expires_at) = source.status().access_token_expires_at {
        let left = expires_at - OffsetDateTime::now_utc();
        if left < args.min_valid {
            eprintln!(
                "tokenkeeper: warning: the access token is valid for only {} (less than --min-valid {}): the provider issues shorter-lived tokens",
                duration::human(left.whole_seconds()),
                duration::human(i64::try_from(args.min_valid.as_secs()).unwrap_or(i64::MAX))
            );
        }
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", token.secret())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::other(format!("cannot write the token to stdout: {e}")))
}

/// One grant, as `status` shows it.
struct GrantStatus {
    key: String,
    set: Result<Option<TokenSet>, String>,
}

/// An instant in RFC 3339, to the second.
fn rfc3339(at: Option<OffsetDateTime>) -> Option<String> {
    at.and_then(|at| at.replace_nanosecond(0).ok())
        .and_then(|at| at.format(&Rfc3339).ok())
}

/// When the access token was last obtained (`None` for a grant that never got one, such
/// as an imported refresh token, or a revoked one).
fn last_refresh(set: &TokenSet) -> Option<OffsetDateTime> {
    set.access_token.as_ref().map(|_| set.obtained_at)
}

/// The state of a grant, in a word or three.
fn state(set: &TokenSet, now: OffsetDateTime) -> &'static str {
    if set.revoked_at.is_some() {
        "revoked"
    } else if set.rejected_at.is_some() {
        "rejected"
    } else if set.refresh_token.is_none() {
        "no refresh token"
    } else if set.refresh_expires_at.is_some_and(|at| at <= now) {
        "refresh token expired"
    } else if set.rotation.is_some() {
        "refreshing"
    } else if set.expires_at.is_some_and(|at| at <= now) {
        "ok (access token expired)"
    } else {
        "ok"
    }
}

/// Time left before a person must consent again: zero once the grant is dead, `None`
/// when the refresh token's lifetime is unknown.
fn reauthorization_in(set: &TokenSet, now: OffsetDateTime) -> Option<i64> {
    if set.revoked_at.is_some() || set.rejected_at.is_some() || set.refresh_token.is_none() {
        return Some(0);
    }
    set.refresh_expires_at
        .map(|at| (at - now).whole_seconds().max(0))
}

fn last_error(set: &TokenSet) -> Option<String> {
    if let Some(at) = rfc3339(set.revoked_at) {
        Some(format!("revoked at {at}"))
    } else {
        rfc3339(set.rejected_at).map(|at| format!("refresh token rejected by the provider at {at}"))
    }
}

async fn status(context: &Context, args: StatusArgs) -> Result<(), Failure> {
    let config = context.load()?;
    let location = args.settings.location(&config)?;
    let shown = location.store.display();
    let store = location.store.open(false).await?;
    let keys = match store.keys().await {
        Ok(keys) => keys,
        Err(StoreError::Unsupported(_)) => vec![location.key.clone()],
        Err(e) => return Err(Failure::store(&e, &shown)),
    };
    let mut grants = Vec::new();
    for key in keys {
        let set = match store.load(&key).await {
            Ok(set) => Ok(set.map(|v| v.value)),
            Err(e @ (StoreError::Corrupt { .. } | StoreError::InvalidKey { .. })) => Err(chain(&e)),
            Err(e) => return Err(Failure::store(&e, &shown)),
        };
        if matches!(set, Ok(None)) {
            continue;
        }
        grants.push(GrantStatus { key, set });
    }
    let now = OffsetDateTime::now_utc();
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        let grants: Vec<serde_json::Value> = grants
            .iter()
            .map(|g| match &g.set {
                Ok(Some(set)) => serde_json::json!({
                    "key": g.key,
                    "state": state(set, now),
                    "access_token_expires_at": rfc3339(set.expires_at),
                    "access_token_expires_in_seconds": set.expires_at.map(|at| (at - now).whole_seconds()),
                    "refresh_token_expires_at": rfc3339(set.refresh_expires_at),
                    "reauthorization_in_seconds": reauthorization_in(set, now),
                    "last_refresh": rfc3339(last_refresh(set)),
                    "rejected_at": rfc3339(set.rejected_at),
                    "revoked_at": rfc3339(set.revoked_at),
                    "last_error": last_error(set),
                    "scopes": set.scopes,
                }),
                Ok(None) => serde_json::json!({ "key": g.key, "state": "empty" }),
                Err(e) => serde_json::json!({ "key": g.key, "state": "unreadable", "last_error": e }),
            })
            .collect();
        let document = serde_json::json!({
            "store": shown,
            "now": rfc3339(Some(now)),
            "grants": grants,
        });
        writeln!(out, "{document:#}")
    } else {
        write_status_text(&mut out, &shown, &grants, now)
    };
    written
        .and_then(|()| out.flush())
        .map_err(|e| Failure::other(format!("cannot write to stdout: {e}")))
}

fn write_status_text(
    out: &mut impl Write,
    store: &str,
    grants: &[GrantStatus],
    now: OffsetDateTime,
) -> std::io::Result<()> {
    if grants.is_empty() {
        eprintln!("No grant is stored in {store}.");
        return Ok(());
    }
    let instant = |at: Option<OffsetDateTime>| match at {
        Some(at) => {
            let left = (at - now).whole_seconds();
            let when = rfc3339(Some(at)).unwrap_or_default();
            if left > 0 {
                format!("{when} (in {})", duration::human(left))
            } else {
                format!("{when} ({} ago)", duration::human(-left))
            }
        }
        None => "unknown".into(),
    };
    writeln!(out, "Store: {store}")?;
    for grant in grants {
        writeln!(out)?;
        writeln!(out, "{}", grant.key)?;
        let set = match &grant.set {
            Ok(Some(set)) => set,
            Ok(None) => {
                writeln!(out, "  state:                 empty")?;
                continue;
            }
            Err(e) => {
                writeln!(out, "  state:                 unreadable")?;
                writeln!(out, "  last error:            {e}")?;
                continue;
            }
        };
        writeln!(out, "  state:                 {}", state(set, now))?;
        writeln!(out, "  access token expires:  {}", instant(set.expires_at))?;
        writeln!(
            out,
            "  refresh token expires: {}",
            instant(set.refresh_expires_at)
        )?;
        let reconsent = match reauthorization_in(set, now) {
            Some(0) => "now (run `tokenkeeper login`)".to_owned(),
            Some(left) => format!("in {}", duration::human(left)),
            None => "unknown (the refresh token's lifetime is not known)".into(),
        };
        writeln!(out, "  re-consent needed:     {reconsent}")?;
        let refreshed = match last_refresh(set) {
            Some(at) => instant(Some(at)),
            None => "never".into(),
        };
        writeln!(out, "  last refresh:          {refreshed}")?;
        writeln!(
            out,
            "  last error:            {}",
            last_error(set).unwrap_or_else(|| "none".into())
        )?;
        if !set.scopes.is_empty() {
            writeln!(out, "  scopes:                {}", set.scopes.join(" "))?;
        }
    }
    Ok(())
}

async fn logout(context: &Context, args: LogoutArgs) -> Result<(), Failure> {
    let config = context.load()?;
    let location = args.settings.location(&config)?;
    let client = args.settings.client(&config)?;
    let shown = location.store.display();
    let store = location.store.open(false).await?;
    let stored = store
        .load(&location.key)
        .await
        .map_err(|e| Failure::store(&e, &shown))?;
    match stored.map(|v| v.value) {
        None => {
            eprintln!(
                "No grant is stored in {shown} under key {:?}: nothing to do.",
                location.key
            );
            return Ok(());
        }
        Some(set) if set.revoked_at.is_some() => {
            eprintln!(
                "The grant in {shown} under key {:?} was already logged out.",
                location.key
            );
            return Ok(());
        }
        Some(_) => {}
    }
    let source = source(&client, &location, store)?;
    if args.revoke {
        source
            .revoke()
            .await
            .map_err(|e| client_hint(e.into(), &client))?;
        if client.profile.revocation_url.is_some() {
            eprintln!(
                "Revoked the grant at the provider and removed it from {shown} (key {:?}).",
                location.key
            );
        } else {
            eprintln!(
                "Removed the grant from {shown} (key {:?}). The provider has no revocation endpoint: its tokens stay valid there until they expire.",
                location.key
            );
        }
    } else {
        source.forget().await?;
        eprintln!(
            "Forgot the grant in {shown} (key {:?}). The provider was not told: use `logout --revoke` to revoke it there too.",
            location.key
        );
    }
    Ok(())
}

async fn import(context: &Context, args: ImportArgs) -> Result<(), Failure> {
    let config = context.load()?;
    let location = args.settings.location(&config)?;
    let client = args.settings.client(&config)?;
    let store = location.store.open(true).await?;
    let source = source(&client, &location, store)?;
    if std::io::stdin().is_terminal() {
        eprintln!("Paste the refresh token, then press Enter:");
    }
    let refresh_token = read_line(None, "refresh token").await?;
    source.import_refresh_token(refresh_token).await?;
    source.flush().await;
    eprintln!(
        "Imported the refresh token into {} under key {:?}.",
        location.store.display(),
        location.key
    );
    record(&config, &client, &location)
}

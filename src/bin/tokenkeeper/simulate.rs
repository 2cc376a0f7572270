//! `tokenkeeper simulate`: the provider simulator (`tokenkeeper::testing::Simulator`) as
//! a process of its own, for testing a CLI, a script or a service in any language
//! against a token endpoint with rotating, single-use refresh tokens and reuse
//! detection, without credentials.
//!
//! It prints (or writes, `--write`) what a client needs: the endpoints, the client
//! credentials the simulator accepts, and the first refresh token of each grant it
//! issued. These are the simulator's own throwaway values, printed by design; nothing
//! else the command does shows a secret.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::json;
use tokenkeeper::testing::{Mode, Simulator};

use crate::{Failure, duration};

/// The client secret the simulator accepts: a throwaway value, printed.
const CLIENT_SECRET: &str = "sim-secret";

/// Which provider the simulator imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum SimMode {
    /// RFC 6749 (form body, JSON answers)
    Generic,
    /// Lucid (JSON body, `expires` in epoch ms; a refresh kills the previous access token)
    Lucid,
    /// HighQ Collaborate (XML answers)
    Highq,
    /// Autodesk Platform Services (Basic client authentication)
    Autodesk,
}

impl SimMode {
    fn mode(self) -> Mode {
        match self {
            SimMode::Generic => Mode::Generic,
            SimMode::Lucid => Mode::Lucid,
            SimMode::Highq => Mode::HighQ,
            SimMode::Autodesk => Mode::Autodesk,
        }
    }

    /// The `--provider` (and TOKENKEEPER_PROVIDER) value that speaks this mode.
    fn provider(self) -> &'static str {
        match self {
            SimMode::Generic => "generic",
            SimMode::Lucid => "lucid",
            SimMode::Highq => "highq",
            SimMode::Autodesk => "autodesk",
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct SimulateArgs {
    /// The provider to imitate
    #[arg(long, value_enum, default_value = "generic")]
    mode: SimMode,
    /// The port to listen on, on 127.0.0.1 (default: any free port)
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// How many grants to issue (each printed with its first refresh token)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    grants: u16,
    /// A scope the grants are consented to; repeat it or separate scopes with spaces
    /// (default: data:read data:write). The API endpoint checks `?scope=`
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// The lifetime of access tokens (30s, 5m, 1h...)
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, default_value = "1h")]
    access_lifetime: Duration,
    /// The lifetime of refresh tokens (default: the imitated provider's; none for
    /// generic)
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    refresh_lifetime: Option<Duration>,
    /// The client id the simulator accepts (its secret is printed with it)
    #[arg(long, default_value = "sim-client", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    client_id: String,
    /// Print one JSON document instead of text
    #[arg(long)]
    json: bool,
    /// Also write the JSON document to this file (created with mode 0600, replaced
    /// whole once the simulator listens: a script may wait for it to appear)
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

/// Starts the simulator, prints what a client needs, and serves until interrupted
/// (Ctrl-C, SIGTERM).
pub(crate) async fn simulate(args: SimulateArgs) -> Result<(), Failure> {
    // Listening for the signals first: a supervisor may stop the simulator as soon as
    // the file it writes appears.
    let stop =
        Stop::listen().map_err(|e| Failure::other(format!("cannot listen for signals: {e}")))?;
    // The grants live as long as this process: `import` and `token` keep them in a
    // configuration and a store of its own, never the user's.
    let home = tempfile::Builder::new()
        .prefix("tokenkeeper-simulate-")
        .tempdir()
        .map_err(|e| Failure::other(format!("cannot create a temporary directory: {e}")))?;
    let mut builder = Simulator::builder(args.mode.mode())
        .port(args.port)
        .client_id(args.client_id.clone())
        .client_secret(Some(CLIENT_SECRET))
        .access_lifetime(args.access_lifetime);
    if let Some(lifetime) = args.refresh_lifetime {
        builder = builder.refresh_lifetime(lifetime);
    }
    let sim = builder
        .start()
        .await
        .map_err(|e| Failure::config(format!("cannot listen on 127.0.0.1:{}: {e}", args.port)))?;
    let scopes: Vec<String> = args
        .scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_owned)
        .collect();
    let refresh_tokens: Vec<String> = (0..args.grants)
        .map(|_| {
            if scopes.is_empty() {
                sim.issue_grant()
            } else {
                sim.issue_grant_with_scopes(scopes.iter().cloned())
            }
        })
        .collect();
    let document = describe(&sim, &args, home.path(), &refresh_tokens);
    if let Some(path) = &args.write {
        write_private(path, &document)
            .map_err(|e| Failure::other(format!("cannot write {}: {e}", path.display())))?;
    }
    let printed = if args.json {
        format!("{document}\n")
    } else {
        text(&document, args.mode)
    };
    // All of it before the simulator is up for good: a script reads it at once.
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(printed.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::other(format!("cannot write to stdout: {e}")))?;
    drop(stdout);
    stop.wait().await;
    eprintln!("tokenkeeper: simulator stopped");
    drop(home);
    Ok(())
}

/// The variables a mode does not set, unset before its own are exported: a value left
/// from another run would point the command elsewhere.
const UNSET: [&str; 6] = [
    "TOKENKEEPER_BASE_URL",
    "TOKENKEEPER_TOKEN_URL",
    "TOKENKEEPER_REVOCATION_URL",
    "TOKENKEEPER_KEY",
    "TOKENKEEPER_PROFILE",
    "TOKENKEEPER_SCOPE",
];

/// What a client needs, as one JSON document: the endpoints, the credentials, the
/// grants, and the environment (`env`, after unsetting `unset`) that points the
/// `tokenkeeper` command at the simulator with a configuration and a store of its own.
fn describe(
    sim: &Simulator,
    args: &SimulateArgs,
    home: &Path,
    refresh_tokens: &[String],
) -> serde_json::Value {
    let provider = args.mode.provider();
    let mut env = serde_json::Map::new();
    let mut set = |name: &str, value: String| {
        env.insert(name.to_owned(), value.into());
    };
    set(
        "TOKENKEEPER_CONFIG",
        home.join("config.toml").display().to_string(),
    );
    set(
        "TOKENKEEPER_STORE",
        home.join("grants").display().to_string(),
    );
    set("TOKENKEEPER_PROVIDER", provider.to_owned());
    if args.mode == SimMode::Highq {
        set("TOKENKEEPER_BASE_URL", sim.base_url().to_string());
    } else {
        set("TOKENKEEPER_TOKEN_URL", sim.token_url().to_string());
    }
    set(
        "TOKENKEEPER_AUTHORIZATION_URL",
        sim.authorization_url().to_string(),
    );
    set(
        "TOKENKEEPER_DEVICE_AUTHORIZATION_URL",
        sim.device_authorization_url().to_string(),
    );
    if let Some(url) = sim.revocation_url() {
        set("TOKENKEEPER_REVOCATION_URL", url.to_string());
    }
    set("TOKENKEEPER_CLIENT_ID", args.client_id.clone());
    set("TOKENKEEPER_CLIENT_SECRET", CLIENT_SECRET.to_owned());
    let unset: Vec<&str> = UNSET
        .iter()
        .copied()
        .filter(|name| !env.contains_key(*name))
        .collect();
    json!({
        "mode": provider,
        "provider": provider,
        "base_url": sim.base_url().as_str(),
        "token_url": sim.token_url().as_str(),
        "authorization_url": sim.authorization_url().as_str(),
        "device_authorization_url": sim.device_authorization_url().as_str(),
        "revocation_url": sim.revocation_url().map(|u| u.to_string()),
        "api_url": sim.api_url().as_str(),
        "client_id": args.client_id,
        "client_secret": CLIENT_SECRET,
        "scopes": sim.grant_scopes(0).unwrap_or_default(),
        "refresh_tokens": refresh_tokens,
        "keys": keys(refresh_tokens.len()),
        "env": env,
        "unset": unset,
    })
}

/// The store key of each grant: `default` for a single one (what `import` and `token`
/// use without `--key`), else `grant-1`, `grant-2`...
fn keys(grants: usize) -> Vec<String> {
    if grants == 1 {
        return vec!["default".into()];
    }
    (1..=grants).map(|i| format!("grant-{i}")).collect()
}

/// The document as text, with the shell lines that point `tokenkeeper` at it.
fn text(document: &serde_json::Value, mode: SimMode) -> String {
    let field = |name: &str| document[name].as_str().unwrap_or_default().to_owned();
    let list = |name: &str| -> Vec<String> {
        document[name]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut lines = vec![
        format!(
            "tokenkeeper simulator ({} mode) listening on {}",
            mode.provider(),
            field("base_url")
        ),
        String::new(),
        format!("token URL:          {}", field("token_url")),
        format!("authorization URL:  {}", field("authorization_url")),
        format!("device URL:         {}", field("device_authorization_url")),
    ];
    if let Some(url) = document["revocation_url"].as_str() {
        lines.push(format!("revocation URL:     {url}"));
    }
    lines.push(format!(
        "API:                {} (checks a bearer token; ?scope=a+b requires scopes)",
        field("api_url")
    ));
    lines.push(format!("client id:          {}", field("client_id")));
    lines.push(format!("client secret:      {}", field("client_secret")));
    lines.push(format!("scopes:             {}", list("scopes").join(" ")));
    let tokens = list("refresh_tokens");
    let keys = list("keys");
    for (token, key) in tokens.iter().zip(&keys) {
        lines.push(format!("refresh token:      {token} (key {key})"));
    }
    let exports: Vec<String> = document["env"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| format!("{name}={}", shell(value.as_str().unwrap_or_default())))
        .collect();
    lines.push(String::new());
    lines.push("Each refresh token is single-use: presenting one twice revokes its grant.".into());
    lines.push(
        "To use it with tokenkeeper (a configuration and a store of its own, removed when it stops):"
            .into(),
    );
    lines.push(String::new());
    lines.push(format!("  unset {}", list("unset").join(" ")));
    lines.push(format!("  export {}", exports.join(" \\\n    ")));
    if let (Some(token), Some(key)) = (tokens.first(), keys.first()) {
        let flag = if key == "default" {
            String::new()
        } else {
            format!(" --key {key}")
        };
        lines.push(format!(
            "  echo {} | tokenkeeper import{flag}",
            shell(token)
        ));
        lines.push(format!("  tokenkeeper token{flag}"));
        if tokens.len() > 1 {
            lines.push(format!(
                "  (likewise --key grant-2 to grant-{} with the other refresh tokens)",
                tokens.len()
            ));
        }
    }
    lines.push(String::new());
    lines.push("Stop it with Ctrl-C.".into());
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// `value` as one shell word: as it is when it holds only characters no shell treats
/// specially, else single-quoted.
fn shell(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c));
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Writes `document` to `path` whole: a temporary file beside it (mode 0600 on Unix),
/// renamed into place.
fn write_private(path: &Path, document: &serde_json::Value) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut file, document)?;
    file.write_all(b"\n")?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The signals that stop the simulator, listened for from the start: Ctrl-C, and on Unix
/// SIGTERM.
struct Stop {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Stop {
    fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    #[cfg_attr(not(unix), allow(unused_mut))]
    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

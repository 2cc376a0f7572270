//! `tokenkeeper simulate`: the provider simulator (`tokenkeeper::testing::Simulator`) as
//! a process of its own, for testing a CLI, a script or a service in any language
//! against a token endpoint with rotating, single-use refresh tokens and reuse
//! detection, without credentials.
//!
//! It prints (or writes, `--write`) what a client needs: the endpoints, the client
//! credentials the simulator accepts, and the first refresh token of each grant it
//! issued. These are the simulator's own throwaway values, printed by design; nothing
//! else the command does shows a secret.

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
    #[arg(long, default_value = "sim-client")]
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
    let document = describe(&sim, args.mode, &args.client_id, &refresh_tokens);
    if let Some(path) = &args.write {
        write_private(path, &document)
            .map_err(|e| Failure::other(format!("cannot write {}: {e}", path.display())))?;
    }
    if args.json {
        println!("{document}");
    } else {
        print!("{}", text(&document, args.mode));
    }
    // A script reading stdout sees everything before the simulator is up for good.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    interrupted().await;
    eprintln!("tokenkeeper: simulator stopped");
    Ok(())
}

/// What a client needs, as one JSON document.
fn describe(
    sim: &Simulator,
    mode: SimMode,
    client_id: &str,
    refresh_tokens: &[String],
) -> serde_json::Value {
    let grant_scopes = sim.grant_scopes(0).unwrap_or_default();
    json!({
        "mode": mode.provider(),
        "provider": mode.provider(),
        "base_url": sim.base_url().as_str(),
        "token_url": sim.token_url().as_str(),
        "authorization_url": sim.authorization_url().as_str(),
        "device_authorization_url": sim.device_authorization_url().as_str(),
        "revocation_url": sim.revocation_url().map(|u| u.to_string()),
        "api_url": sim.api_url().as_str(),
        "client_id": client_id,
        "client_secret": CLIENT_SECRET,
        "scopes": grant_scopes,
        "refresh_tokens": refresh_tokens,
    })
}

/// The document as text, with the environment that points `tokenkeeper` at it.
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
    let revocation = document["revocation_url"].as_str();
    if let Some(url) = revocation {
        lines.push(format!("revocation URL:     {url}"));
    }
    lines.push(format!(
        "API:                {} (checks a bearer token; ?scope=a+b requires scopes)",
        field("api_url")
    ));
    lines.push(format!("client id:          {}", field("client_id")));
    lines.push(format!("client secret:      {}", field("client_secret")));
    lines.push(format!("scopes:             {}", list("scopes").join(" ")));
    for token in list("refresh_tokens") {
        lines.push(format!("refresh token:      {token}"));
    }
    let mut env = vec![format!("TOKENKEEPER_PROVIDER={}", mode.provider())];
    if mode == SimMode::Highq {
        env.push(format!("TOKENKEEPER_BASE_URL={}", field("base_url")));
    } else {
        env.push(format!("TOKENKEEPER_TOKEN_URL={}", field("token_url")));
    }
    env.push(format!(
        "TOKENKEEPER_AUTHORIZATION_URL={}",
        field("authorization_url")
    ));
    env.push(format!(
        "TOKENKEEPER_DEVICE_AUTHORIZATION_URL={}",
        field("device_authorization_url")
    ));
    if let Some(url) = revocation {
        env.push(format!("TOKENKEEPER_REVOCATION_URL={url}"));
    }
    env.push(format!("TOKENKEEPER_CLIENT_ID={}", field("client_id")));
    env.push(format!(
        "TOKENKEEPER_CLIENT_SECRET={}",
        field("client_secret")
    ));
    lines.push(String::new());
    lines.push("Each refresh token is single-use: presenting one twice revokes its grant.".into());
    lines.push("To use it with tokenkeeper:".into());
    lines.push(String::new());
    lines.push(format!("  export {}", env.join(" \\\n    ")));
    lines.push("  echo <refresh token> | tokenkeeper import".into());
    lines.push("  tokenkeeper token".into());
    lines.push(String::new());
    lines.push("Stop it with Ctrl-C.".into());
    let mut out = lines.join("\n");
    out.push('\n');
    out
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
    std::io::Write::write_all(&mut file, b"\n")?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Ctrl-C, or (Unix) SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! The `tokenkeeper` command, run as a real process against the provider simulator.
//!
//! Every test points HOME, XDG_*, TOKENKEEPER_CONFIG and the store at its own temporary
//! directory. The test acts as the browser: it reads the authorization URL from the
//! child's stderr and GETs it (the simulator consents at once and redirects to the
//! command's loopback listener).
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{FileStore, TokenStore};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// The longest any one command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A sandbox: home, config file and store of one test.
struct Sandbox {
    dir: tempfile::TempDir,
}

/// What a finished command left.
#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl Sandbox {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config").join("config.toml")
    }

    /// Writes the config file with `text`, readable as `mode` says (Unix).
    fn write_config(&self, text: &str, mode: u32) {
        std::fs::create_dir_all(self.config().parent().unwrap()).unwrap();
        std::fs::write(self.config(), text).unwrap();
        #[cfg(unix)]
        std::fs::set_permissions(
            self.config(),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
        #[cfg(not(unix))]
        let _ = mode;
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The command, with a clean environment: no TOKENKEEPER_* or XDG_* from outside, the
    /// simulator's client secret in TOKENKEEPER_CLIENT_SECRET, everything in the sandbox.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokenkeeper"));
        command.args(args);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("TOKENKEEPER_") || name.starts_with("XDG_") {
                command.env_remove(name);
            }
        }
        let home = self.dir.path().join("home");
        command
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("xdg-config"))
            .env("XDG_DATA_HOME", home.join("xdg-data"))
            .env("TOKENKEEPER_CONFIG", self.config())
            .env("TOKENKEEPER_CLIENT_SECRET", "sim-secret")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs a command to its end.
    async fn run(&self, args: &[&str]) -> Output {
        finish(self.command(args).spawn().expect("spawn tokenkeeper")).await
    }

    /// Runs a command with `input` on its stdin.
    async fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut command = self.command(args);
        command.stdin(Stdio::piped());
        let mut child = command.spawn().expect("spawn tokenkeeper");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("write stdin");
        drop(stdin);
        finish(child).await
    }

    /// `token` with no settings at all: everything from the config file.
    async fn token(&self) -> Output {
        self.run(&["token"]).await
    }

    /// The grant stored under `key`, read straight from the store.
    async fn stored(&self, key: &str) -> Option<tokenkeeper::TokenSet> {
        FileStore::new(self.store())
            .load(key)
            .await
            .expect("load from the file store")
            .map(|v| v.value)
    }
}

/// Waits for a child and collects its output.
async fn finish(mut child: Child) -> Output {
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let collect = async {
        let (mut out, mut err) = (String::new(), String::new());
        let (a, b) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        a.expect("read stdout");
        b.expect("read stderr");
        let status = child.wait().await.expect("wait for tokenkeeper");
        Output {
            status,
            stdout: out,
            stderr: err,
        }
    };
    tokio::time::timeout(COMMAND_TIMEOUT, collect)
        .await
        .expect("tokenkeeper did not finish in time")
}

/// The settings flags pointing at `sim` in Generic mode, with the sandbox's store.
fn generic_flags(sim: &Simulator, sandbox: &Sandbox) -> Vec<String> {
    let mut flags = vec![
        "--provider".into(),
        "generic".into(),
        "--client-id".into(),
        "sim-client".into(),
        "--token-url".into(),
        sim.token_url().to_string(),
        "--authorization-url".into(),
        sim.authorization_url().to_string(),
        "--device-authorization-url".into(),
        sim.device_authorization_url().to_string(),
        "--store".into(),
        sandbox.store().display().to_string(),
    ];
    if let Some(revocation) = sim.revocation_url() {
        flags.extend(["--revocation-url".into(), revocation.to_string()]);
    }
    flags
}

/// A browser that does not follow redirects and uses no proxy.
fn browser(follow: bool) -> reqwest::Client {
    let policy = if follow {
        reqwest::redirect::Policy::limited(5)
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .no_proxy()
        .redirect(policy)
        .build()
        .expect("browser client")
}

/// Reads the child's stderr until the line after "Open this URL to sign in:", and returns
/// that URL and the lines read so far.
async fn authorization_url(
    stderr: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) -> (String, String) {
    let mut seen = String::new();
    let read = async {
        let mut next_is_url = false;
        while let Some(line) = stderr.next_line().await.expect("read stderr") {
            seen.push_str(&line);
            seen.push('\n');
            if next_is_url {
                return line;
            }
            next_is_url = line == "Open this URL to sign in:";
        }
        panic!("the command ended without printing an authorization URL:\n{seen}");
    };
    let url = tokio::time::timeout(COMMAND_TIMEOUT, read)
        .await
        .expect("no authorization URL in time");
    (url, seen)
}

/// Waits for a child whose stderr is already being read line by line.
async fn finish_lines(
    mut child: Child,
    mut stderr: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    mut seen: String,
) -> Output {
    let mut stdout = child.stdout.take().expect("stdout");
    let collect = async {
        let mut out = String::new();
        let read_err = async {
            while let Some(line) = stderr.next_line().await.expect("read stderr") {
                seen.push_str(&line);
                seen.push('\n');
            }
        };
        let (read, ()) = tokio::join!(stdout.read_to_string(&mut out), read_err);
        read.expect("read stdout");
        let status = child.wait().await.expect("wait for tokenkeeper");
        Output {
            status,
            stdout: out,
            stderr: seen,
        }
    };
    tokio::time::timeout(COMMAND_TIMEOUT, collect)
        .await
        .expect("tokenkeeper did not finish in time")
}

/// `tokenkeeper login` with the loopback listener, the test acting as the browser.
async fn login(sandbox: &Sandbox, flags: &[String]) -> Output {
    let mut args = vec!["login", "--no-browser", "--timeout", "30s"];
    args.extend(flags.iter().map(String::as_str));
    let mut child = sandbox.command(&args).spawn().expect("spawn login");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (url, seen) = authorization_url(&mut stderr).await;
    let page = browser(true)
        .get(&url)
        .send()
        .await
        .expect("the browser reaches the simulator and the loopback listener");
    let status = page.status();
    let body = page.text().await.unwrap_or_default();
    let output = finish_lines(child, stderr, seen).await;
    assert!(
        status.is_success() && body.contains("Signed in"),
        "the loopback listener answered {status}: {body}\n{output:?}"
    );
    output
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.code(),
        Some(code),
        "expected exit code {code}, got {:?}\nstdout: {}\nstderr: {}",
        output.code(),
        output.stdout,
        output.stderr
    );
}

/// The token printed: one line, nothing else.
fn printed_token(output: &Output) -> String {
    assert_exit(output, 0);
    let token = output
        .stdout
        .strip_suffix('\n')
        .expect("the token ends with a newline");
    assert!(
        !token.is_empty() && !token.contains('\n'),
        "stdout holds more than the token: {:?}",
        output.stdout
    );
    token.to_owned()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn login_generic_then_token_from_the_config_file_alone() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let sandbox = Sandbox::new();
    // Another profile, and a client secret already in this one: both must be kept.
    sandbox.write_config("[profiles.other]\nprovider = \"lucid\"\nclient_id = \"someone-else\"\n\n[profiles.default]\nclient_secret = \"sim-secret\"\n", 0o600);

    let mut args = vec!["login".to_owned(), "--no-browser".into()];
    args.extend(generic_flags(&sim, &sandbox));
    args.extend(["--scope".into(), "data:read".into()]);
    // The secret comes from the file only.
    let mut command = sandbox.command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    command.env_remove("TOKENKEEPER_CLIENT_SECRET");
    let mut child = command.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (url, seen) = authorization_url(&mut stderr).await;
    assert!(url.starts_with(sim.authorization_url().as_str()), "{url}");
    let page = browser(true).get(&url).send().await.unwrap();
    assert!(page.status().is_success());
    let output = finish_lines(child, stderr, seen).await;
    assert_exit(&output, 0);
    assert!(
        output.stdout.is_empty(),
        "login printed data: {}",
        output.stdout
    );
    assert!(
        output
            .stderr
            .contains(&sandbox.store().display().to_string()),
        "login does not say where the grant went: {}",
        output.stderr
    );
    assert_eq!(sim.counters().code_exchanges, 1);

    let stored = sandbox
        .stored("default")
        .await
        .expect("the store holds the grant");
    assert!(stored.refresh_token.is_some());
    assert_eq!(stored.scopes, vec!["data:read".to_owned()]);

    let config = std::fs::read_to_string(sandbox.config()).unwrap();
    let document: toml::Table = config.parse().unwrap();
    let profile = document["profiles"]["default"].as_table().unwrap();
    let value = |key: &str| profile.get(key).and_then(toml::Value::as_str);
    assert_eq!(value("provider"), Some("generic"));
    assert_eq!(value("client_id"), Some("sim-client"));
    assert_eq!(value("token_url"), Some(sim.token_url().as_str()));
    assert_eq!(
        value("store"),
        Some(&*sandbox.store().display().to_string())
    );
    assert_eq!(value("key"), Some("default"));
    assert_eq!(
        value("client_secret"),
        Some("sim-secret"),
        "the secret was dropped"
    );
    assert_eq!(
        document
            .get("profiles")
            .and_then(|p| p.get("other"))
            .and_then(|p| p.get("client_id"))
            .and_then(toml::Value::as_str),
        Some("someone-else"),
        "another profile was lost"
    );
    #[cfg(unix)]
    assert_eq!(mode(&sandbox.config()), 0o600);

    let token = printed_token(&sandbox.token().await);
    assert_eq!(
        Some(token.as_str()),
        stored.access_token.as_ref().map(|t| t.secret())
    );
    assert_eq!(sim.counters().refreshes, 0, "a fresh token was refreshed");
}

#[tokio::test(flavor = "multi_thread")]
async fn login_lucid_with_url_overrides_creates_a_private_config() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let sandbox = Sandbox::new();
    let flags: Vec<String> = [
        "--provider",
        "lucid",
        "--client-id",
        "sim-client",
        "--token-url",
        sim.token_url().as_str(),
        "--authorization-url",
        sim.authorization_url().as_str(),
        "--revocation-url",
        sim.revocation_url().unwrap().as_str(),
        "--store",
        &sandbox.store().display().to_string(),
        "--key",
        "lucid:me",
    ]
    .map(str::to_owned)
    .into();
    let output = login(&sandbox, &flags).await;
    assert_exit(&output, 0);
    assert_eq!(sim.counters().code_exchanges, 1);
    let stored = sandbox
        .stored("lucid:me")
        .await
        .expect("the grant is stored");
    assert!(stored.refresh_token.is_some());
    #[cfg(unix)]
    assert_eq!(mode(&sandbox.config()), 0o600);
    let config = std::fs::read_to_string(sandbox.config()).unwrap();
    assert!(
        !config.contains("sim-secret"),
        "the secret from the environment was written"
    );
    assert!(config.contains("provider = \"lucid\""), "{config}");

    let token = printed_token(&sandbox.token().await);
    assert_eq!(
        Some(token.as_str()),
        stored.access_token.as_ref().map(|t| t.secret())
    );
    assert_eq!(sim.counters().refreshes, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_exits_4_when_the_grant_was_revoked_at_the_provider() {
    let sim = Simulator::builder(Mode::Generic)
        .access_lifetime(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sim.revoke_all();
    let output = sandbox.token().await;
    assert_exit(&output, 4);
    assert!(output.stdout.is_empty());
    assert!(
        output.stderr.contains("re-authorize") && output.stderr.contains("tokenkeeper login"),
        "{}",
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_exits_75_when_the_provider_is_unreachable() {
    let sim = Simulator::builder(Mode::Generic)
        .access_lifetime(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    drop(sim);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let output = sandbox.token().await;
    assert_exit(&output, 75);
    assert!(output.stdout.is_empty());
    // Nothing was lost: the refresh token is still stored, usable later.
    let stored = sandbox.stored("default").await.unwrap();
    assert!(stored.refresh_token.is_some() && stored.rejected_at.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn token_exits_78_when_the_client_secret_is_rejected() {
    let sim = Simulator::builder(Mode::Generic)
        .access_lifetime(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut command = sandbox.command(&["token"]);
    command.env("TOKENKEEPER_CLIENT_SECRET", "not-the-secret");
    let output = finish(command.spawn().unwrap()).await;
    assert_exit(&output, 78);
    assert!(
        !output.stderr.contains("not-the-secret"),
        "{}",
        output.stderr
    );
    // The grant survives a configuration error: with the right secret it works.
    printed_token(&sandbox.token().await);
    assert_eq!(sim.counters().refreshes, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_lists_every_grant_and_no_token() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    let refresh_token = sim.issue_grant();
    let imported = sandbox
        .run_with_stdin(
            &["import", "--key", "second"],
            &format!("{refresh_token}\n"),
        )
        .await;
    assert_exit(&imported, 0);

    let output = sandbox.run(&["status", "--json"]).await;
    assert_exit(&output, 0);
    let document: serde_json::Value =
        serde_json::from_str(&output.stdout).expect("status --json prints one JSON document");
    let grants = document["grants"].as_array().expect("a grants array");
    let keys: Vec<&str> = grants.iter().filter_map(|g| g["key"].as_str()).collect();
    assert_eq!(keys, ["default", "second"]);
    let first = &grants[0];
    let expires_at = first["access_token_expires_at"]
        .as_str()
        .expect("an expiry");
    time::OffsetDateTime::parse(expires_at, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 instant");
    assert!(first["access_token_expires_in_seconds"].as_i64().unwrap() > 3000);
    assert!(first["last_refresh"].is_string());
    assert!(first["last_error"].is_null());
    assert_eq!(first["state"], "ok");

    let stored = sandbox.stored("default").await.unwrap();
    for secret in [
        stored.access_token.unwrap().secret().to_owned(),
        stored.refresh_token.unwrap().secret().to_owned(),
        refresh_token,
    ] {
        assert!(!output.stdout.contains(&secret), "status printed a token");
    }

    let text = sandbox.run(&["status"]).await;
    assert_exit(&text, 0);
    assert!(text.stdout.contains("default") && text.stdout.contains("second"));
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_revoke_revokes_at_the_provider_and_token_then_exits_4() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    let output = sandbox.run(&["logout", "--revoke"]).await;
    assert_exit(&output, 0);
    assert!(output.stderr.contains("Revoked"), "{}", output.stderr);
    assert_eq!(sim.counters().revocations, 1);
    assert!(sim.grant_revoked(0));
    let stored = sandbox.stored("default").await.unwrap();
    assert!(stored.revoked_at.is_some() && stored.refresh_token.is_none());

    let token = sandbox.token().await;
    assert_exit(&token, 4);

    let status = sandbox.run(&["status", "--json"]).await;
    let document: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(document["grants"][0]["state"], "revoked");
    assert_eq!(document["grants"][0]["reauthorization_in_seconds"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_without_revoke_only_forgets() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    let output = sandbox.run(&["logout"]).await;
    assert_exit(&output, 0);
    assert_eq!(sim.counters().revocations, 0, "the provider was called");
    assert!(!sim.grant_revoked(0));
    assert_exit(&sandbox.token().await, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_token_processes_at_once_refresh_exactly_once() {
    // The token is stale once half its 8 s lifetime has passed (the leeway, --min-valid,
    // is capped at half the lifetime), and the refreshed one stays fresh for 4 s: long
    // enough for every process to pick it up from the store.
    let sim = Simulator::builder(Mode::Generic)
        .access_lifetime(Duration::from_secs(8))
        .start()
        .await
        .unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    let first = sandbox
        .stored("default")
        .await
        .unwrap()
        .access_token
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4200)).await;

    let children: Vec<Child> = (0..20)
        .map(|_| {
            sandbox
                .command(&["token", "--min-valid", "8s"])
                .spawn()
                .expect("spawn token")
        })
        .collect();
    let outputs = futures_util::future::join_all(children.into_iter().map(finish)).await;
    let tokens: Vec<String> = outputs.iter().map(printed_token).collect();
    assert!(
        tokens.iter().all(|t| t == &tokens[0]),
        "the processes printed different tokens"
    );
    assert_ne!(tokens[0], first.secret(), "the stale token was printed");
    let counters = sim.counters();
    assert_eq!(counters.refreshes, 1, "{counters:?}");
    assert_eq!(counters.reuse_attempts, 0, "{counters:?}");
    assert_eq!(
        sandbox
            .stored("default")
            .await
            .unwrap()
            .access_token
            .unwrap()
            .secret(),
        tokens[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn import_from_stdin_then_token() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let sandbox = Sandbox::new();
    let flags = generic_flags(&sim, &sandbox);
    let mut args = vec!["import"];
    args.extend(flags.iter().map(String::as_str));

    let empty = sandbox.run_with_stdin(&args, "  \n").await;
    assert_exit(&empty, 1);
    assert!(
        empty.stderr.contains("no refresh token"),
        "{}",
        empty.stderr
    );
    assert!(sandbox.stored("default").await.is_none());

    let refresh_token = sim.issue_grant();
    let output = sandbox
        .run_with_stdin(&args, &format!("  {refresh_token}  \n"))
        .await;
    assert_exit(&output, 0);
    assert!(!output.stderr.contains(&refresh_token));
    let token = printed_token(&sandbox.token().await);
    assert_eq!(sim.counters().refreshes, 1);
    assert_eq!(
        sandbox
            .stored("default")
            .await
            .unwrap()
            .access_token
            .unwrap()
            .secret(),
        token
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn login_paste_takes_the_redirect_url_from_stdin() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let sandbox = Sandbox::new();
    let mut args = vec!["login".to_owned(), "--paste".into()];
    args.extend(generic_flags(&sim, &sandbox));
    let mut command = sandbox.command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    command.stdin(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (url, seen) = authorization_url(&mut stderr).await;
    let answer = browser(false).get(&url).send().await.unwrap();
    assert!(answer.status().is_redirection(), "{}", answer.status());
    let location = answer.headers()[reqwest::header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(location.contains("code="), "{location}");
    stdin
        .write_all(format!("{location}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let output = finish_lines(child, stderr, seen).await;
    assert_exit(&output, 0);
    assert_eq!(sim.counters().code_exchanges, 1);
    printed_token(&sandbox.token().await);
    assert_eq!(sim.counters().refreshes, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_device_prints_the_user_code() {
    let sim = Simulator::builder(Mode::Generic)
        .device_interval(Duration::from_secs(1))
        .device_auto_approve_after(1)
        .start()
        .await
        .unwrap();
    let sandbox = Sandbox::new();
    let mut args = vec!["login".to_owned(), "--device".into()];
    args.extend(generic_flags(&sim, &sandbox));
    let output = sandbox
        .run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert_exit(&output, 0);
    assert!(
        output.stderr.contains("enter the code"),
        "{}",
        output.stderr
    );
    assert_eq!(sim.counters().device_authorizations, 1);
    printed_token(&sandbox.token().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_take_flag_then_environment_then_file() {
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(sandbox.config().parent().unwrap()).unwrap();
    std::fs::write(
        sandbox.config(),
        format!(
            "[profiles.default]\nprovider = \"generic\"\nclient_id = \"file-client\"\ntoken_url = \"http://127.0.0.1:9/token\"\nstore = \"{}\"\nkey = \"file-key\"\n",
            sandbox.store().display()
        ),
    )
    .unwrap();
    let key_of = |output: &Output| {
        assert_exit(output, 0);
        output.stderr.clone()
    };
    let from_file = sandbox.run(&["logout"]).await;
    assert!(
        key_of(&from_file).contains("\"file-key\""),
        "{}",
        from_file.stderr
    );
    let mut command = sandbox.command(&["logout"]);
    command.env("TOKENKEEPER_KEY", "env-key");
    let from_env = finish(command.spawn().unwrap()).await;
    assert!(
        key_of(&from_env).contains("\"env-key\""),
        "{}",
        from_env.stderr
    );
    let mut command = sandbox.command(&["logout", "--key", "flag-key"]);
    command.env("TOKENKEEPER_KEY", "env-key");
    let from_flag = finish(command.spawn().unwrap()).await;
    assert!(
        key_of(&from_flag).contains("\"flag-key\""),
        "{}",
        from_flag.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_errors_exit_78_and_say_what_is_missing() {
    let sandbox = Sandbox::new();
    sandbox.write_config(
        "[profiles.default]\nprovider = \"lucid\"\nclient_secret = \"file-secret\"\n",
        0o644,
    );
    let output = sandbox.token().await;
    assert_exit(&output, 78);
    for name in ["--client-id", "TOKENKEEPER_CLIENT_ID", "client_id"] {
        assert!(
            output.stderr.contains(name),
            "{name} not named: {}",
            output.stderr
        );
    }
    assert!(!output.stderr.contains("file-secret"));
    #[cfg(unix)]
    assert!(
        output.stderr.contains("readable by group or others"),
        "no warning about the exposed secret: {}",
        output.stderr
    );

    let garbage = sandbox.run(&["token", "--min-valid", "5x"]).await;
    assert_exit(&garbage, 2);
    assert!(
        garbage.stderr.contains("not a duration"),
        "{}",
        garbage.stderr
    );

    std::fs::write(
        sandbox.config(),
        "[profiles.default]\nclient_id = \"x\"\nprovidr = \"lucid\"\n",
    )
    .unwrap();
    let typo = sandbox.token().await;
    assert_exit(&typo, 78);
    assert!(typo.stderr.contains("providr"), "{}", typo.stderr);
}

/// Makes `dir` refuse new files while it lives: mode 0500, or `chattr +i` where modes do
/// not bind (root). `None` when neither works here.
struct Frozen<'a>(&'a Path);

#[cfg(unix)]
impl<'a> Frozen<'a> {
    fn new(dir: &'a Path) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt;
        let can_create = || {
            let probe = dir.join("probe");
            let created = std::fs::write(&probe, b"").is_ok();
            let _ = std::fs::remove_file(&probe);
            created
        };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500)).ok()?;
        let frozen = Frozen(dir);
        if !can_create() {
            return Some(frozen);
        }
        let _ = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .stderr(Stdio::null())
            .status();
        (!can_create()).then_some(frozen)
    }
}

#[cfg(unix)]
impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(self.0)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::set_permissions(self.0, std::fs::Permissions::from_mode(0o700));
    }
}

/// A rotated token set whose save fails is saved before `token` exits: the process waits
/// for the store (flush) instead of losing the only valid refresh token.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn token_saves_the_rotated_grant_before_exiting_when_the_store_fails_for_a_while() {
    // Stale 2 s after issue; each token request answered after 1 s.
    let sim = Simulator::builder(Mode::Generic)
        .access_lifetime(Duration::from_secs(4))
        .response_delay(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let sandbox = Sandbox::new();
    assert_exit(&login(&sandbox, &generic_flags(&sim, &sandbox)).await, 0);
    tokio::time::sleep(Duration::from_millis(2200)).await;

    let child = sandbox.command(&["token"]).spawn().unwrap();
    // The refresh token is presented (its write-ahead record is saved): now the store
    // refuses writes until the answer has come back and its save failed a few times.
    tokio::time::timeout(COMMAND_TIMEOUT, async {
        while sim.counters().refreshes == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the token process never refreshed");
    let store = sandbox.store();
    let Some(frozen) = Frozen::new(&store) else {
        eprintln!("skipped: cannot make a directory refuse writes here");
        return;
    };
    tokio::time::sleep(Duration::from_millis(1800)).await;
    drop(frozen);
    let output = finish(child).await;
    let token = printed_token(&output);

    let stored = sandbox.stored("default").await.unwrap();
    assert_eq!(
        stored.refresh_token.as_ref().map(|t| t.secret().to_owned()),
        sim.current_refresh_token(0),
        "the process exited before the rotated refresh token was saved"
    );
    assert_eq!(stored.access_token.unwrap().secret(), token);
    assert!(stored.rotation.is_none());
    assert_exit(&sandbox.token().await, 0);
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// A free loopback port (bound, then released) for `--port`.
fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port().to_string()
}

/// The README's shortest path per provider, against the simulator: `login` as the table
/// shows it (HighQ from its instance URL with a fixed port; Autodesk with a fixed port
/// and a scope; Lucid's copy-code page with `--paste` and the bare code), then `token`
/// with no flags prints the stored token without a refresh.
#[tokio::test(flavor = "multi_thread")]
async fn readme_shortest_paths_per_provider() {
    // HighQ: the instance URL is enough.
    let sim = Simulator::builder(Mode::HighQ).start().await.unwrap();
    let sandbox = Sandbox::new();
    let port = free_port();
    let flags: Vec<String> = [
        "--provider",
        "highq",
        "--client-id",
        "sim-client",
        "--base-url",
        sim.base_url().as_str(),
        "--port",
        &port,
        "--store",
        &sandbox.store().display().to_string(),
    ]
    .map(str::to_owned)
    .into();
    let output = login(&sandbox, &flags).await;
    assert_exit(&output, 0);
    assert!(
        output.stderr.contains("signed in useremail user"),
        "the account is named: {}",
        output.stderr
    );
    printed_token(&sandbox.token().await);
    assert_eq!(sim.counters().code_exchanges, 1, "HighQ");
    assert_eq!(sim.counters().refreshes, 0, "HighQ");

    // Autodesk: a fixed port and a scope (PKCE verified by the simulator).
    let sim = Simulator::builder(Mode::Autodesk).start().await.unwrap();
    let sandbox = Sandbox::new();
    let port = free_port();
    let flags: Vec<String> = [
        "--provider",
        "autodesk",
        "--client-id",
        "sim-client",
        "--token-url",
        sim.token_url().as_str(),
        "--authorization-url",
        sim.authorization_url().as_str(),
        "--port",
        &port,
        "--scope",
        "data:read",
        "--store",
        &sandbox.store().display().to_string(),
    ]
    .map(str::to_owned)
    .into();
    assert_exit(&login(&sandbox, &flags).await, 0);
    printed_token(&sandbox.token().await);
    let counters = sim.counters();
    assert_eq!(counters.pkce_verified, 1, "Autodesk");
    assert_eq!(counters.refreshes, 0, "Autodesk");

    // Lucid: the copy-code page and the bare code pasted.
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let sandbox = Sandbox::new();
    let store = sandbox.store().display().to_string();
    let (token_url, authorization_url) = (sim.token_url(), sim.authorization_url());
    let args = [
        "login",
        "--paste",
        "--provider",
        "lucid",
        "--client-id",
        "sim-client",
        "--token-url",
        token_url.as_str(),
        "--authorization-url",
        authorization_url.as_str(),
        "--scope",
        "offline_access",
        "--store",
        &store,
    ];
    let mut command = sandbox.command(&args);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (url, seen) = self::authorization_url(&mut stderr).await;
    let answer = browser(false).get(&url).send().await.unwrap();
    let location = url::Url::parse(
        answer.headers()[reqwest::header::LOCATION]
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert!(
        location
            .as_str()
            .starts_with("https://lucid.app/oauth2/clients/sim-client/redirect"),
        "Lucid's copy-code page: {location}"
    );
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    stdin
        .write_all(format!("{code}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    assert_exit(&finish_lines(child, stderr, seen).await, 0);
    printed_token(&sandbox.token().await);
    assert_eq!(sim.counters().code_exchanges, 1, "Lucid");
    assert_eq!(sim.counters().refreshes, 0, "Lucid");
}

/// `tokenkeeper simulate` started as a process, used by other processes: `import` and
/// `token` run with nothing but the environment its JSON names (a configuration and a
/// store of its own, not the user's), the token accepted by its API endpoint within the
/// grant's scopes; reusing a consumed refresh token revokes the grant, as a real server
/// with reuse detection does; SIGTERM stops it cleanly and removes its store.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn simulate_runs_as_a_process_that_other_processes_use() {
    let sandbox = Sandbox::new();
    let written = sandbox.dir.path().join("sim.json");
    let written_arg = written.display().to_string();
    let simulator = sandbox
        .command(&[
            "simulate",
            "--mode",
            "lucid",
            "--scope",
            "data:read files:write",
            "--grants",
            "2",
            "--json",
            "--write",
            &written_arg,
        ])
        .spawn()
        .expect("spawn the simulator");
    let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
    while !written.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the simulator wrote no {written_arg}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mode(&written), 0o600, "the document holds secrets");
    let document: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&written).unwrap()).unwrap();
    let field = |name: &str| document[name].as_str().unwrap().to_owned();
    let refresh_tokens: Vec<String> = document["refresh_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(refresh_tokens.len(), 2);
    assert_eq!(document["keys"], serde_json::json!(["grant-1", "grant-2"]));
    assert_eq!(
        document["scopes"],
        serde_json::json!(["data:read", "files:write"])
    );
    let env = document["env"].as_object().unwrap().clone();
    let own_store = PathBuf::from(env["TOKENKEEPER_STORE"].as_str().unwrap());

    // Another process, configured by the document's environment alone (the sandbox's
    // own config file and store stay untouched).
    let configured = |args: &[&str]| {
        let mut command = sandbox.command(args);
        command.env_remove("TOKENKEEPER_CLIENT_SECRET");
        for (name, value) in &env {
            command.env(name, value.as_str().unwrap());
        }
        command
    };
    let mut import = configured(&["import", "--key", "grant-1"]);
    import.stdin(Stdio::piped());
    let mut child = import.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{}\n", refresh_tokens[0]).as_bytes())
        .await
        .unwrap();
    drop(stdin);
    assert_exit(&finish(child).await, 0);
    let token =
        printed_token(&finish(configured(&["token", "--key", "grant-1"]).spawn().unwrap()).await);
    assert!(own_store.exists(), "the grant is in the simulator's store");
    assert!(!sandbox.config().exists() && !sandbox.store().exists());

    let api = |scope: &str| {
        let url = format!("{}?scope={scope}", field("api_url"));
        let token = token.clone();
        async move {
            browser(false)
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    let me = api("data:read").await;
    assert_eq!(me.status(), 200);
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(me["scope"], "data:read files:write");
    assert_eq!(api("data:write").await.status(), 403, "outside the grant");

    // The imported refresh token was consumed by the refresh: presenting it again is
    // reuse, and the simulator revokes the grant, access token included.
    let reuse = browser(false)
        .post(field("token_url"))
        .json(&serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_tokens[0],
            "client_id": field("client_id"),
            "client_secret": field("client_secret"),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(reuse.status(), 400);
    assert_eq!(
        api("data:read").await.status(),
        401,
        "the grant was revoked"
    );

    // SIGTERM: a clean stop, its store removed.
    terminate(&simulator);
    let stopped = finish(simulator).await;
    assert_exit(&stopped, 0);
    let printed: serde_json::Value = serde_json::from_str(stopped.stdout.trim()).unwrap();
    assert_eq!(
        printed, document,
        "stdout (--json) and the file say the same"
    );
    assert!(!own_store.exists(), "the simulator's store is removed");
}

/// Sends SIGTERM to `child`.
#[cfg(unix)]
fn terminate(child: &Child) {
    let pid = child.id().expect("the child runs").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
}

/// The text `simulate` prints: the shell lines unset what the mode does not use (a
/// token URL left from a Lucid run would override HighQ's) and quote what the shell
/// would split; they work as printed.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn simulate_prints_shell_lines_that_work_as_printed() {
    let sandbox = Sandbox::new();
    let mut simulator = sandbox
        .command(&["simulate", "--mode", "highq", "--client-id", "my client"])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(simulator.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let read = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if line == "Stop it with Ctrl-C." {
                return;
            }
        }
        panic!("the simulator ended early");
    };
    tokio::time::timeout(COMMAND_TIMEOUT, read).await.unwrap();
    let shell_lines: Vec<&str> = printed
        .lines()
        .skip_while(|l| !l.starts_with("  unset "))
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(
        shell_lines[0].contains("TOKENKEEPER_TOKEN_URL"),
        "{printed}"
    );
    assert!(
        printed.contains("TOKENKEEPER_CLIENT_ID='my client'"),
        "{printed}"
    );
    // The lines, run by a shell with stale settings from another run in its environment.
    let script = format!("set -e\n{}\n", shell_lines.join("\n"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tokenkeeper"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut run = Command::new("sh");
    run.arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("HOME", sandbox.dir.path())
        .env("TOKENKEEPER_TOKEN_URL", "http://127.0.0.1:9/stale")
        .env("TOKENKEEPER_KEY", "stale")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = finish(run.spawn().unwrap()).await;
    printed_token(&output);
    terminate(&simulator);
    simulator.wait().await.unwrap();
}

/// A port already taken: exit 78, naming the port.
#[tokio::test(flavor = "multi_thread")]
async fn simulate_on_a_taken_port_exits_78() {
    let sandbox = Sandbox::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = sandbox.run(&["simulate", "--port", &port]).await;
    assert_exit(&output, 78);
    assert!(output.stderr.contains(&port), "{}", output.stderr);
}

//! Child processes for multi-process tests: a test binary re-executes itself to run one
//! named test as the child, passes it a JSON configuration in an environment variable,
//! and reads back the JSON report the child prints after [`RESULT_PREFIX`].
//!
//! Included with `#[path = "support/children.rs"] mod children;`.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokenkeeper::TokenStore;

/// What starts a child's report line on its stdout.
pub const RESULT_PREFIX: &str = "TK_RESULT ";

/// The store a child connects to.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub enum Backend {
    Redis,
    Postgres,
    /// A `FileStore`; the "URL" is its directory.
    File,
}

/// Connects to `backend` at `url`; PostgreSQL operations bounded by `operation_timeout`
/// when given. Panics when the store cannot be reached.
pub async fn connect(
    backend: Backend,
    url: &str,
    operation_timeout: Option<Duration>,
) -> Arc<dyn TokenStore> {
    let _ = operation_timeout;
    match backend {
        Backend::File => Arc::new(tokenkeeper::FileStore::new(url)),
        // A TLS test appends `#ca=<path>`: the private CA the server's certificate is
        // signed by (the redis crate takes no root from the URL).
        #[cfg(feature = "redis")]
        Backend::Redis => Arc::new(match url.split_once("#ca=") {
            Some((url, ca)) => {
                tokenkeeper::store::redis::RedisStore::connect_with_root_certificates(
                    url,
                    &std::fs::read(ca).expect("the test CA"),
                )
                .await
                .expect("connect to redis over TLS")
            }
            None => tokenkeeper::store::redis::RedisStore::connect(url)
                .await
                .expect("connect to redis"),
        }),
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let store = tokenkeeper::store::postgres::PostgresStore::connect(url)
                .await
                .expect("connect to postgres");
            Arc::new(match operation_timeout {
                Some(timeout) => store.with_operation_timeout(timeout),
                None => store,
            })
        }
        #[allow(unreachable_patterns)]
        other => panic!("{other:?} is not compiled in"),
    }
}

/// Makes the store ready before children race to use it: PostgreSQL's table.
pub async fn prepare(backend: Backend, url: &str) {
    #[cfg(feature = "postgres")]
    if backend == Backend::Postgres {
        tokenkeeper::store::postgres::PostgresStore::connect(url)
            .await
            .expect("connect to postgres")
            .create_schema()
            .await
            .expect("create the schema");
    }
    let _ = (backend, url);
}

/// Runs the test named `test` of this binary as a child, with `config` (JSON) in the
/// environment variable `env`. Its stdout is captured for [`report_of`].
pub fn spawn(test: &str, env: &str, config: &impl Serialize) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(
            env,
            serde_json::to_string(config).expect("a child config serializes"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a child process")
}

/// The child's side, for its `#[test]` entry point: does nothing unless `env` holds a
/// configuration; otherwise runs `child` with it on a two-thread runtime and prints the
/// report.
pub fn run_if_child<C, R, F>(env: &str, child: impl FnOnce(C) -> F)
where
    C: DeserializeOwned,
    R: Serialize,
    F: std::future::Future<Output = R>,
{
    let Ok(config) = std::env::var(env) else {
        return;
    };
    let config: C = serde_json::from_str(&config).expect("child config");
    // `TK_CHILD_LOG=1` shows the children's log lines (info and above) on stderr.
    if std::env::var_os("TK_CHILD_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::INFO)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the child");
    print_report(&runtime.block_on(child(config)));
}

/// The child's side: prints `report` where [`report_of`] finds it (the harness prints
/// "test name ... " on the same line first, hence the line break).
pub fn print_report(report: &impl Serialize) {
    println!(
        "\n{RESULT_PREFIX}{}",
        serde_json::to_string(report).expect("a report serializes")
    );
}

/// Waits for `child` and reads its report; panics if it failed or printed none.
pub fn report_of<T: DeserializeOwned>(child: Child) -> T {
    let output = child.wait_with_output().expect("child output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(RESULT_PREFIX).map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no report from the child: {stdout}"));
    serde_json::from_str(line).expect("child report")
}

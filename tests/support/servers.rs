//! Real Redis and PostgreSQL servers for tests and benches, from Debian's packages
//! (`scripts/install-test-deps.sh` installs them). Each server gets a temporary directory
//! and a free loopback port, and is stopped (killed and waited for) on drop.
//!
//! Included with `#[path = "support/servers.rs"] mod servers;`. Starting fails loudly
//! (a panic naming what is missing): a test that needs a server never passes without it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local addr").port()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to this process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A `redis-server` on 127.0.0.1.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    /// More `redis-server` arguments.
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server that keeps nothing on disk (`--save '' --appendonly no`).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server with an fsynced append-only file, so that its data survives
    /// [`RedisServer::restart`].
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    /// A server started with these extra arguments (cluster mode, TLS).
    pub fn start_with_args(extra: &[&str]) -> Self {
        Self::start_configured(false, extra)
    }

    /// Its data directory (for files its arguments name).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn start_with(persistent: bool) -> Self {
        Self::start_configured(persistent, &[])
    }

    fn start_configured(persistent: bool, extra: &[&str]) -> Self {
        let mut last_error = String::new();
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis"),
                persistent,
                extra: extra.iter().map(|a| (*a).to_owned()).collect(),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log =
            std::fs::File::create(self.dir.path().join("redis.log")).map_err(|e| e.to_string())?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--dir"])
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--protected-mode", "no"]);
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        command.args(&self.extra);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): run scripts/install-test-deps.sh to install it"
                )
            });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited with {status}: {}", self.log()));
            }
            if redis_ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server not ready in time: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (and, if persistent, with the same data).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// The directory of the newest installed PostgreSQL server binaries
/// (`/usr/lib/postgresql/<version>/bin`, outside PATH on Debian).
pub fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: run scripts/install-test-deps.sh"
        )
    })
}

/// A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 (trust
/// authentication, user `postgres`, fsync off). Run as the `postgres` user when the tests
/// run as root, since `initdb` and `postgres` refuse root.
pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    running: bool,
}

impl PostgresServer {
    /// Creates and starts a cluster.
    pub fn start() -> Self {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown of the PostgreSQL temp dir failed");
        }
        let mut server = Self {
            port: 0,
            bin,
            dir,
            running: false,
        };
        let data = server.data_dir();
        let output = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.pg_ctl_start() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command running `program` from the server's bin dir, as `postgres` under root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let options = format!(
            // fsync off: data reaches the OS (and survives a killed server) but is not
            // forced to disk. synchronous_commit stays on, or an immediate stop would lose
            // commits still in WAL buffers.
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off \
             -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &options, "-w", "-t", "30", "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            self.running = true;
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            ))
        }
    }

    /// `postgresql://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the cluster's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no clean shutdown, like a
    /// crash) and waits for it; kills the postmaster if that fails.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let stopped = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let pid = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_owned));
            if let Some(pid) = pid {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }

    /// Starts the server again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.pg_ctl_start() {
            panic!("PostgreSQL did not restart: {e}");
        }
    }

    /// Turns TLS on (`ssl = on`) with this certificate and key, copied into the data
    /// directory, and restarts the server. Plaintext connections stay allowed.
    pub fn enable_tls(&mut self, cert: &Path, key: &Path) {
        let data = self.data_dir();
        let (crt, pem) = (data.join("server.crt"), data.join("server.key"));
        std::fs::copy(cert, &crt).expect("copy the certificate");
        std::fs::copy(key, &pem).expect("copy the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600))
                .expect("key mode");
        }
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&crt)
                .arg(&pem)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown of the TLS files failed");
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        std::io::Write::write_all(&mut conf, b"\nssl = on\n").expect("enable ssl");
        self.restart();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server a test can stop and start again on the same port.
pub trait Restartable {
    /// Stops the server (as a crash would).
    fn stop_server(&mut self);
    /// Starts it again on the same port.
    fn restart_server(&mut self);
}

impl Restartable for RedisServer {
    fn stop_server(&mut self) {
        self.stop();
    }
    fn restart_server(&mut self) {
        self.restart();
    }
}

impl Restartable for PostgresServer {
    fn stop_server(&mut self) {
        self.stop();
    }
    fn restart_server(&mut self) {
        self.restart();
    }
}

//! A fault-injecting loopback TCP proxy, to put faults between a store client (Redis,
//! PostgreSQL) and its real server.
//!
//! [`FaultProxy`] listens on `127.0.0.1:<free port>`, connects every accepted client to the
//! upstream address and forwards bytes both ways. Faults are decided per client->server
//! chunk (one read from the client socket, at most 64 KiB: for Redis and PostgreSQL
//! typically one request or one pipelined batch), with a PRNG seeded from
//! [`FaultConfig::seed`] and the connection's number:
//!
//! - `delay`: the chunk is held for a duration drawn from [`FaultConfig::delay_range`]
//!   before it is forwarded. Nothing is read from the client meanwhile, so later chunks
//!   wait behind it and bytes are never reordered; answers to earlier requests keep
//!   flowing to the client.
//! - `cut_before`: the connection is closed on both sides without forwarding the chunk
//!   (the request never reaches the server).
//! - `cut_after`: the chunk is forwarded, then the proxy waits for the server to start
//!   answering (its first bytes, or [`FaultConfig::cut_after_wait`]) and closes both sides
//!   without forwarding the answer (the request was executed, its answer is lost).
//!
//! The server->client direction is never faulted, except that a cut closes it.
//!
//! Included with `#[path = "support/proxy.rs"] mod proxy;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Range;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The largest chunk read from either socket at once.
const CHUNK: usize = 64 * 1024;
/// How long connecting to the upstream server may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What faults to inject, and how often.
///
/// The three probabilities are per client->server chunk and exclusive: one uniform draw
/// `r` in `[0, 1)` picks `cut_before` when `r < cut_before`, else `cut_after` when
/// `r < cut_before + cut_after`, else `delay` when `r < cut_before + cut_after + delay`,
/// else no fault. Each probability is clamped to `[0, 1]`; when they add up to more than
/// 1, the later kinds get what is left.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Probability of holding a chunk for a duration drawn from `delay_range`.
    pub delay: f64,
    /// Probability of closing the connection instead of forwarding a chunk.
    pub cut_before: f64,
    /// Probability of forwarding a chunk, then closing the connection instead of
    /// forwarding its answer.
    pub cut_after: f64,
    /// Delays are drawn uniformly from this range (`start` when the range is empty).
    pub delay_range: Range<Duration>,
    /// How long a `cut_after` waits for the server's first answer bytes before cutting
    /// anyway.
    pub cut_after_wait: Duration,
    /// Seeds the PRNGs: connection `n` (0, 1, ... in accept order) draws from a PRNG seeded
    /// from `(seed, n)`, so a connection's faults do not depend on other connections'
    /// traffic.
    pub seed: u64,
}

impl Default for FaultConfig {
    /// No faults (pure forwarding); delays of 200 ms to 3 s when `delay` is raised.
    fn default() -> Self {
        Self {
            delay: 0.0,
            cut_before: 0.0,
            cut_after: 0.0,
            delay_range: Duration::from_millis(200)..Duration::from_secs(3),
            cut_after_wait: Duration::from_millis(200),
            seed: 0x5EED,
        }
    }
}

impl FaultConfig {
    /// No faults at all: a plain forwarding proxy.
    pub fn none() -> Self {
        Self::default()
    }

    /// The given probabilities and seed, with the default delay range and
    /// `cut_after_wait`.
    pub fn with(delay: f64, cut_before: f64, cut_after: f64, seed: u64) -> Self {
        Self {
            delay,
            cut_before,
            cut_after,
            seed,
            ..Self::default()
        }
    }

    fn decide(&self, rng: &mut XorShift) -> Fault {
        let p = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        let r = rng.next_f64();
        let cut_before = p(self.cut_before);
        let cut_after = cut_before + p(self.cut_after);
        let delay = cut_after + p(self.delay);
        if r < cut_before {
            Fault::CutBefore
        } else if r < cut_after {
            Fault::CutAfter
        } else if r < delay {
            let Range { start, end } = self.delay_range;
            let duration = if end > start {
                start + (end - start).mul_f64(rng.next_f64())
            } else {
                start
            };
            Fault::Delay(duration)
        } else {
            Fault::None
        }
    }
}

/// What happened so far, counted since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Client connections accepted.
    pub connections: u64,
    /// Client->server chunks read (faulted or not, enabled or not).
    pub chunks: u64,
    /// Chunks delayed.
    pub delayed: u64,
    /// Connections cut before forwarding a chunk.
    pub cut_before: u64,
    /// Connections cut after forwarding a chunk, its answer lost.
    pub cut_after: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    chunks: AtomicU64,
    delayed: AtomicU64,
    cut_before: AtomicU64,
    cut_after: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn snapshot(&self) -> FaultCounters {
        FaultCounters {
            connections: self.connections.load(Ordering::SeqCst),
            chunks: self.chunks.load(Ordering::SeqCst),
            delayed: self.delayed.load(Ordering::SeqCst),
            cut_before: self.cut_before.load(Ordering::SeqCst),
            cut_after: self.cut_after.load(Ordering::SeqCst),
        }
    }
}

/// A fault for exactly one chunk: see [`FaultProxy::fault_next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextFault {
    /// Close the connection without forwarding the chunk.
    CutBefore,
    /// Forward the chunk, then close the connection before the answer reaches the client.
    CutAfter,
    /// Hold the chunk this long, then forward it.
    Delay(Duration),
}

/// State shared by the handle, the accept loop and the connections.
struct Shared {
    upstream: SocketAddr,
    config: FaultConfig,
    /// A one-shot fault for the next chunk of any connection.
    next: std::sync::Mutex<Option<NextFault>>,
    enabled: AtomicBool,
    counters: Counters,
    /// Bumped by `cut_all`: every connection open at that moment closes.
    kill: watch::Sender<u64>,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    /// The proxy's own runtime, for [`FaultProxy::start_on_own_runtime`].
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on the current tokio runtime (panics outside one).
    ///
    /// The proxy's tasks run on that runtime: they stop when it does. A test that blocks
    /// its runtime's threads (waiting for child processes, say) should use
    /// [`FaultProxy::start_on_own_runtime`] instead.
    pub async fn start(upstream: SocketAddr, config: FaultConfig) -> FaultProxy {
        Self::start_on(&tokio::runtime::Handle::current(), upstream, config, None)
    }

    /// A proxy without random faults in front of a server on loopback port `port`
    /// (faults are then injected with [`FaultProxy::fault_next`]).
    pub async fn in_front_of(port: u16) -> FaultProxy {
        let upstream = SocketAddr::from(([127, 0, 0, 1], port));
        Self::start(upstream, FaultConfig::none()).await
    }

    /// Starts a proxy to `upstream` on a runtime of its own (one worker thread), shut down
    /// when the proxy is dropped. Works from synchronous tests and from inside any tokio
    /// runtime, and keeps forwarding whatever the caller's threads are doing.
    pub fn start_on_own_runtime(upstream: SocketAddr, config: FaultConfig) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("build the fault proxy's runtime");
        let handle = runtime.handle().clone();
        Self::start_on(&handle, upstream, config, Some(runtime))
    }

    fn start_on(
        handle: &tokio::runtime::Handle,
        upstream: SocketAddr,
        config: FaultConfig,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> FaultProxy {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy's port");
        listener
            .set_nonblocking(true)
            .expect("make the fault proxy's listener non-blocking");
        let addr = listener.local_addr().expect("fault proxy's local addr");
        let shared = Arc::new(Shared {
            upstream,
            config,
            next: std::sync::Mutex::new(None),
            enabled: AtomicBool::new(true),
            counters: Counters::default(),
            kill: watch::Sender::new(0),
        });
        let accept = handle.spawn(accept_loop(listener, Arc::clone(&shared)));
        FaultProxy {
            addr,
            shared,
            accept,
            runtime,
        }
    }

    /// Injects `fault` into the next client-to-server chunk of any connection, whether
    /// random faults are enabled or not (it is counted with its kind).
    pub fn fault_next(&self, fault: NextFault) {
        *self.shared.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
    }

    /// The proxy's address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The configuration the proxy was started with.
    pub fn config(&self) -> &FaultConfig {
        &self.shared.config
    }

    /// Turns faults on or off. While off, every chunk is forwarded at once (open
    /// connections keep working either way; a chunk already being delayed finishes its
    /// delay).
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.enabled.store(enabled, Ordering::SeqCst);
    }

    /// Whether faults are on.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::SeqCst)
    }

    /// Closes (both sides of) every connection open now. New connections are accepted
    /// as usual.
    pub fn cut_all(&self) {
        self.shared.kill.send_modify(|generation| *generation += 1);
    }

    /// The counters so far.
    pub fn counters(&self) -> FaultCounters {
        self.shared.counters.snapshot()
    }

    /// `url` with the upstream's `127.0.0.1:<port>` replaced by the proxy's, e.g.
    /// `redis://127.0.0.1:6379/0` -> `redis://127.0.0.1:<proxy port>/0`, or
    /// `postgresql://postgres@127.0.0.1:5432/postgres` likewise.
    ///
    /// Panics when `url` does not contain the upstream's `127.0.0.1:<port>`: a URL that
    /// silently bypassed the proxy would make a fault test vacuous.
    pub fn url_via(&self, url: &str) -> String {
        let needle = format!("127.0.0.1:{}", self.shared.upstream.port());
        let mut from = 0;
        while let Some(found) = url[from..].find(&needle) {
            let start = from + found;
            let end = start + needle.len();
            // `127.0.0.1:6379` must not match inside `127.0.0.1:63790`.
            if !url[end..].starts_with(|c: char| c.is_ascii_digit()) {
                return format!("{}127.0.0.1:{}{}", &url[..start], self.port(), &url[end..]);
            }
            from = end;
        }
        panic!(
            "url_via: {url:?} does not point at the proxy's upstream {}",
            self.shared.upstream
        );
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept loop owns the connections' `JoinSet`: aborting it aborts them all,
        // which drops (closes) their sockets.
        self.accept.abort();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(listener: std::net::TcpListener, shared: Arc<Shared>) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let mut connections = JoinSet::new();
    let mut number = 0u64;
    loop {
        tokio::select! {
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    // Subscribing marks the current generation seen: only a later
                    // `cut_all` closes this connection.
                    let kill = shared.kill.subscribe();
                    Counters::bump(&shared.counters.connections);
                    let rng = XorShift::new(shared.config.seed, number);
                    number += 1;
                    connections.spawn(connection(client, Arc::clone(&shared), kill, rng));
                }
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// How one direction of a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The sender closed its side; the close was passed on (half-close).
    Eof,
    /// The whole connection must close now: a cut, or an I/O error.
    Cut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Delay(Duration),
    CutBefore,
    CutAfter,
}

async fn connection(
    mut client: TcpStream,
    shared: Arc<Shared>,
    mut kill: watch::Receiver<u64>,
    mut rng: XorShift,
) {
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.upstream)).await;
    let Ok(Ok(mut upstream)) = upstream else {
        let _ = client.shutdown().await;
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        // Set by a `cut_after` before it forwards its chunk: from then on the server's
        // bytes may be that chunk's answer, which must not reach the client.
        let swallow = AtomicBool::new(false);
        let mut to_server = pin!(client_to_server(
            &mut client_read,
            &mut upstream_write,
            &shared,
            &mut rng,
            &swallow,
        ));
        let mut to_client = pin!(server_to_client(
            &mut upstream_read,
            &mut client_write,
            &swallow
        ));
        let (mut to_server_done, mut to_client_done) = (false, false);
        while !(to_server_done && to_client_done) {
            tokio::select! {
                // `changed` fails only once the sender is gone, which `shared` prevents.
                _ = kill.changed() => break,
                end = &mut to_server, if !to_server_done => match end {
                    End::Cut => break,
                    End::Eof => to_server_done = true,
                },
                end = &mut to_client, if !to_client_done => match end {
                    End::Cut => break,
                    End::Eof => to_client_done = true,
                },
            }
        }
    }
    // Close both sides: FIN now, then the sockets are dropped (a reset if unread data
    // remains, which the peer sees as a closed connection all the same).
    let _ = client.shutdown().await;
    let _ = upstream.shutdown().await;
}

async fn client_to_server(
    client: &mut ReadHalf<'_>,
    server: &mut WriteHalf<'_>,
    shared: &Shared,
    rng: &mut XorShift,
    swallow: &AtomicBool,
) -> End {
    let counters = &shared.counters;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match client.read(&mut buf).await {
            Ok(0) => {
                let _ = server.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
            Err(_) => return End::Cut,
        };
        Counters::bump(&counters.chunks);
        let next = shared.next.lock().unwrap_or_else(|e| e.into_inner()).take();
        let fault = match next {
            Some(NextFault::CutBefore) => Fault::CutBefore,
            Some(NextFault::CutAfter) => Fault::CutAfter,
            Some(NextFault::Delay(duration)) => Fault::Delay(duration),
            None if shared.enabled.load(Ordering::SeqCst) => shared.config.decide(rng),
            None => Fault::None,
        };
        match fault {
            Fault::None => {}
            Fault::Delay(duration) => {
                Counters::bump(&counters.delayed);
                tokio::time::sleep(duration).await;
            }
            Fault::CutBefore => {
                Counters::bump(&counters.cut_before);
                return End::Cut;
            }
            Fault::CutAfter => {
                Counters::bump(&counters.cut_after);
                swallow.store(true, Ordering::SeqCst);
                if server.write_all(&buf[..n]).await.is_ok() {
                    // The other direction ends the connection as soon as the answer
                    // starts; this is the deadline for a server that stays silent.
                    tokio::time::sleep(shared.config.cut_after_wait).await;
                }
                return End::Cut;
            }
        }
        if server.write_all(&buf[..n]).await.is_err() {
            return End::Cut;
        }
    }
}

async fn server_to_client(
    server: &mut ReadHalf<'_>,
    client: &mut WriteHalf<'_>,
    swallow: &AtomicBool,
) -> End {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match server.read(&mut buf).await {
            Ok(0) => {
                if swallow.load(Ordering::SeqCst) {
                    return End::Cut;
                }
                let _ = client.shutdown().await;
                return End::Eof;
            }
            Ok(n) => {
                // Bytes read after a `cut_after` forwarded its chunk may be its answer:
                // the connection ends without passing them on.
                if swallow.load(Ordering::SeqCst) {
                    return End::Cut;
                }
                if client.write_all(&buf[..n]).await.is_err() {
                    return End::Cut;
                }
            }
            Err(_) => return End::Cut,
        }
    }
}

/// xorshift64*, seeded through splitmix64.
#[derive(Clone, Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64, stream: u64) -> Self {
        let mut z = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // xorshift's state must not be zero.
        Self(if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

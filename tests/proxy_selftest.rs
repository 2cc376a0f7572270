//! The fault proxy (`tests/support/proxy.rs`) against a tiny line server: `<line>\n` in,
//! `ok:<line>\n` out. No Redis or PostgreSQL needed.

#[path = "support/proxy.rs"]
mod proxy;

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proxy::{FaultConfig, FaultCounters, FaultProxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Starts the line server on the current runtime; returns its address and the number of
/// requests (lines) it has received.
async fn start_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    if write
                        .write_all(format!("ok:{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, received)
}

struct Client(BufReader<TcpStream>);

impl Client {
    async fn connect(proxy: &FaultProxy) -> Client {
        Client(BufReader::new(
            TcpStream::connect(proxy.addr()).await.unwrap(),
        ))
    }

    /// Sends `line` and reads the answer; `None` when the connection closed (EOF or
    /// reset) instead.
    async fn request(&mut self, line: &str) -> Option<String> {
        self.send(line).await?;
        self.answer().await
    }

    async fn send(&mut self, line: &str) -> Option<()> {
        self.0
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .ok()
    }

    async fn answer(&mut self) -> Option<String> {
        let mut answer = String::new();
        let read = tokio::time::timeout(Duration::from_secs(3), self.0.read_line(&mut answer))
            .await
            .expect("the proxy neither answered nor closed within 3 s");
        match read {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(answer.trim_end().to_owned()),
        }
    }
}

/// Waits (up to 2 s) for the server to have received `expected` requests.
async fn wait_received(received: &AtomicUsize, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::SeqCst) != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(received.load(Ordering::SeqCst), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_faults_forward_everything() {
    let (server, received) = start_server().await;
    let config = FaultConfig {
        cut_before: 1.0,
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(server, config).await;
    proxy.set_enabled(false);
    let mut client = Client::connect(&proxy).await;
    for i in 0..100 {
        assert_eq!(
            client.request(&format!("req-{i}")).await.as_deref(),
            Some(format!("ok:req-{i}").as_str())
        );
    }
    assert_eq!(received.load(Ordering::SeqCst), 100);
    assert_eq!(
        proxy.counters(),
        FaultCounters {
            connections: 1,
            chunks: 100,
            ..FaultCounters::default()
        }
    );

    // Enabled again, on the same connection: the next request is cut.
    proxy.set_enabled(true);
    assert_eq!(client.request("late").await, None);
    assert_eq!(proxy.counters().cut_before, 1);
    assert_eq!(received.load(Ordering::SeqCst), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_delivers_the_request_and_loses_the_answer() {
    let (server, received) = start_server().await;
    let config = FaultConfig {
        cut_after: 1.0,
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(server, config).await;
    let mut client = Client::connect(&proxy).await;
    assert_eq!(client.request("write").await, None);
    wait_received(&received, 1).await;
    assert_eq!(
        proxy.counters(),
        FaultCounters {
            connections: 1,
            chunks: 1,
            cut_after: 1,
            ..FaultCounters::default()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_before_never_delivers_the_request() {
    let (server, received) = start_server().await;
    let config = FaultConfig {
        cut_before: 1.0,
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(server, config).await;
    let mut client = Client::connect(&proxy).await;
    assert_eq!(client.request("write").await, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(received.load(Ordering::SeqCst), 0);
    assert_eq!(
        proxy.counters(),
        FaultCounters {
            connections: 1,
            chunks: 1,
            cut_before: 1,
            ..FaultCounters::default()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_holds_the_request() {
    let (server, _) = start_server().await;
    let config = FaultConfig {
        delay: 1.0,
        delay_range: Duration::from_millis(300)..Duration::from_millis(400),
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(server, config).await;
    let mut client = Client::connect(&proxy).await;
    let started = Instant::now();
    assert_eq!(client.request("slow").await.as_deref(), Some("ok:slow"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        proxy.counters(),
        FaultCounters {
            connections: 1,
            chunks: 1,
            delayed: 1,
            ..FaultCounters::default()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_keep_the_order() {
    let (server, _) = start_server().await;
    let config = FaultConfig {
        delay: 1.0,
        delay_range: Duration::from_millis(10)..Duration::from_millis(60),
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(server, config).await;
    let mut client = Client::connect(&proxy).await;
    // Separate writes, so that (most likely) separate chunks with separate delays.
    for i in 0..10 {
        client.send(&format!("p{i}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for i in 0..10 {
        assert_eq!(client.answer().await, Some(format!("ok:p{i}")));
    }
    let counters = proxy.counters();
    assert!(counters.chunks >= 1);
    assert_eq!(counters.delayed, counters.chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_are_counted() {
    let (server, received) = start_server().await;
    let config = FaultConfig {
        delay: 0.25,
        cut_before: 0.25,
        cut_after: 0.25,
        delay_range: Duration::from_millis(1)..Duration::from_millis(5),
        cut_after_wait: Duration::from_millis(200),
        seed: 42,
    };
    let proxy = FaultProxy::start(server, config).await;
    const CONNECTIONS: usize = 40;
    let mut answered = 0;
    for i in 0..CONNECTIONS {
        let mut client = Client::connect(&proxy).await;
        if let Some(answer) = client.request(&format!("m{i}")).await {
            assert_eq!(answer, format!("ok:m{i}"));
            answered += 1;
        }
    }
    let counters = proxy.counters();
    assert_eq!(counters.connections, CONNECTIONS as u64);
    assert_eq!(counters.chunks, CONNECTIONS as u64);
    assert!(counters.delayed > 0, "{counters:?}");
    assert!(counters.cut_before > 0, "{counters:?}");
    assert!(counters.cut_after > 0, "{counters:?}");
    assert_eq!(
        answered as u64,
        counters.chunks - counters.cut_before - counters.cut_after,
        "{counters:?}"
    );
    // Answered and cut-after requests reached the server; cut-before ones did not.
    wait_received(&received, answered + counters.cut_after as usize).await;

    // The same seed makes the same decisions.
    let (server, _) = start_server().await;
    let again = FaultProxy::start(server, proxy.config().clone()).await;
    for i in 0..CONNECTIONS {
        let mut client = Client::connect(&again).await;
        let _ = client.request(&format!("m{i}")).await;
    }
    assert_eq!(again.counters(), counters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_all_closes_open_connections() {
    let (server, _) = start_server().await;
    let proxy = FaultProxy::start(server, FaultConfig::none()).await;
    let mut idle = Client::connect(&proxy).await;
    assert_eq!(idle.request("a").await.as_deref(), Some("ok:a"));
    proxy.cut_all();
    // Idle: nothing sent, the close alone ends the read.
    assert_eq!(idle.answer().await, None);
    // New connections work as usual.
    let mut fresh = Client::connect(&proxy).await;
    assert_eq!(fresh.request("b").await.as_deref(), Some("ok:b"));
    assert_eq!(proxy.counters().connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_connections() {
    let (server, _) = start_server().await;
    let proxy = FaultProxy::start(server, FaultConfig::none()).await;
    let addr = proxy.addr();
    let mut client = Client::connect(&proxy).await;
    assert_eq!(client.request("a").await.as_deref(), Some("ok:a"));
    drop(proxy);
    assert_eq!(client.answer().await, None);
    // Nobody listens any more.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

/// A synchronous test (as a parent of child processes would be): the proxy runs on its
/// own runtime, the client is a blocking std socket.
#[test]
fn own_runtime_serves_blocking_clients() {
    let server_runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, received) = server_runtime.block_on(start_server());
    let proxy = FaultProxy::start_on_own_runtime(server, FaultConfig::none());
    let stream = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut answer = String::new();
    for i in 0..10 {
        writer.write_all(format!("s{i}\n").as_bytes()).unwrap();
        answer.clear();
        reader.read_line(&mut answer).unwrap();
        assert_eq!(answer, format!("ok:s{i}\n"));
    }
    assert_eq!(received.load(Ordering::SeqCst), 10);
    drop(proxy);
    answer.clear();
    let closed = matches!(reader.read_line(&mut answer), Ok(0) | Err(_));
    assert!(closed, "read {answer:?} after the proxy was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_via_points_at_the_proxy() {
    let (server, _) = start_server().await;
    let proxy = FaultProxy::start(server, FaultConfig::none()).await;
    let (up, port) = (server.port(), proxy.port());
    assert_eq!(
        proxy.url_via(&format!("redis://127.0.0.1:{up}/0")),
        format!("redis://127.0.0.1:{port}/0")
    );
    assert_eq!(
        proxy.url_via(&format!("postgresql://postgres@127.0.0.1:{up}/postgres")),
        format!("postgresql://postgres@127.0.0.1:{port}/postgres")
    );
    // Only the upstream's port, not one it prefixes.
    let longer = format!("redis://127.0.0.1:{up}0/0");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| proxy.url_via(&longer)));
    assert!(result.is_err());
}

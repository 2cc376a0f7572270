//! [`TokenStore::watch`](crate::TokenStore::watch) for [`PostgresStore`](super::PostgresStore):
//! every save runs `pg_notify` in its own statement (so the notification is sent when,
//! and only if, the save commits), and a watch `LISTEN`s on a connection of its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::Change;

/// What a watch needs to open its own connection: the pool's configuration.
#[derive(Clone)]
pub(super) struct Listener {
    pub(super) pg: tokio_postgres::Config,
    pub(super) tls: Option<MakeRustlsConnect>,
    /// Where, without credentials, for logs.
    pub(super) target: String,
}

/// The channel the saves of `table` are announced on: `tokenkeeper_saved`, with an FNV-1a
/// hash of the table name for another table (channel names are at most 63 bytes).
pub(super) fn channel(table: &str) -> String {
    if table == super::DEFAULT_TABLE {
        return "tokenkeeper_saved".into();
    }
    let hash = table.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("tokenkeeper_saved_{hash:08x}")
}

/// The longest a watch's connection attempt (with its `LISTEN`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The watch's task: connects, `LISTEN`s on `channel`, forwards each `"<version> <key>"`
/// as a save, and connects again after a loss (100 ms doubling to 5 s), with a resync
/// each time it listens; ends when the watch is dropped.
pub(super) async fn listen(listener: Arc<Listener>, channel: String, sender: mpsc::Sender<Change>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            () = sender.closed() => return,
            // Bounded: a connection the network swallows must not stop the watch for good.
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connect(&listener, &channel)) => connected,
        };
        let (client, mut notifications) = match connected {
            Ok(Ok(connected)) => connected,
            Err(_) => {
                tracing::debug!(target = %listener.target, "listening for saves timed out; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
            Ok(Err(e)) => {
                tracing::debug!(target = %listener.target, error = %e, "cannot listen for saves; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        // Whatever was saved before this LISTEN, or while there was none.
        if sender.send(Change::Resync).await.is_err() {
            return;
        }
        loop {
            let payload = tokio::select! {
                () = sender.closed() => return,
                payload = notifications.recv() => payload,
            };
            let Some(payload) = payload else {
                tracing::debug!(target = %listener.target, "the connection listening for saves was lost; connecting again");
                break;
            };
            let Some(saved) = crate::store::saved_from_announcement(&payload) else {
                continue;
            };
            if sender.send(saved).await.is_err() {
                return;
            }
        }
        drop(client);
    }
}

/// A connection listening on `channel`, and the payloads of its notifications (the
/// receiver ends with the connection).
async fn connect(
    listener: &Listener,
    channel: &str,
) -> Result<(tokio_postgres::Client, mpsc::Receiver<String>), tokio_postgres::Error> {
    let (sender, receiver) = mpsc::channel(1024);
    let client = match &listener.tls {
        Some(tls) => {
            let (client, connection) = listener.pg.connect(tls.clone()).await?;
            tokio::spawn(drive(connection, sender));
            client
        }
        None => {
            let (client, connection) = listener.pg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(drive(connection, sender));
            client
        }
    };
    // The channel name is ours (see `channel`): quoting it is enough.
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    Ok((client, receiver))
}

/// Drives a connection, forwarding its notifications' payloads, until it ends (or
/// nobody listens any more).
async fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>, sender: mpsc::Sender<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
        match message {
            Some(Ok(AsyncMessage::Notification(notification))) => {
                if sender
                    .send(notification.payload().to_owned())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

//! DNS over TCP (RFC 7766) for the guest: 2-byte length-prefixed messages, several per
//! connection, pipelined queries answered concurrently and replied to in order.
//!
//! # Design
//! The connection is split: a reader takes queries and spawns one answer task each (at most
//! [`MAX_TCP_PIPELINE`] in flight, then it stops reading: back-pressure on the guest), a
//! writer awaits them in arrival order and writes the replies. The reader stops after
//! [`MAX_TCP_QUERIES`] queries, after [`TCP_IDLE_TIMEOUT`] without a complete query, on EOF,
//! on a zero length, and the writer stops at the first query that gets no reply (garbage):
//! the replies already due are written and the connection is closed. Answer tasks are
//! aborted when the connection goes away, so a dropped connection never leaves work behind.
//!
//! # Limitations
//! A query may be up to 65535 bytes (the prefix's limit) although real ones are tiny; the
//! memory a connection can hold is bounded by the pipeline depth times that.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{chain, DnsResolver, Transport};

/// How long a connection may wait for its next complete query (or a reply write may block).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queries answered on one connection; then it is closed.
pub const MAX_TCP_QUERIES: usize = 256;
/// Most queries in flight on one connection.
pub const MAX_TCP_PIPELINE: usize = 16;

/// Why a DNS-over-TCP connection stopped early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("reading a query length")]
    ReadLength(#[source] std::io::Error),
    #[error("reading a query of {len} bytes")]
    ReadQuery {
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("zero-length query")]
    EmptyQuery,
    #[error("no complete query within {0:?}")]
    Idle(Duration),
}

/// An answer task, aborted when dropped (connection gone).
struct Pending(JoinHandle<Option<Vec<u8>>>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves DNS over TCP on `stream` until the client is done (see the module docs).
pub async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(stream: S, resolver: Arc<DnsResolver>) {
    serve_tcp_with(stream, resolver, |_| {}).await;
}

/// [`serve_tcp`], calling `on_reply` with each reply just before it is written to the
/// client (the stack records the addresses it answered, as for UDP).
pub async fn serve_tcp_with<S, F>(stream: S, resolver: Arc<DnsResolver>, on_reply: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(&[u8]),
{
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(MAX_TCP_PIPELINE);
    let reader = read_queries(rd, resolver, tx);
    let writer = write_replies(wr, rx, on_reply);
    tokio::pin!(reader, writer);
    tokio::select! {
        () = &mut writer => {}
        () = &mut reader => writer.await,
    }
}

/// One length-prefixed message; `None` on EOF at a message boundary.
async fn read_message<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Option<Vec<u8>>, ConnError> {
    let mut len = [0u8; 2];
    if rd
        .read(&mut len[..1])
        .await
        .map_err(ConnError::ReadLength)?
        == 0
    {
        return Ok(None);
    }
    rd.read_exact(&mut len[1..])
        .await
        .map_err(ConnError::ReadLength)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 {
        return Err(ConnError::EmptyQuery);
    }
    let mut msg = vec![0; len];
    rd.read_exact(&mut msg)
        .await
        .map_err(|source| ConnError::ReadQuery { len, source })?;
    Ok(Some(msg))
}

async fn read_queries<R: AsyncRead + Unpin>(
    mut rd: R,
    resolver: Arc<DnsResolver>,
    tx: mpsc::Sender<Pending>,
) {
    for _ in 0..MAX_TCP_QUERIES {
        let next = tokio::time::timeout(TCP_IDLE_TIMEOUT, read_message(&mut rd)).await;
        let query = match next.unwrap_or(Err(ConnError::Idle(TCP_IDLE_TIMEOUT))) {
            Ok(Some(q)) => q,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %chain(&e), "DNS over TCP: closing the connection");
                return;
            }
        };
        let r = resolver.clone();
        let task = tokio::spawn(async move { r.answer(&query, Transport::Tcp).await });
        if tx.send(Pending(task)).await.is_err() {
            return;
        }
    }
    tracing::debug!(
        max = MAX_TCP_QUERIES,
        "DNS over TCP: query limit reached, closing"
    );
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Pending>,
    mut on_reply: impl FnMut(&[u8]),
) {
    while let Some(mut pending) = rx.recv().await {
        let Ok(Some(reply)) = (&mut pending.0).await else {
            break;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            break;
        };
        on_reply(&reply);
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        let write = async {
            wr.write_all(&framed).await?;
            wr.flush().await
        };
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "DNS over TCP: writing a reply failed");
                break;
            }
            Err(_) => {
                tracing::debug!("DNS over TCP: the client stopped reading");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(TCP_IDLE_TIMEOUT, wr.shutdown()).await;
}

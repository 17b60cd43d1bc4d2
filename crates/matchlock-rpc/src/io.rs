//! Adapters between exec sessions and the JSON-RPC stream: output captured in memory or
//! turned into notifications, and stdin fed from client notifications.
//!
//! # Design
//! [`Notify`] emits one `<method>` notification per output chunk, in order, on the same
//! channel as responses, so every chunk is written before the final result. [`Capture`]
//! bounds buffered output ([`MAX_CAPTURE`]) instead of growing without limit. [`ChanReader`]
//! presents the ordered `*.stdin` / `*.stdin_eof` notifications as an `AsyncRead`.
//!
//! # Limitations
//! The output channel is unbounded: a client that stops reading stdout makes the server
//! buffer notifications in memory (the guest is not back-pressured).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use matchlock_api::rpc::{b64, envelope, to_value, Notice, StreamData};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Largest buffered (`exec`) output per stream.
pub const MAX_CAPTURE: usize = 64 << 20;

/// Collects output in memory, failing writes beyond [`MAX_CAPTURE`].
#[derive(Clone, Default)]
pub struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    overflow: Arc<std::sync::atomic::AtomicBool>,
}

impl Capture {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn overflowed(&self) -> bool {
        self.overflow.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() + data.len() > MAX_CAPTURE {
            self.overflow
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::other("output limit reached")));
        }
        b.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Turns each write into a `{"id", "data"}` notification.
pub struct Notify {
    pub out: mpsc::UnboundedSender<String>,
    pub notice: Notice,
    pub id: Value,
}

impl AsyncWrite for Notify {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let params = StreamData {
            id: self.id.clone(),
            data: b64::encode(data),
        };
        let line = envelope::notification(self.notice, to_value(&params));
        match self.out.send(line) {
            Ok(()) => Poll::Ready(Ok(data.len())),
            Err(_) => Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe))),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One client stdin event.
#[derive(Debug)]
pub enum Input {
    Data(Vec<u8>),
    Eof,
}

/// Reads the stdin notifications routed to one exec; EOF on `Eof` or when the route closes.
pub struct ChanReader {
    rx: mpsc::Receiver<Input>,
    pending: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChanReader {
    pub fn new(rx: mpsc::Receiver<Input>) -> Self {
        ChanReader {
            rx,
            pending: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl AsyncRead for ChanReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.pending.len() {
                let n = out.remaining().min(self.pending.len() - self.pos);
                let start = self.pos;
                out.put_slice(&self.pending[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Input::Data(d))) => {
                    self.pending = d;
                    self.pos = 0;
                }
                Poll::Ready(Some(Input::Eof)) | Poll::Ready(None) => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn chan_reader_orders_and_ends() {
        let (tx, rx) = mpsc::channel(4);
        let mut r = ChanReader::new(rx);
        tx.send(Input::Data(b"ab".to_vec())).await.expect("s");
        tx.send(Input::Data(b"c".to_vec())).await.expect("s");
        tx.send(Input::Eof).await.expect("s");
        tx.send(Input::Data(b"ignored".to_vec())).await.expect("s");
        let mut s = String::new();
        r.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "abc");
    }

    #[tokio::test]
    async fn notify_and_capture() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut n = Notify {
            out: tx,
            notice: Notice::ExecStreamStdout,
            id: serde_json::json!(4),
        };
        n.write_all(b"hi").await.expect("w");
        assert_eq!(
            rx.recv().await.expect("line"),
            r#"{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"data":"aGk=","id":4}}"#
        );
        let mut c = Capture::default();
        c.write_all(b"x").await.expect("w");
        assert_eq!(c.take(), b"x");
        assert!(!c.overflowed());
    }
}

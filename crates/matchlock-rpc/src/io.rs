//! Adapters between exec sessions and the JSON-RPC stream: output captured in memory or
//! turned into notifications, and stdin fed from client notifications.
//!
//! # Design
//! - [`Notify`] emits one `<method>` notification per output chunk (at most
//!   [`NOTIFY_CHUNK`] bytes) into the server's bounded output channel (see `server`). While
//!   the channel is full (the client reads slowly) its `poll_write` is `Pending`, so the exec
//!   reads no more frames from the guest, the guest's pipe fills and the command blocks:
//!   back-pressure from the client to the command, with host memory bounded. Chunks and the
//!   request's final answer go through the same channel, so every chunk is written first.
//! - [`Capture`] buffers `exec` output against the sandbox's one [`Budget`]
//!   ([`CAPTURE_BUDGET`]), shared by all concurrent requests: a [`Hold`] keeps the bytes
//!   reserved until the answer carrying them has been written to stdout (not merely built),
//!   so requests waiting for a slow client cannot pile up outside the budget.
//! - [`ChanReader`] presents the ordered `*.stdin` / `*.stdin_eof` notifications as an
//!   `AsyncRead`. The server's reader must never wait on it (that would stop `cancel` and
//!   `close` being read), so the queue is unbounded but accounted in a [`Backlog`]: past
//!   [`MAX_STDIN_BACKLOG`] bytes not yet taken by the guest, the exec is stopped and fails
//!   with an error naming the limit.
//!
//! # Limitations
//! JSON-RPC has no flow control for client input: a client that sends stdin much faster
//! than the command consumes it hits [`MAX_STDIN_BACKLOG`] (pace the input, or write bulk
//! data with `write_file`). Peak memory while a captured answer is encoded is about three
//! times the captured bytes (raw, base64, the JSON line).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use matchlock_api::rpc::{b64, envelope, to_value, Notice, StreamData};
use matchlock_guest_proto::CHUNK;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};

/// Captured (`exec`) output the sandbox holds at once, over all its requests.
pub const CAPTURE_BUDGET: usize = 64 << 20;
/// Largest output chunk carried by one notification.
pub const NOTIFY_CHUNK: usize = CHUNK;
/// Client stdin queued for one exec that the guest has not taken yet.
pub const MAX_STDIN_BACKLOG: usize = 16 << 20;
/// Bytes charged per queued stdin event on top of its data (the allocation itself), so
/// floods of tiny events are bounded too.
const EVENT_COST: usize = 64;

/// One line for the client, with what must stay reserved until it is written.
pub struct OutLine {
    pub text: String,
    pub hold: Option<Hold>,
}

impl From<String> for OutLine {
    fn from(text: String) -> Self {
        OutLine { text, hold: None }
    }
}

/// A byte budget shared by several holders.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Hold {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Hold {
    pub fn new(budget: &Arc<Budget>) -> Hold {
        Hold {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Takes `n` more bytes; false (nothing taken) if the budget cannot cover them.
    fn grow(&mut self, n: usize) -> bool {
        let ok = self.budget.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }

    /// Adds `other`'s bytes to this hold.
    pub fn absorb(&mut self, mut other: Hold) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

struct Captured {
    buf: Vec<u8>,
    hold: Hold,
    overflow: bool,
}

/// Collects output in memory against a shared [`Budget`]; a write the budget cannot cover
/// fails (which ends the command).
#[derive(Clone)]
pub struct Capture {
    inner: Arc<Mutex<Captured>>,
}

impl Capture {
    pub fn new(budget: &Arc<Budget>) -> Capture {
        Capture {
            inner: Arc::new(Mutex::new(Captured {
                buf: Vec::new(),
                hold: Hold::new(budget),
                overflow: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The captured bytes and their reservation (release it once they are delivered).
    pub fn finish(&self) -> (Vec<u8>, Hold) {
        let mut c = self.lock();
        let budget = c.hold.budget.clone();
        let hold = std::mem::replace(&mut c.hold, Hold::new(&budget));
        (std::mem::take(&mut c.buf), hold)
    }

    pub fn overflowed(&self) -> bool {
        self.lock().overflow
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut c = self.lock();
        if !c.hold.grow(data.len()) {
            c.overflow = true;
            return Poll::Ready(Err(io::Error::other("capture budget exhausted")));
        }
        c.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Turns each write into a `{"id", "data"}` notification on the bounded output channel;
/// `Pending` while the channel is full.
pub struct Notify {
    tx: PollSender<OutLine>,
    notice: Notice,
    id: Value,
}

impl Notify {
    pub fn new(tx: mpsc::Sender<OutLine>, notice: Notice, id: Value) -> Notify {
        Notify {
            tx: PollSender::new(tx),
            notice,
            id,
        }
    }
}

impl AsyncWrite for Notify {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)));
        }
        let n = data.len().min(NOTIFY_CHUNK);
        let params = StreamData {
            id: this.id.clone(),
            data: b64::encode(&data[..n]),
        };
        let line = envelope::notification(this.notice, to_value(&params));
        match this.tx.send_item(OutLine::from(line)) {
            Ok(()) => Poll::Ready(Ok(n)),
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

/// Stdin queued for one exec and not yet taken by the guest; past [`MAX_STDIN_BACKLOG`]
/// the exec is stopped.
#[derive(Debug)]
pub struct Backlog {
    queued: AtomicUsize,
    overflow: AtomicBool,
    limit: usize,
    /// Stops the exec when the backlog overflows.
    stop: CancellationToken,
}

impl Backlog {
    pub fn new(limit: usize, stop: CancellationToken) -> Arc<Backlog> {
        Arc::new(Backlog {
            queued: AtomicUsize::new(0),
            overflow: AtomicBool::new(false),
            limit,
            stop,
        })
    }

    /// Accounts one more event of `len` bytes; false (and the exec stopped) past the limit.
    pub fn push(&self, len: usize) -> bool {
        let n = len.saturating_add(EVENT_COST);
        let ok = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                q.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok();
        if !ok {
            self.overflow.store(true, Ordering::SeqCst);
            self.stop.cancel();
        }
        ok
    }

    fn pop(&self, len: usize) {
        self.queued
            .fetch_sub(len.saturating_add(EVENT_COST), Ordering::SeqCst);
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::SeqCst)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// One client stdin event.
#[derive(Debug)]
pub enum Input {
    Data(Vec<u8>),
    Eof,
}

/// Reads the stdin notifications routed to one exec; EOF on `Eof` or when the route closes.
/// Every event taken off the queue is released from the [`Backlog`].
pub struct ChanReader {
    rx: mpsc::UnboundedReceiver<Input>,
    backlog: Arc<Backlog>,
    pending: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChanReader {
    pub fn new(rx: mpsc::UnboundedReceiver<Input>, backlog: Arc<Backlog>) -> Self {
        ChanReader {
            rx,
            backlog,
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
                    self.backlog.pop(d.len());
                    self.pending = d;
                    self.pos = 0;
                }
                Poll::Ready(Some(Input::Eof)) => {
                    self.backlog.pop(0);
                    self.done = true;
                }
                Poll::Ready(None) => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn chan_reader_orders_ends_and_releases_the_backlog() {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Backlog::new(1 << 20, CancellationToken::new());
        let mut r = ChanReader::new(rx, backlog.clone());
        for e in [
            Input::Data(b"ab".to_vec()),
            Input::Data(b"c".to_vec()),
            Input::Eof,
        ] {
            let len = match &e {
                Input::Data(d) => d.len(),
                Input::Eof => 0,
            };
            assert!(backlog.push(len));
            tx.send(e).expect("s");
        }
        assert_eq!(backlog.queued(), 3 + 3 * EVENT_COST);
        tx.send(Input::Data(b"ignored".to_vec())).expect("s");
        let mut s = String::new();
        r.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "abc");
        assert_eq!(backlog.queued(), 0);
    }

    #[test]
    fn backlog_overflow_stops_the_exec() {
        let stop = CancellationToken::new();
        let b = Backlog::new(1000, stop.clone());
        assert!(b.push(900));
        assert!(!b.push(100));
        assert!(b.overflowed());
        assert!(stop.is_cancelled());
        assert_eq!(b.queued(), 900 + EVENT_COST);
    }

    #[tokio::test]
    async fn notify_waits_for_room_and_splits_chunks() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut n = Notify::new(tx, Notice::ExecStreamStdout, serde_json::json!(4));
        n.write_all(b"hi").await.expect("w");
        assert_eq!(
            rx.recv().await.expect("line").text,
            r#"{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"data":"aGk=","id":4}}"#
        );
        // Two chunks' worth: the first fills the channel, the second waits for room.
        let big = vec![1u8; NOTIFY_CHUNK + 1];
        let w = tokio::spawn(async move { n.write_all(&big).await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!w.is_finished(), "wrote past a full channel");
        let a = rx.recv().await.expect("first");
        let b = rx.recv().await.expect("second");
        w.await.expect("join").expect("write");
        assert!(a.text.len() > b.text.len());
    }

    #[tokio::test]
    async fn captures_share_one_budget_until_released() {
        let budget = Budget::new(10);
        let mut a = Capture::new(&budget);
        let mut b = Capture::new(&budget);
        a.write_all(b"123456").await.expect("w");
        assert!(b.write_all(b"12345").await.is_err());
        assert!(b.overflowed() && !a.overflowed());
        let (bytes, hold) = a.finish();
        assert_eq!(bytes, b"123456");
        drop(a);
        // Still held until the answer is delivered.
        assert_eq!(budget.used(), 6);
        drop(hold);
        assert_eq!(budget.used(), 0);
        let mut c = Capture::new(&budget);
        c.write_all(b"1234567890").await.expect("fits again");
        drop(c);
        assert_eq!(budget.used(), 0);
    }
}

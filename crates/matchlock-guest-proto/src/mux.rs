//! Stream multiplexing over one byte channel (the virtio-serial host channel).
//!
//! A virtio-serial port is one byte stream, while the protocol above it (see the crate docs)
//! is connection-per-request, like vsock. [`Mux`] carries many logical streams over one
//! channel and surfaces each as one end of a `UnixStream::pair()`, so the code above sees
//! ordinary streams on both sides.
//!
//! # Design
//! - Frames: a 9-byte header (stream id u32 BE, kind u8, payload length u32 BE) and at most
//!   [`MUX_MAX_PAYLOAD`] bytes. Kinds: `Open(port)`, `OpenOk`, `Data`, `Eof` (half-close),
//!   `Close` (reset), `Credit(bytes)`. A frame the decoder cannot trust (unknown kind,
//!   oversized, control payload of the wrong size) ends the whole channel: there is no way to
//!   resynchronise a byte stream.
//! - Ids: the host opens odd ids, the guest even ones, so both may open at once.
//! - **Per-stream credit flow control**: each side may have at most [`MUX_WINDOW`] bytes of a
//!   stream in flight toward the other; the receiver queues them in memory (never blocking
//!   its reader on a slow local consumer) and returns credit as its local consumer drains
//!   them. A stalled reader therefore stalls only its own stream. A peer that sends beyond
//!   its credit, returns more credit than it was owed, or opens more than
//!   [`MUX_MAX_PEER_STREAMS`] streams gets that stream reset and a logged warning; memory per
//!   stream is bounded by the window.
//! - Threads: one reader per channel session; per stream one job pumping the local end
//!   into `Data` frames and one writing queued data into the local end, each on its own
//!   thread: a new one by default, or one the caller's [`Spawner`] provides (the guest
//!   agent reuses parked threads, since under TCG every thread start is emulated work).
//!   Frames are written whole under one lock.
//! - Sessions: [`Mux::run_session`] serves one connection of the channel until it ends; a
//!   [`Mux`] outlives it (the guest keeps its port open and serves the next host connection:
//!   a restored VM's host reconnects).
//!
//! # Limitations
//! Streams do not survive the end of a session (they are reset). The window is fixed (no
//! tuning by bandwidth-delay product; the channel is local).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Header bytes: stream id (4), kind (1), payload length (4).
pub const MUX_HEADER: usize = 9;
/// Largest payload of one mux frame.
pub const MUX_MAX_PAYLOAD: usize = 32 * 1024;
/// Bytes of one stream that may be in flight in one direction (the initial credit).
pub const MUX_WINDOW: u32 = 256 * 1024;
/// Streams the peer may have open toward us at once; more are refused (reset).
pub const MUX_MAX_PEER_STREAMS: usize = 256;
/// Name of the virtio-serial port that carries the channel (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "matchlock.0";

/// What a mux frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxKind {
    /// Opens stream `id` to `port` (payload: port, u32 BE).
    Open = 1,
    /// The stream was accepted.
    OpenOk = 2,
    /// Stream bytes.
    Data = 3,
    /// The sender will send no more data (half-close).
    Eof = 4,
    /// The stream is gone in both directions (reset, or refusal of an `Open`).
    Close = 5,
    /// The receiver drained that many bytes (payload: u32 BE).
    Credit = 6,
}

impl MuxKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Open,
            2 => Self::OpenOk,
            3 => Self::Data,
            4 => Self::Eof,
            5 => Self::Close,
            6 => Self::Credit,
            _ => return None,
        })
    }
}

/// One mux frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxFrame {
    pub id: u32,
    pub kind: MuxKind,
    pub payload: Vec<u8>,
}

impl MuxFrame {
    fn control(id: u32, kind: MuxKind) -> Self {
        Self {
            id,
            kind,
            payload: Vec::new(),
        }
    }
    fn with_u32(id: u32, kind: MuxKind, v: u32) -> Self {
        Self {
            id,
            kind,
            payload: v.to_be_bytes().to_vec(),
        }
    }
    /// The u32 argument of `Open` and `Credit`.
    fn arg(&self) -> u32 {
        match self.payload.get(..4) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    /// Header and payload as written on the channel.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(MUX_HEADER + self.payload.len());
        buf.extend_from_slice(&self.id.to_be_bytes());
        buf.push(self.kind as u8);
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&self.payload);
        buf
    }
}

/// Errors of the mux channel.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("read a mux frame")]
    Read(#[source] io::Error),
    #[error("channel ended inside a mux frame")]
    Truncated,
    #[error("unknown mux frame kind {0}")]
    UnknownKind(u8),
    #[error("mux frame of {len} bytes exceeds the limit of {MUX_MAX_PAYLOAD}")]
    TooLarge { len: u32 },
    #[error("mux {kind:?} frame with a {len}-byte payload")]
    BadControl { kind: MuxKind, len: usize },
    #[error("write a mux frame")]
    Write(#[source] io::Error),
    #[error("no channel session")]
    NotConnected,
}

/// Reads one frame; `Ok(None)` on a clean end of the channel between frames.
pub fn read_mux_frame<R: Read>(r: &mut R) -> Result<Option<MuxFrame>, MuxError> {
    let mut header = [0u8; MUX_HEADER];
    let mut got = 0;
    while got < MUX_HEADER {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(MuxError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MuxError::Read(e)),
        }
    }
    let id = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let kind = MuxKind::from_u8(header[4]).ok_or(MuxError::UnknownKind(header[4]))?;
    let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    let size = usize::try_from(len).map_err(|_| MuxError::TooLarge { len })?;
    if size > MUX_MAX_PAYLOAD {
        return Err(MuxError::TooLarge { len });
    }
    let want = match kind {
        MuxKind::Open | MuxKind::Credit => Some(4),
        MuxKind::OpenOk | MuxKind::Eof | MuxKind::Close => Some(0),
        MuxKind::Data => None,
    };
    if want.is_some_and(|w| w != size) {
        return Err(MuxError::BadControl { kind, len: size });
    }
    let mut payload = vec![0u8; size];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => MuxError::Truncated,
        _ => MuxError::Read(e),
    })?;
    Ok(Some(MuxFrame { id, kind, payload }))
}

/// Which end of the channel this is; decides the parity of the ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxRole {
    /// Opens odd ids.
    Host,
    /// Opens even ids.
    Guest,
}

impl MuxRole {
    fn first_id(self) -> u32 {
        match self {
            Self::Host => 1,
            Self::Guest => 2,
        }
    }
    fn owns(self, id: u32) -> bool {
        (id % 2 == 1) == (self == Self::Host)
    }
}

/// Called for a peer's `Open(port)` on a port nobody [`Mux::listen`]s on: returns the local
/// stream to connect it to, or `None` to refuse.
pub type Connector = Box<dyn Fn(u32) -> Option<UnixStream> + Send + Sync>;

/// Runs a stream's pump job (`name` for a new thread) on a thread of its own: a new one or
/// a reused one, but never queued behind another job (pumps block until their stream ends).
pub type Spawner =
    Box<dyn Fn(&'static str, Box<dyn FnOnce() + Send + 'static>) -> io::Result<()> + Send + Sync>;

type Writer = Box<dyn Write + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenState {
    Pending,
    Open,
}

struct StreamState {
    open: OpenState,
    /// Bytes we may still send.
    send_credit: u32,
    /// Received bytes not yet written to the local end.
    queue: VecDeque<Vec<u8>>,
    queued: u32,
    recv_eof: bool,
    reset: bool,
    /// Pump threads still running (the last one to finish forgets the stream).
    pumps: u8,
}

struct Stream {
    id: u32,
    /// Our end of the local pair (the other is the caller's).
    local: UnixStream,
    state: Mutex<StreamState>,
    cond: Condvar,
}

impl Stream {
    fn reset(&self) {
        let mut st = lock(&self.state);
        st.reset = true;
        st.queue.clear();
        st.queued = 0;
        drop(st);
        let _ = self.local.shutdown(Shutdown::Both);
        self.cond.notify_all();
    }
}

#[derive(Default)]
struct Table {
    streams: HashMap<u32, Arc<Stream>>,
    /// Streams the peer opened that are still in the table.
    peer_opened: usize,
    next_id: u32,
}

struct Inner {
    role: MuxRole,
    label: &'static str,
    writer: Mutex<Option<Writer>>,
    /// Signalled when a session starts.
    session: Condvar,
    table: Mutex<Table>,
    listeners: Mutex<HashMap<u32, SyncSender<UnixStream>>>,
    connector: Option<Connector>,
    spawner: Option<Spawner>,
}

/// A multiplexer over one channel; cheap to clone (shared).
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

impl Mux {
    /// A mux for `role`; `connector` handles peer opens of ports nobody listens on.
    pub fn new(role: MuxRole, label: &'static str, connector: Option<Connector>) -> Self {
        Self::build(role, label, connector, None)
    }

    /// [`Mux::new`] whose per-stream pump jobs run through `spawner`.
    pub fn with_spawner(
        role: MuxRole,
        label: &'static str,
        connector: Option<Connector>,
        spawner: Spawner,
    ) -> Self {
        Self::build(role, label, connector, Some(spawner))
    }

    fn build(
        role: MuxRole,
        label: &'static str,
        connector: Option<Connector>,
        spawner: Option<Spawner>,
    ) -> Self {
        let table = Table {
            next_id: role.first_id(),
            ..Table::default()
        };
        Self {
            inner: Arc::new(Inner {
                role,
                label,
                writer: Mutex::new(None),
                session: Condvar::new(),
                table: Mutex::new(table),
                listeners: Mutex::new(HashMap::new()),
                connector,
                spawner,
            }),
        }
    }

    /// Streams the peer opens to `port` arrive on the returned receiver (at most 64 waiting;
    /// more are refused).
    pub fn listen(&self, port: u32) -> Receiver<UnixStream> {
        let (tx, rx) = sync_channel(64);
        lock(&self.inner.listeners).insert(port, tx);
        rx
    }

    /// Whether a session is being served.
    pub fn connected(&self) -> bool {
        lock(&self.inner.writer).is_some()
    }

    /// Open streams (for tests and diagnostics).
    pub fn stream_count(&self) -> usize {
        lock(&self.inner.table).streams.len()
    }

    /// Opens a stream to the peer's `port`; waits up to `timeout` for a session and for the
    /// peer's answer. Errors: `ConnectionRefused` if the peer refused (nothing listens),
    /// `TimedOut`, `NotConnected` if the session ended.
    pub fn open(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let deadline = Instant::now() + timeout;
        self.wait_session(deadline)?;
        let (ours, theirs) = UnixStream::pair()?;
        let id = {
            let mut t = lock(&self.inner.table);
            let mut id = t.next_id;
            while t.streams.contains_key(&id) {
                id = id.wrapping_add(2);
            }
            t.next_id = id.wrapping_add(2);
            id
        };
        let stream = self.insert(id, ours, OpenState::Pending);
        if let Err(e) = self.send(&MuxFrame::with_u32(id, MuxKind::Open, port)) {
            stream.reset();
            self.forget(&stream);
            return Err(io::Error::new(io::ErrorKind::NotConnected, e));
        }
        let mut st = lock(&stream.state);
        while st.open == OpenState::Pending && !st.reset {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                let _ = self.send(&MuxFrame::control(id, MuxKind::Close));
                stream.reset();
                self.forget(&stream);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer to opening mux port {port} within {timeout:?}"),
                ));
            }
            st = stream
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if st.reset {
            drop(st);
            self.forget(&stream);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("mux port {port} refused"),
            ));
        }
        drop(st);
        self.spawn_pumps(&stream);
        Ok(theirs)
    }

    fn wait_session(&self, deadline: Instant) -> io::Result<()> {
        let mut w = lock(&self.inner.writer);
        while w.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the host channel is not connected",
                ));
            }
            w = self
                .inner
                .session
                .wait_timeout(w, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// Serves one session of the channel: frames from `reader`, ours to `writer`, until the
    /// reader ends or sends something untrustworthy. Every stream is reset at the end when
    /// `reset_on_end` or when at least one frame arrived (an EOF before any frame only means
    /// the peer is not connected yet: a virtio-serial port reads EOF then). Returns the number
    /// of frames received.
    pub fn run_session<R: Read>(&self, mut reader: R, writer: Writer) -> Result<u64, MuxError> {
        *lock(&self.inner.writer) = Some(writer);
        self.inner.session.notify_all();
        let mut frames = 0u64;
        let result = loop {
            match read_mux_frame(&mut reader) {
                Ok(Some(f)) => {
                    frames += 1;
                    self.dispatch(f);
                }
                Ok(None) => break Ok(frames),
                Err(e) => break Err(e),
            }
        };
        if frames > 0 || result.is_err() {
            self.end_session();
        }
        result
    }

    /// Drops the writer and resets every stream.
    pub fn end_session(&self) {
        *lock(&self.inner.writer) = None;
        let streams: Vec<Arc<Stream>> = lock(&self.inner.table).streams.values().cloned().collect();
        for s in streams {
            s.reset();
        }
    }

    fn send(&self, f: &MuxFrame) -> Result<(), MuxError> {
        let buf = f.encode();
        let mut w = lock(&self.inner.writer);
        let Some(writer) = w.as_mut() else {
            return Err(MuxError::NotConnected);
        };
        writer
            .write_all(&buf)
            .and_then(|()| writer.flush())
            .map_err(MuxError::Write)
    }

    fn insert(&self, id: u32, local: UnixStream, open: OpenState) -> Arc<Stream> {
        let stream = Arc::new(Stream {
            id,
            local,
            state: Mutex::new(StreamState {
                open,
                send_credit: MUX_WINDOW,
                queue: VecDeque::new(),
                queued: 0,
                recv_eof: false,
                reset: false,
                pumps: 0,
            }),
            cond: Condvar::new(),
        });
        let mut t = lock(&self.inner.table);
        if !self.inner.role.owns(id) {
            t.peer_opened += 1;
        }
        t.streams.insert(id, Arc::clone(&stream));
        stream
    }

    fn forget(&self, stream: &Arc<Stream>) {
        let mut t = lock(&self.inner.table);
        if t.streams
            .get(&stream.id)
            .is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            t.streams.remove(&stream.id);
            if !self.inner.role.owns(stream.id) {
                t.peer_opened = t.peer_opened.saturating_sub(1);
            }
        }
    }

    fn get(&self, id: u32) -> Option<Arc<Stream>> {
        lock(&self.inner.table).streams.get(&id).cloned()
    }

    /// Resets a stream for a protocol violation of the peer.
    fn violation(&self, stream: &Arc<Stream>, what: &str) {
        tracing::warn!(
            channel = self.inner.label,
            id = stream.id,
            "mux peer {what}; stream reset"
        );
        let _ = self.send(&MuxFrame::control(stream.id, MuxKind::Close));
        stream.reset();
        self.forget(stream);
    }

    fn dispatch(&self, f: MuxFrame) {
        match f.kind {
            MuxKind::Open => self.on_open(f.id, f.arg()),
            MuxKind::OpenOk => {
                if let Some(s) = self.get(f.id) {
                    let mut st = lock(&s.state);
                    if st.open == OpenState::Pending && self.inner.role.owns(f.id) {
                        st.open = OpenState::Open;
                        drop(st);
                        s.cond.notify_all();
                    } else {
                        drop(st);
                        self.violation(&s, "acknowledged a stream it did not get");
                    }
                }
            }
            MuxKind::Data => self.on_data(f.id, f.payload),
            MuxKind::Eof => {
                if let Some(s) = self.get(f.id) {
                    lock(&s.state).recv_eof = true;
                    s.cond.notify_all();
                }
            }
            MuxKind::Close => {
                if let Some(s) = self.get(f.id) {
                    s.reset();
                    let pending = lock(&s.state).open == OpenState::Pending;
                    if pending {
                        // `open` forgets it once it has seen the refusal.
                        return;
                    }
                    self.forget(&s);
                }
            }
            MuxKind::Credit => {
                if let Some(s) = self.get(f.id) {
                    let mut st = lock(&s.state);
                    match st.send_credit.checked_add(f.arg()) {
                        Some(c) if c <= MUX_WINDOW => {
                            st.send_credit = c;
                            drop(st);
                            s.cond.notify_all();
                        }
                        _ => {
                            drop(st);
                            self.violation(&s, "returned more credit than it was owed");
                        }
                    }
                }
            }
        }
    }

    fn on_open(&self, id: u32, port: u32) {
        let refuse = |why: &str| {
            tracing::debug!(
                channel = self.inner.label,
                id,
                port,
                "mux open refused: {why}"
            );
            let _ = self.send(&MuxFrame::control(id, MuxKind::Close));
        };
        if self.inner.role.owns(id) {
            tracing::warn!(
                channel = self.inner.label,
                id,
                "mux peer opened a stream with our id parity"
            );
            return refuse("wrong id parity");
        }
        {
            let t = lock(&self.inner.table);
            if t.streams.contains_key(&id) {
                drop(t);
                tracing::warn!(
                    channel = self.inner.label,
                    id,
                    "mux peer reopened a live stream"
                );
                if let Some(s) = self.get(id) {
                    self.violation(&s, "reopened a live stream");
                }
                return;
            }
            if t.peer_opened >= MUX_MAX_PEER_STREAMS {
                drop(t);
                tracing::warn!(
                    channel = self.inner.label,
                    id,
                    "mux peer exceeded {MUX_MAX_PEER_STREAMS} open streams"
                );
                return refuse("too many streams");
            }
        }
        let Some(local) = self.accept(port) else {
            return refuse("nothing listens");
        };
        let stream = self.insert(id, local, OpenState::Open);
        if self.send(&MuxFrame::control(id, MuxKind::OpenOk)).is_err() {
            stream.reset();
            self.forget(&stream);
            return;
        }
        self.spawn_pumps(&stream);
    }

    /// The local end for a peer's open of `port`: a listener's pair, else the connector.
    fn accept(&self, port: u32) -> Option<UnixStream> {
        let tx = lock(&self.inner.listeners).get(&port).cloned();
        if let Some(tx) = tx {
            let (ours, theirs) = UnixStream::pair().ok()?;
            return tx.try_send(theirs).ok().map(|()| ours);
        }
        self.inner.connector.as_ref().and_then(|c| c(port))
    }

    fn on_data(&self, id: u32, data: Vec<u8>) {
        let Some(s) = self.get(id) else {
            // A stream we already closed (a race) or never had: tell the peer it is gone.
            let _ = self.send(&MuxFrame::control(id, MuxKind::Close));
            return;
        };
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut st = lock(&s.state);
        if st.reset || data.is_empty() {
            return;
        }
        if st.recv_eof || st.queued.saturating_add(len) > MUX_WINDOW {
            drop(st);
            self.violation(&s, "sent beyond its credit or after its EOF");
            return;
        }
        st.queued += len;
        st.queue.push_back(data);
        drop(st);
        s.cond.notify_all();
    }

    fn spawn_pumps(&self, stream: &Arc<Stream>) {
        lock(&stream.state).pumps = 2;
        for outbound in [true, false] {
            let mux = self.clone();
            let s = Arc::clone(stream);
            let name = if outbound { "mux-out" } else { "mux-in" };
            let job = move || {
                if outbound {
                    mux.pump_out(&s);
                } else {
                    mux.pump_in(&s);
                }
                mux.pump_done(&s);
            };
            let spawned = match &self.inner.spawner {
                Some(spawn) => spawn(name, Box::new(job)),
                None => std::thread::Builder::new()
                    .name(name.into())
                    .spawn(job)
                    .map(drop),
            };
            if let Err(e) = spawned {
                tracing::warn!(channel = self.inner.label, error = %e, "mux pump thread");
                let _ = self.send(&MuxFrame::control(stream.id, MuxKind::Close));
                stream.reset();
                self.pump_done(stream);
            }
        }
    }

    fn pump_done(&self, s: &Arc<Stream>) {
        let mut st = lock(&s.state);
        st.pumps = st.pumps.saturating_sub(1);
        let last = st.pumps == 0;
        drop(st);
        if last {
            self.forget(s);
        }
    }

    /// Local end -> `Data` frames, within the credit; `Eof` at the local end's EOF.
    fn pump_out(&self, s: &Arc<Stream>) {
        let mut buf = vec![0u8; MUX_MAX_PAYLOAD];
        let mut reader = &s.local;
        loop {
            let credit = {
                let mut st = lock(&s.state);
                while st.send_credit == 0 && !st.reset {
                    st = s.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                if st.reset {
                    return;
                }
                st.send_credit
            };
            let max = usize::try_from(credit)
                .unwrap_or(MUX_MAX_PAYLOAD)
                .min(MUX_MAX_PAYLOAD);
            let frame = match reader.read(&mut buf[..max]) {
                Ok(0) => MuxFrame::control(s.id, MuxKind::Eof),
                Ok(n) => {
                    let mut st = lock(&s.state);
                    if st.reset {
                        return;
                    }
                    st.send_credit -= u32::try_from(n).unwrap_or(credit).min(credit);
                    drop(st);
                    MuxFrame {
                        id: s.id,
                        kind: MuxKind::Data,
                        payload: buf[..n].to_vec(),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => MuxFrame::control(s.id, MuxKind::Close),
            };
            if lock(&s.state).reset {
                return;
            }
            let end = frame.kind != MuxKind::Data;
            if self.send(&frame).is_err() || frame.kind == MuxKind::Close {
                s.reset();
                return;
            }
            if end {
                return;
            }
        }
    }

    /// Queued data -> local end, returning credit; half-closes the local end at the peer's
    /// EOF.
    fn pump_in(&self, s: &Arc<Stream>) {
        let mut writer = &s.local;
        loop {
            let chunk = {
                let mut st = lock(&s.state);
                loop {
                    if st.reset {
                        return;
                    }
                    if let Some(c) = st.queue.pop_front() {
                        break c;
                    }
                    if st.recv_eof {
                        drop(st);
                        let _ = s.local.shutdown(Shutdown::Write);
                        return;
                    }
                    st = s.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            };
            if writer.write_all(&chunk).is_err() {
                let _ = self.send(&MuxFrame::control(s.id, MuxKind::Close));
                s.reset();
                return;
            }
            let n = u32::try_from(chunk.len()).unwrap_or(MUX_WINDOW);
            {
                let mut st = lock(&s.state);
                if st.reset {
                    return;
                }
                st.queued = st.queued.saturating_sub(n);
            }
            if self
                .send(&MuxFrame::with_u32(s.id, MuxKind::Credit, n))
                .is_err()
            {
                s.reset();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const PORT: u32 = 5000;
    const T: Duration = Duration::from_secs(10);

    /// A host mux and a guest mux joined by a socket pair; the guest listens on [`PORT`].
    fn joined() -> (Mux, Mux, Receiver<UnixStream>) {
        joined_to(Mux::new(MuxRole::Guest, "test-guest", None))
    }

    /// [`joined`] with the given guest mux.
    fn joined_to(guest: Mux) -> (Mux, Mux, Receiver<UnixStream>) {
        let (h, g) = UnixStream::pair().expect("pair");
        let host = Mux::new(MuxRole::Host, "test-host", None);
        let rx = guest.listen(PORT);
        for (m, s) in [(host.clone(), h), (guest.clone(), g)] {
            let w = s.try_clone().expect("clone");
            thread::spawn(move || m.run_session(s, Box::new(w)));
        }
        (host, guest, rx)
    }

    /// Echoes every accepted stream until its EOF, then half-closes.
    fn echo_server(rx: Receiver<UnixStream>) {
        thread::spawn(move || {
            for s in rx {
                thread::spawn(move || {
                    let mut r = s.try_clone().expect("clone");
                    let mut w = s;
                    let _ = io::copy(&mut r, &mut w);
                    let _ = w.shutdown(Shutdown::Write);
                });
            }
        });
    }

    /// Opens a stream to the echo server, sends `msg`, half-closes, and checks it comes back.
    fn assert_echoed(host: &Mux, msg: &[u8]) {
        let mut s = host.open(PORT, T).expect("open");
        s.write_all(msg).expect("write");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read");
        assert_eq!(back, msg);
    }

    #[test]
    fn streams_echo_with_half_close() {
        let (host, _guest, rx) = joined();
        echo_server(rx);
        let mut s = host.open(PORT, T).expect("open");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = s.try_clone().expect("clone");
        let sent = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&sent).expect("write");
            w.shutdown(Shutdown::Write).expect("half-close");
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read to EOF");
        writer.join().expect("writer");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
    }

    /// Pump jobs go through the caller's spawner (two per stream, named), and a spawner
    /// that fails resets just that stream.
    #[test]
    fn pumps_run_through_the_spawner() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, f) = (Arc::clone(&calls), Arc::clone(&fail));
        let guest = Mux::with_spawner(
            MuxRole::Guest,
            "test-guest",
            None,
            Box::new(move |name, job| {
                assert!(name == "mux-out" || name == "mux-in", "{name}");
                c.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) {
                    return Err(io::Error::other("no thread"));
                }
                thread::spawn(job);
                Ok(())
            }),
        );
        let (host, _guest, rx) = joined_to(guest);
        echo_server(rx);
        assert_echoed(&host, b"ping");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The guest answers OpenOk and then, its pumps failing, Close: the host's open may
        // see both before it wakes (refused) or only the first (a stream that ends).
        fail.store(true, Ordering::SeqCst);
        match host.open(PORT, T) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
            Ok(mut s) => {
                s.set_read_timeout(Some(T)).expect("timeout");
                let mut buf = [0u8; 1];
                let _ = s.write_all(b"x");
                assert!(
                    matches!(s.read(&mut buf), Ok(0) | Err(_)),
                    "a stream without pumps ends"
                );
            }
        }
        // Only that stream was lost: the channel serves the next one.
        fail.store(false, Ordering::SeqCst);
        assert_echoed(&host, b"again");
    }

    #[test]
    fn refused_port_and_guest_initiated_open() {
        let (host, guest, _rx) = joined();
        let err = host.open(4242, T).expect_err("nobody listens");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let ready = host.listen(5002);
        let mut g = guest.open(5002, T).expect("guest opens");
        let mut h = ready.recv_timeout(T).expect("host accepts");
        g.write_all(b"hello").expect("write");
        let mut buf = [0u8; 5];
        h.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello");
    }

    /// A stream whose reader stalls must not block another stream: its sender runs out of
    /// credit after one window and the receiver holds at most that window.
    #[test]
    fn stalled_stream_does_not_block_others() {
        let (host, guest, rx) = joined();
        let mut stalled = host.open(PORT, T).expect("open stalled");
        let _stalled_peer = rx.recv_timeout(T).expect("accept stalled"); // never read
        let flooder = thread::spawn(move || {
            let chunk = vec![7u8; 64 * 1024];
            let mut total = 0usize;
            // The local socket buffer plus one window, then write blocks: stop there.
            stalled
                .set_write_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            while stalled.write_all(&chunk).is_ok() {
                total += chunk.len();
                assert!(
                    total < 64 << 20,
                    "writes never blocked: credit not enforced"
                );
            }
            (stalled, total)
        });
        echo_server(rx);
        let mut other = host.open(PORT, T).expect("open second");
        other.set_read_timeout(Some(T)).expect("timeout");
        for _ in 0..20 {
            other.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            other
                .read_exact(&mut buf)
                .expect("pong while the first stream is stalled");
        }
        let (_stalled, total) = flooder.join().expect("flooder");
        assert!(total > 0);
        let queued: u32 = lock(&guest.inner.table)
            .streams
            .values()
            .map(|s| lock(&s.state).queued)
            .sum();
        assert!(queued <= MUX_WINDOW, "receiver queued {queued} bytes");
    }

    /// A hostile peer speaking raw frames to a host mux.
    struct RawPeer {
        s: UnixStream,
        host: Mux,
        session: thread::JoinHandle<Result<u64, MuxError>>,
    }

    fn raw_peer() -> RawPeer {
        let (h, p) = UnixStream::pair().expect("pair");
        let host = Mux::new(MuxRole::Host, "test-host", None);
        let m = host.clone();
        let w = h.try_clone().expect("clone");
        let session = thread::spawn(move || m.run_session(h, Box::new(w)));
        p.set_read_timeout(Some(T)).expect("timeout");
        RawPeer {
            s: p,
            host,
            session,
        }
    }

    impl RawPeer {
        fn send(&mut self, f: &MuxFrame) {
            self.s.write_all(&f.encode()).expect("send");
        }
        fn recv(&mut self) -> MuxFrame {
            read_mux_frame(&mut self.s)
                .expect("frame")
                .expect("not EOF")
        }
        /// Receives frames until one for `id` of `kind` (credit frames may come first).
        fn expect(&mut self, id: u32, kind: MuxKind) -> MuxFrame {
            loop {
                let f = self.recv();
                if f.id == id && f.kind == kind {
                    return f;
                }
            }
        }
        /// Guest-side open of `port` through a listener on the host.
        fn open(&mut self, id: u32, port: u32) {
            self.send(&MuxFrame::with_u32(id, MuxKind::Open, port));
        }
    }

    #[test]
    fn oversized_unknown_and_malformed_frames_end_the_channel() {
        type Check = fn(&MuxError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (
                {
                    let mut b = vec![0, 0, 0, 2, MuxKind::Data as u8];
                    b.extend_from_slice(&(u32::MAX).to_be_bytes());
                    b
                },
                |e| matches!(e, MuxError::TooLarge { .. }),
            ),
            (vec![0, 0, 0, 2, 99, 0, 0, 0, 0], |e| {
                matches!(e, MuxError::UnknownKind(99))
            }),
            (MuxFrame::with_u32(2, MuxKind::Eof, 1).encode(), |e| {
                matches!(e, MuxError::BadControl { .. })
            }),
            (vec![0, 0, 0, 2, MuxKind::Data as u8, 0, 0], |e| {
                matches!(e, MuxError::Truncated)
            }),
        ];
        for (bytes, check) in cases {
            let mut p = raw_peer();
            let stream_rx = p.host.listen(5002);
            p.open(2, 5002);
            p.expect(2, MuxKind::OpenOk);
            let local = stream_rx.recv_timeout(T).expect("accepted");
            p.s.write_all(&bytes).expect("write");
            if bytes.len() < MUX_HEADER {
                p.s.shutdown(Shutdown::Write).expect("eof");
            }
            let err = p.session.join().expect("join").expect_err("channel error");
            assert!(check(&err), "unexpected error {err:?}");
            // Every stream was reset: the local end reads EOF.
            let mut buf = [0u8; 1];
            let mut l = &local;
            l.set_read_timeout(Some(T)).expect("timeout");
            assert_eq!(l.read(&mut buf).expect("read"), 0);
            assert!(!p.host.connected());
        }
    }

    #[test]
    fn credit_overrun_resets_only_that_stream() {
        let mut p = raw_peer();
        let rx = p.host.listen(5002);
        p.open(2, 5002);
        p.expect(2, MuxKind::OpenOk);
        let _stalled = rx.recv_timeout(T).expect("accept"); // never read
        p.open(4, 5002);
        p.expect(4, MuxKind::OpenOk);
        let mut good = rx.recv_timeout(T).expect("accept");
        // Ignore credit: the local socket buffer absorbs some, then the window fills and
        // the next frame overruns it.
        let frame = MuxFrame {
            id: 2,
            kind: MuxKind::Data,
            payload: vec![1u8; MUX_MAX_PAYLOAD],
        }
        .encode();
        let mut w = p.s.try_clone().expect("clone");
        let flood = thread::spawn(move || {
            for _ in 0..(4 * MUX_WINDOW as usize + (4 << 20)) / MUX_MAX_PAYLOAD {
                w.write_all(&frame).expect("flood");
            }
        });
        p.expect(2, MuxKind::Close);
        flood.join().expect("flood");
        // Stream 4 still works, the channel too.
        p.send(&MuxFrame {
            id: 4,
            kind: MuxKind::Data,
            payload: b"ok".to_vec(),
        });
        let mut buf = [0u8; 2];
        good.set_read_timeout(Some(T)).expect("timeout");
        good.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ok");
        assert!(p.host.connected());
    }

    #[test]
    fn excess_credit_unknown_ids_and_too_many_streams() {
        let mut p = raw_peer();
        let rx = p.host.listen(5002);
        // Credit beyond the window: the stream is reset.
        p.open(2, 5002);
        p.expect(2, MuxKind::OpenOk);
        let _a = rx.recv_timeout(T).expect("accept");
        p.send(&MuxFrame::with_u32(2, MuxKind::Credit, 1));
        p.expect(2, MuxKind::Close);
        // Data for a stream that does not exist: answered with Close, nothing grows.
        p.send(&MuxFrame {
            id: 1000,
            kind: MuxKind::Data,
            payload: vec![0; 10],
        });
        p.expect(1000, MuxKind::Close);
        // An open with the host's id parity is refused.
        p.open(7, 5002);
        p.expect(7, MuxKind::Close);
        // At most MUX_MAX_PEER_STREAMS streams; the next is refused.
        let mut held = Vec::new();
        for i in 0..MUX_MAX_PEER_STREAMS as u32 {
            let id = 10 + 2 * i;
            p.open(id, 5002);
            p.expect(id, MuxKind::OpenOk);
            held.push(rx.recv_timeout(T).expect("accept"));
        }
        let over = 10 + 2 * MUX_MAX_PEER_STREAMS as u32;
        p.open(over, 5002);
        p.expect(over, MuxKind::Close);
        assert_eq!(p.host.stream_count(), MUX_MAX_PEER_STREAMS);
        assert!(p.host.connected());
    }
}

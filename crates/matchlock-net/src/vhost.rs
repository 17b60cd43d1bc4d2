//! The stack's end of the guest NIC as a vhost-user-net backend: the virtio-net queues are
//! served straight from the guest's shared memory, without QEMU in the data path.
//!
//! # Design
//! With `-netdev stream`, every guest frame costs QEMU's main thread a copy and a `writev`
//! to the stack's socket (and the stack a read), and QEMU's main thread competes with the
//! emulated vCPU for the host's cores. Here QEMU only negotiates (`-netdev vhost-user`):
//! it hands this backend the guest memory (the VM's shared memfd) and the queues' kick and
//! call eventfds, and a `vhost_user_backend::VhostUserDaemon` worker thread moves frames
//! between the virtqueues and two bounded in-memory queues shared with the stack thread:
//!
//! - guest -> stack (transmit queue 1): each descriptor chain is one frame behind a 12-byte
//!   `virtio_net_hdr_v1` (no offloads are offered, so the header carries nothing). The
//!   chain's readable length is checked (by `virtio_queue::Reader`, which also bounds every
//!   descriptor to guest memory) against the header plus the link's largest frame before
//!   anything is copied; a chain that is too short or too long is returned used and dropped.
//!   At most [`INBOX_CAP`] frames wait for the stack; beyond that the worker leaves the
//!   guest's chains in the ring (the guest NIC stops, as on a full wire) until the stack
//!   drains the queue and kicks the worker.
//! - stack -> guest (receive queue 0): the stack appends frames (at most [`OUTBOX_CAP`]
//!   waiting) and writes an eventfd the worker listens on; the worker writes each frame
//!   behind a zeroed header into one receive buffer the guest posted. A frame larger than
//!   the buffer is dropped (TCP retransmits); with no buffer posted the frames wait.
//!
//! The stack thread is woken (a `tokio::sync::Notify`) once per batch, not per frame, and
//! notifications follow `VIRTIO_RING_F_EVENT_IDX`, so a guest sending a burst kicks once.
//!
//! # Limitations
//! vhost-user devices cannot be migrated by QEMU 7.2, so snapshot boots use the stream
//! transport ([`crate::link`]). One queue pair, no checksum or segmentation offloads (every
//! frame is at most the MTU, as on the stream path), no mergeable receive buffers (the
//! guest's small receive buffers hold 1518 bytes, so the transport needs an MTU of at most
//! 1500). QEMU 7.2 does not reconnect: a link QEMU closed stays down.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Queues: receive (0) and transmit (1).
const NUM_QUEUES: usize = 2;
const RX: u16 = 0;
const TX: u16 = 1;
/// Epoll data of the stack's kick (0..=NUM_QUEUES are the queues' and the exit event's).
const STACK_KICK: u16 = 3;
/// Entries per queue (QEMU's `rx_queue_size`/`tx_queue_size` must not exceed it).
pub const QUEUE_SIZE: usize = 1024;
/// Guest frames waiting for the stack at most.
pub(crate) const INBOX_CAP: usize = 512;
/// Frames for the guest waiting for receive buffers at most.
pub(crate) const OUTBOX_CAP: usize = 512;
/// Bytes of `virtio_net_hdr_v1` in front of every frame (`VIRTIO_F_VERSION_1`).
const NET_HDR: usize = 12;
/// How long stopping waits for the backend's thread.
const STOP_WAIT: Duration = Duration::from_secs(3);

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("bind or connect {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create the vhost-user-net daemon: {0}")]
    Daemon(String),
    #[error("create the stack's kick eventfd")]
    Kick(#[source] io::Error),
    #[error("register the stack's kick eventfd: {0}")]
    Register(String),
    #[error("start the vhost-user-net thread")]
    Thread(#[source] io::Error),
}

/// Frames between the backend's worker and the stack thread.
#[derive(Default)]
struct Queues {
    /// Guest frames for the stack.
    inbox: VecDeque<Vec<u8>>,
    /// Frames for the guest.
    outbox: VecDeque<Vec<u8>>,
    /// The worker left transmit chains in the ring because `inbox` was full.
    inbox_blocked: bool,
    /// The stack kept frames back because `outbox` was full.
    outbox_blocked: bool,
}

struct Shared {
    q: Mutex<Queues>,
    /// Wakes the stack thread.
    wake: Notify,
    /// Written by the stack when it queued frames or freed inbox space.
    kick: EventNotifier,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.q
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct NetBackend {
    shared: Arc<Shared>,
    kick_rx: EventConsumer,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    /// Largest Ethernet frame either way.
    max_frame: usize,
}

/// An error of one queue operation (logged by the caller; the worker keeps running).
fn qerr(what: &'static str) -> impl Fn(virtio_queue::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

impl NetBackend {
    fn memory(&self) -> Option<Mem> {
        self.mem
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `drain` (true: it stopped for lack of descriptor chains) again while the guest
    /// added chains with notifications off; a drain that stopped for another reason (no
    /// frames, a full inbox) ends it, or the loop would spin on chains it leaves alone.
    fn with_event_idx(
        &self,
        vring: &VringRwLock,
        mut drain: impl FnMut() -> io::Result<bool>,
    ) -> io::Result<()> {
        if !self.event_idx.load(Ordering::Relaxed) {
            return drain().map(drop);
        }
        loop {
            vring
                .disable_notification()
                .map_err(qerr("disable notification"))?;
            let starved = drain()?;
            let more = vring
                .enable_notification()
                .map_err(qerr("enable notification"))?;
            if !(starved && more) {
                return Ok(());
            }
        }
    }

    fn signal(vring: &VringRwLock) -> io::Result<()> {
        if vring
            .needs_notification()
            .map_err(qerr("needs notification"))?
        {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Takes the guest's transmitted frames into the inbox (until it is full).
    fn take_tx(&self, vring: &VringRwLock, mem: &Mem) -> io::Result<()> {
        let mut got = false;
        let mut used = false;
        let r = self.with_event_idx(vring, || loop {
            {
                let mut q = self.shared.lock();
                if q.inbox.len() >= INBOX_CAP {
                    q.inbox_blocked = true;
                    return Ok(false);
                }
            }
            let guard = mem.memory();
            let Some(chain) = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(&*guard)
            else {
                return Ok(true);
            };
            let head = chain.head_index();
            if let Some(frame) = self.read_frame(&guard, chain) {
                self.shared.lock().inbox.push_back(frame);
                got = true;
            }
            vring.add_used(head, 0).map_err(qerr("add used"))?;
            used = true;
        });
        if used {
            Self::signal(vring)?;
        }
        if got {
            self.shared.wake.notify_one();
        }
        r
    }

    /// One transmitted frame without its header; `None` (logged) for a malformed chain.
    fn read_frame(
        &self,
        mem: &GuestMemoryMmap<()>,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<()>>,
    ) -> Option<Vec<u8>> {
        let mut r = match Reader::new(mem, chain) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "malformed virtio-net transmit chain dropped");
                return None;
            }
        };
        let len = r.available_bytes();
        if len <= NET_HDR || len - NET_HDR > self.max_frame {
            tracing::warn!(
                len,
                max = self.max_frame,
                "guest frame outside the link's bounds dropped"
            );
            return None;
        }
        let mut buf = vec![0; len];
        if let Err(e) = r.read_exact(&mut buf) {
            tracing::warn!(error = %e, "virtio-net transmit chain unreadable");
            return None;
        }
        buf.drain(..NET_HDR);
        Some(buf)
    }

    /// Writes queued frames into the guest's receive buffers while both last.
    fn fill_rx(&self, vring: &VringRwLock, mem: &Mem) -> io::Result<()> {
        let mut used = false;
        let mut freed = false;
        let r = self.with_event_idx(vring, || loop {
            let Some(frame) = self.shared.lock().outbox.pop_front() else {
                return Ok(false);
            };
            let guard = mem.memory();
            let Some(chain) = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(&*guard)
            else {
                self.shared.lock().outbox.push_front(frame);
                return Ok(true);
            };
            freed = true;
            let head = chain.head_index();
            let len = Self::write_frame(&guard, chain, &frame);
            vring.add_used(head, len).map_err(qerr("add used"))?;
            used = true;
        });
        if used {
            Self::signal(vring)?;
        }
        if freed {
            let mut q = self.shared.lock();
            if q.outbox_blocked && q.outbox.len() < OUTBOX_CAP {
                q.outbox_blocked = false;
                drop(q);
                self.shared.wake.notify_one();
            }
        }
        r
    }

    /// Writes header and frame into one receive chain; the used length (0: dropped).
    fn write_frame(
        mem: &GuestMemoryMmap<()>,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<()>>,
        frame: &[u8],
    ) -> u32 {
        let mut w = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "malformed virtio-net receive chain");
                return 0;
            }
        };
        if w.available_bytes() < NET_HDR + frame.len() {
            tracing::debug!(len = frame.len(), "receive buffer too small: frame dropped");
            return 0;
        }
        // num_buffers (the last field) is 1; no offload flags.
        let mut hdr = [0u8; NET_HDR];
        hdr[10] = 1;
        if w.write_all(&hdr).and_then(|()| w.write_all(frame)).is_err() {
            tracing::warn!("virtio-net receive chain unwritable");
            return 0;
        }
        u32::try_from(NET_HDR + frame.len()).unwrap_or(0)
    }

    fn process(&self, event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let (Some(rx), Some(tx)) = (vrings.get(usize::from(RX)), vrings.get(usize::from(TX)))
        else {
            return Ok(());
        };
        match event {
            RX => self.fill_rx(rx, &mem),
            TX => self.take_tx(tx, &mem),
            STACK_KICK => {
                // Reset the counter; a failed read only means a spurious turn.
                let _ = self.kick_rx.consume();
                self.fill_rx(rx, &mem)?;
                let blocked = std::mem::take(&mut self.shared.lock().inbox_blocked);
                if blocked {
                    self.take_tx(tx, &mem)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    /// `VHOST_USER_F_PROTOCOL_FEATURES` is required: without it QEMU 7.2 refuses to start
    /// vhost-user-net (its ring enable fails with `EINVAL`). No protocol feature is used.
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self
            .mem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // An error here would end the worker thread: log it and keep serving.
        if let Err(e) = self.process(device_event, vrings) {
            tracing::warn!(queue = device_event, error = %e, "virtio-net queue");
        }
        Ok(())
    }
}

/// The stack's side of a vhost-user-net device: the frame queues and the backend's thread.
pub(crate) struct VhostLink {
    shared: Arc<Shared>,
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
    /// QEMU connected (stopping then cannot end the session; QEMU's exit does).
    connected: Arc<AtomicBool>,
    /// Guest frames taken from the shared inbox, handed out one by one.
    local: VecDeque<Vec<u8>>,
}

impl VhostLink {
    /// Listens on `socket` (replacing a stale file) and serves the first front-end that
    /// connects, for frames of at most `mtu` IP bytes (plus Ethernet and one VLAN tag).
    pub(crate) fn start(socket: &Path, mtu: u16) -> Result<VhostLink, VhostError> {
        let (kick_rx, kick) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(VhostError::Kick)?;
        let kick_fd = kick_rx.as_raw_fd();
        let shared = Arc::new(Shared {
            q: Mutex::default(),
            wake: Notify::new(),
            kick,
        });
        let backend = Arc::new(NetBackend {
            shared: shared.clone(),
            kick_rx,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            max_frame: usize::from(mtu) + 18,
        });
        let daemon = VhostUserDaemon::new(
            "matchlock-vnet".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| VhostError::Daemon(e.to_string()))?;
        for h in daemon.get_epoll_handlers() {
            h.register_listener(kick_fd, EventSet::IN, u64::from(STACK_KICK))
                .map_err(|e| VhostError::Register(e.to_string()))?;
        }
        let backend_conn = Self::start_daemon(daemon, socket)?;
        let listener =
            std::os::unix::net::UnixListener::bind(socket).map_err(|source| VhostError::Bind {
                path: socket.to_path_buf(),
                source,
            })?;
        let connected = Arc::new(AtomicBool::new(false));
        let up = connected.clone();
        let thread = std::thread::Builder::new()
            .name("matchlock-vnet-relay".into())
            .spawn(move || match listener.accept() {
                Ok((qemu, _)) => {
                    up.store(true, Ordering::Relaxed);
                    drop(listener);
                    crate::vhost_shim::relay(qemu, backend_conn);
                }
                Err(e) => tracing::warn!(error = %e, "vhost-user-net accept failed"),
            })
            .map_err(VhostError::Thread)?;
        Ok(VhostLink {
            shared,
            socket: socket.to_path_buf(),
            thread: Some(thread),
            connected,
            local: VecDeque::new(),
        })
    }

    /// Starts the daemon on a private listener next to `socket` and connects to it at once
    /// (the file is removed right after): the relay ([`crate::vhost_shim`]) is its only
    /// front-end. Returns the relay's end.
    fn start_daemon(
        mut daemon: VhostUserDaemon<Arc<NetBackend>>,
        socket: &Path,
    ) -> Result<UnixStream, VhostError> {
        let mut private = socket.as_os_str().to_owned();
        private.push(".be");
        let private = PathBuf::from(private);
        let mut listener = Listener::new(&private, true).map_err(|source| VhostError::Listen {
            path: private.clone(),
            source,
        })?;
        let conn = UnixStream::connect(&private);
        let _ = std::fs::remove_file(&private);
        let conn = conn.map_err(|source| VhostError::Bind {
            path: private.clone(),
            source,
        })?;
        std::thread::Builder::new()
            .name("matchlock-vnet-be".into())
            .spawn(move || {
                if let Err(e) = daemon.start(&mut listener) {
                    tracing::warn!(error = %e, "vhost-user-net relay did not connect");
                    return;
                }
                match daemon.wait() {
                    Ok(()) => tracing::debug!("vhost-user-net front-end disconnected"),
                    Err(e) => tracing::warn!(error = %e, "vhost-user-net session ended"),
                }
            })
            .map_err(VhostError::Thread)?;
        Ok(conn)
    }

    /// Waits until the backend has frames for the stack or room for more of its frames.
    pub(crate) async fn ready(&self) {
        self.shared.wake.notified().await;
    }

    /// Whether guest frames are waiting.
    pub(crate) fn has_frame(&self) -> bool {
        !self.local.is_empty() || !self.shared.lock().inbox.is_empty()
    }

    /// The next guest frame, if any.
    pub(crate) fn next_frame(&mut self) -> Option<Vec<u8>> {
        if self.local.is_empty() {
            let blocked = {
                let mut q = self.shared.lock();
                std::mem::swap(&mut self.local, &mut q.inbox);
                q.inbox_blocked
            };
            if blocked {
                self.kick();
            }
        }
        self.local.pop_front()
    }

    /// Moves the stack's frames to the backend (as many as fit); the rest stay in `tx`.
    pub(crate) fn send(&mut self, tx: &mut VecDeque<Vec<u8>>) {
        if tx.is_empty() {
            return;
        }
        {
            let mut q = self.shared.lock();
            while q.outbox.len() < OUTBOX_CAP {
                let Some(f) = tx.pop_front() else { break };
                q.outbox.push_back(f);
            }
            q.outbox_blocked = !tx.is_empty();
        }
        self.kick();
    }

    fn kick(&self) {
        if let Err(e) = self.shared.kick.notify() {
            tracing::warn!(error = %e, "vhost-user-net kick failed");
        }
    }
}

impl Drop for VhostLink {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            if self.connected.load(Ordering::Relaxed) && !t.is_finished() {
                // The session ends when QEMU exits and closes its connection.
                tracing::debug!("vhost-user-net still connected to QEMU at stop");
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            if !t.is_finished() {
                // A listener still waiting for QEMU: one connection that closes at once
                // ends the session.
                drop(UnixStream::connect(&self.socket));
            }
            let deadline = Instant::now() + STOP_WAIT;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::debug!("vhost-user-net thread still serving QEMU; left behind");
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

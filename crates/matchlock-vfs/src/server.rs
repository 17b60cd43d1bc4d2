//! The vhost-user-fs device backend: FUSE requests from the guest's virtqueues answered by
//! `fuse-backend-rs` over the mount router, inside the sandbox owner.
//!
//! # Design
//! [`FsServer::start`] binds the unix socket (so it is listening before QEMU starts) and
//! runs a `vhost_user_backend::VhostUserDaemon` on a thread of its own: it accepts exactly
//! one front-end (QEMU), negotiates, maps the guest's shared memfd memory and hands both
//! queues (hiprio and one request queue, 1024 entries each) to one worker thread. Each
//! descriptor chain becomes a `Reader`/`Writer` pair over guest memory that
//! `fuse_backend_rs::api::server::Server` decodes and answers; malformed requests get an
//! empty used entry, never a panic. Each answer is published and, when the guest asked for
//! it (`EVENT_IDX`), signalled at once, as upstream `virtiofsd` does: signalling once per
//! batch made a guest with several requests in flight (readahead, `git`'s parallel `lstat`s,
//! the `FORGET`s after unlinks) wait for the whole batch. When QEMU exits the connection breaks and the threads
//! end; [`FsServer::stop`] also unblocks a listener that never saw QEMU (by connecting to
//! it once) and joins the thread, bounded by [`STOP_WAIT`].
//!
//! `PassthroughFs` holds one `O_PATH` descriptor per host inode the guest has looked up and
//! not forgotten (the guest forgets under memory pressure only), so a `git add` of 10,000
//! files needs over 20,000 of them. [`FsServer::start`] raises the owner's `RLIMIT_NOFILE`
//! as upstream `virtiofsd` does: to [`NOFILE_WANTED`] (capped by `fs.nr_open`) when it may
//! raise the hard limit, else the soft limit to the hard one. Without it the guest gets
//! `EMFILE` ("Too many open files") from lookups and closes past the limit.
//!
//! # Limitations
//! One worker thread serves both queues (requests are answered one at a time). No DAX
//! window, no notification queue.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::router::Router;
use fuse_backend_rs::api::server::Server;

use crate::intercept::Intercept;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Queues: hiprio (0) and one request queue (1).
const NUM_QUEUES: usize = 2;
/// Entries per queue (QEMU's `queue-size` must not exceed it).
pub const QUEUE_SIZE: usize = 1024;
/// Open descriptors the server asks for (upstream virtiofsd's default `--rlimit-nofile`).
pub const NOFILE_WANTED: u64 = 1 << 20;
/// How long [`FsServer::stop`] waits for the server thread.
const STOP_WAIT: Duration = Duration::from_secs(3);

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("create the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("start the virtio-fs server thread")]
    Thread(#[source] io::Error),
}

/// Raises `RLIMIT_NOFILE` for the inode descriptors (see the module docs); returns the new
/// soft limit. A failure leaves the limit as it was (the guest then sees `EMFILE` sooner).
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_WANTED);
    let want = NOFILE_WANTED.min(nr_open);
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        tracing::debug!(from = soft, to = want, "raised the open-file limit");
        return want;
    }
    let target = hard.min(want.max(soft));
    if soft < target && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        tracing::debug!(from = soft, to = target, "raised the open-file limit");
        return target;
    }
    soft
}

struct FsBackend {
    server: Server<Arc<Intercept<Router>>>,
    mem: RwLock<Option<Mem>>,
    event_idx: std::sync::atomic::AtomicBool,
}

impl FsBackend {
    fn memory(&self) -> Option<Mem> {
        self.mem
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Answers every available request on `vring`, signalling the guest after each one
    /// (when it asked to be): a guest with several requests in flight (readahead, git's
    /// parallel `lstat`s) resumes on the first answer while the next is being served, rather
    /// than after the whole batch. Returns whether any was used.
    fn drain(&self, vring: &VringRwLock, mem: &Mem) -> io::Result<bool> {
        let guard = mem.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.memory())
            .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?
            .collect();
        let used = !chains.is_empty();
        for chain in chains {
            let head = chain.head_index();
            let len = match (
                Reader::from_descriptor_chain(&*guard, chain.clone()),
                VirtioFsWriter::new(&*guard, chain),
            ) {
                (Ok(r), Ok(w)) => match self.server.handle_message(r, w.into(), None, None) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(error = %e, "virtio-fs request failed");
                        0
                    }
                },
                _ => {
                    tracing::warn!("malformed virtio-fs descriptor chain");
                    0
                }
            };
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("add used: {e}")))?;
            if vring
                .needs_notification()
                .map_err(|e| io::Error::other(format!("needs notification: {e}")))?
            {
                vring.signal_used_queue()?;
            }
        }
        Ok(used)
    }

    fn process(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        if !self.event_idx.load(std::sync::atomic::Ordering::Relaxed) {
            self.drain(vring, &mem)?;
            return Ok(());
        }
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("disable notification: {e}")))?;
            self.drain(vring, &mem)?;
            let more = vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("enable notification: {e}")))?;
            if !more {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
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
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        // An error here would end the worker thread: log it and keep serving.
        if let Err(e) = self.process(vring) {
            tracing::warn!(queue = device_event, error = %e, "virtio-fs queue");
        }
        Ok(())
    }
}

/// A running virtio-fs server for one VM.
pub struct FsServer {
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl FsServer {
    /// Listens on `socket` (replacing a stale file) and serves `vfs` to the first front-end
    /// that connects, on a thread named `name`.
    pub fn start(
        vfs: Intercept<Router>,
        socket: &Path,
        name: &str,
    ) -> Result<FsServer, ServerError> {
        raise_nofile_limit();
        let mut listener = Listener::new(socket, true).map_err(|source| ServerError::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
        let backend = Arc::new(FsBackend {
            server: Server::new(Arc::new(vfs)),
            mem: RwLock::new(None),
            event_idx: std::sync::atomic::AtomicBool::new(false),
        });
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServerError::Daemon(e.to_string()))?;
        let thread = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || {
                if let Err(e) = daemon.start(&mut listener) {
                    tracing::warn!(error = %e, "virtio-fs front-end did not connect");
                    return;
                }
                match daemon.wait() {
                    Ok(()) => tracing::debug!("virtio-fs front-end disconnected"),
                    Err(e) => tracing::debug!(error = %e, "virtio-fs session ended"),
                }
            })
            .map_err(ServerError::Thread)?;
        Ok(FsServer {
            socket: socket.to_path_buf(),
            thread: Some(thread),
        })
    }

    /// Ends the server (after the VM is down) and removes its socket.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
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
                tracing::warn!("virtio-fs server thread did not end; leaving it behind");
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

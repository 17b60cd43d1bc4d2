//! The host channel over virtio-serial: the owner's end of the multiplexed stream channel
//! that replaces vsock when [`Channel::Serial`] is selected.
//!
//! QEMU gets `-device virtio-serial-device -chardev socket,id=chan,path=<vm dir>/chan.sock
//! -device virtserialport,chardev=chan,name=matchlock.0`; the guest agent opens that port and
//! both ends speak [`matchlock_guest_proto::mux`] over it. Host-to-guest streams are opened by
//! [`HostChannel::open`] (behind `Machine::connect`); guest-to-host streams to port P are
//! connected to the unix socket `<vm dir>/vsock.sock_<P>`, where the hybrid-vsock backend
//! delivered them, so the sandbox's ready listener is the same for both transports.
//!
//! # Design
//! - **The owner listens, QEMU connects** (`-chardev socket` without `server=on`): the socket
//!   exists before QEMU starts, QEMU connects during its start-up (no polling for QEMU's
//!   socket, no window where the guest writes into an unconnected chardev), and a restored
//!   VM's new QEMU process connects to the same kind of listener the same way, where the
//!   owner then starts a new mux session (the guest agent keeps its port open across it).
//! - No helper process: the chardev is served by QEMU itself (no `vhost-device-vsock`).
//! - Guest frames are hostile: the mux bounds frames, streams and per-stream buffering (see
//!   its docs); a guest open of a port nobody listens on is refused, and the connection to a
//!   listener is made non-blocking so a full backlog refuses instead of stalling the channel.
//!
//! # Limitations
//! One session per QEMU process: when QEMU disconnects, every stream is reset and the
//! listener is closed (a snapshot restore is a new QEMU process with its own listener, see
//! docs/snapshots.md; the restored guest gets the new session's streams). A guest that
//! never reads the channel can stall the owner's writes to it (its own sandbox only).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use matchlock_guest_proto::mux::{Mux, MuxRole};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::hybrid;

/// The channel socket's name inside the VM's state directory.
pub const CHAN_SOCKET: &str = "chan.sock";
/// The QEMU chardev id of the channel.
const CHARDEV_ID: &str = "chan";
/// How long QEMU may take to connect after it was spawned.
const QEMU_CONNECT: Duration = Duration::from_secs(30);
/// Poll period of the accept loop.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// The developer setting that selects the channel (read only by [`Channel::from_env`]).
pub const CHANNEL_ENV: &str = "MATCHLOCK_DEV_CHANNEL";

/// The transport of the host<->guest channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Channel {
    /// vhost-user-vsock served by `vhost-device-vsock` (`MATCHLOCK_DEV_CHANNEL=vsock`, kept
    /// for comparison and tests; cannot be snapshotted).
    Vsock,
    /// A multiplexed virtio-serial port on a unix-socket chardev (migratable; no helper).
    /// The default.
    #[default]
    Serial,
}

/// An unknown value of [`CHANNEL_ENV`].
#[derive(Debug, thiserror::Error)]
#[error("{CHANNEL_ENV}={value:?} is not a channel (expected `vsock` or `serial`)")]
pub struct ParseChannelError {
    pub value: String,
}

impl Channel {
    /// The channel chosen by the developer knob [`CHANNEL_ENV`] (unset or empty: serial).
    pub fn from_env() -> Result<Self, ParseChannelError> {
        match std::env::var(CHANNEL_ENV) {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(Self::Serial),
        }
    }

    fn parse(v: &str) -> Result<Self, ParseChannelError> {
        match v {
            "vsock" => Ok(Self::Vsock),
            "" | "serial" => Ok(Self::Serial),
            other => Err(ParseChannelError {
                value: other.to_owned(),
            }),
        }
    }
}

/// QEMU arguments of the channel device on `socket`.
pub(crate) fn qemu_args(socket: &str) -> [String; 6] {
    [
        "-device".into(),
        "virtio-serial-device,max_ports=2".into(),
        "-chardev".into(),
        format!("socket,id={CHARDEV_ID},path={socket}"),
        "-device".into(),
        format!(
            "virtserialport,chardev={CHARDEV_ID},name={}",
            matchlock_guest_proto::mux::PORT_NAME
        ),
    ]
}

/// The owner's end of one VM's channel.
pub struct HostChannel {
    mux: Mux,
    closed: Arc<AtomicBool>,
}

impl HostChannel {
    /// Binds `<state_dir>/chan.sock` (QEMU connects to it) and serves the first connection
    /// on a thread. Guest opens of port P go to `<vsock_base>_<P>`.
    pub fn listen(state_dir: &Path, vsock_base: PathBuf) -> io::Result<Self> {
        let path = state_dir.join(CHAN_SOCKET);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        let mux = Mux::new(
            MuxRole::Host,
            "host",
            Some(Box::new(move |port| {
                connect_nonblocking(&hybrid::listener_path(&vsock_base, port))
            })),
        );
        let closed = Arc::new(AtomicBool::new(false));
        let (m, c) = (mux.clone(), Arc::clone(&closed));
        thread::Builder::new()
            .name("host-chan".into())
            .spawn(move || serve(&listener, &m, &c))?;
        Ok(Self { mux, closed })
    }

    /// Opens a stream to guest `port` (see [`Mux::open`]).
    pub fn open(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        self.mux.open(port, timeout)
    }

    /// Stops waiting for QEMU and resets every stream.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.mux.end_session();
    }
}

impl Drop for HostChannel {
    fn drop(&mut self) {
        self.close();
    }
}

/// Accepts QEMU's connection and serves it until it ends.
fn serve(listener: &UnixListener, mux: &Mux, closed: &AtomicBool) {
    let deadline = Instant::now() + QEMU_CONNECT;
    let conn = loop {
        if closed.load(Ordering::Acquire) {
            return;
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(ACCEPT_POLL);
            }
            Err(e) => {
                tracing::warn!(error = %e, "QEMU did not connect to the host channel");
                return;
            }
        }
    };
    let writer = match conn.set_nonblocking(false).and_then(|()| conn.try_clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "host channel socket setup failed");
            return;
        }
    };
    match mux.run_session(conn, Box::new(writer)) {
        Ok(frames) => tracing::debug!(frames, "host channel closed by QEMU"),
        Err(e) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            tracing::error!(error = %e, cause = ?cause, "host channel ended: invalid frame from the guest");
        }
    }
    mux.end_session();
}

/// Connects to a listening unix socket without blocking on a full backlog; `None` if
/// nothing accepts there now.
fn connect_nonblocking(path: &Path) -> Option<UnixStream> {
    let addr = UnixAddr::new(path).ok()?;
    let raw = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    let fd: OwnedFd = raw;
    socket::connect(fd.as_raw_fd(), &addr).ok()?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).ok()?;
    Some(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn parses_the_knob() {
        assert_eq!(Channel::parse("").expect("empty"), Channel::Serial);
        assert_eq!(Channel::default(), Channel::Serial);
        assert_eq!(Channel::parse("vsock").expect("vsock"), Channel::Vsock);
        assert_eq!(Channel::parse("serial").expect("serial"), Channel::Serial);
        assert!(Channel::parse("virtio").is_err());
    }

    /// A fake QEMU+guest: connects to chan.sock and runs a guest mux that echoes port 5000;
    /// the guest also opens port 5002, which must arrive at `vsock.sock_5002`.
    #[test]
    fn host_channel_end_to_end_without_a_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("vsock.sock");
        let ready = UnixListener::bind(hybrid::listener_path(&base, 5002)).expect("bind ready");
        let chan = HostChannel::listen(dir.path(), base).expect("listen");
        let s = UnixStream::connect(dir.path().join(CHAN_SOCKET)).expect("connect");
        let guest = Mux::new(MuxRole::Guest, "guest", None);
        let rx = guest.listen(5000);
        let g = guest.clone();
        let w = s.try_clone().expect("clone");
        thread::spawn(move || g.run_session(s, Box::new(w)));
        thread::spawn(move || {
            for mut c in rx {
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).expect("read");
                c.write_all(&buf).expect("write");
            }
        });
        let mut c = chan.open(5000, Duration::from_secs(5)).expect("open");
        c.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");

        let mut up = guest
            .open(5002, Duration::from_secs(5))
            .expect("guest open");
        let (mut h, _) = ready.accept().expect("accept");
        up.write_all(b"helo").expect("write");
        h.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"helo");
        drop(ready);
        let err = guest
            .open(5003, Duration::from_secs(5))
            .expect_err("nothing listens on 5003");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}

//! The stack's end of the guest NIC: QEMU's `-netdev stream` on a unix stream socket, with
//! each Ethernet frame sent as a 4-byte big-endian length and the frame.
//!
//! # Design
//! The stack listens on its socket before QEMU starts, and QEMU (`server=off`) connects to
//! it. Compared with `-netdev dgram` (one datagram, one system call and one loop wake-up
//! per frame each way, and the kernel's `net.unix.max_dgram_qlen`, 10 on Debian, capping the
//! frames in flight between QEMU and the stack, so a descheduled stack thread stalled the
//! guest NIC after 10 frames), one read here takes every frame QEMU has written since the
//! last one (up to [`READ_BUF`]) and one write hands QEMU every frame the stack has queued
//! (up to [`WRITE_BUF`]); the socket buffer, not a datagram count, bounds what is in flight.
//!
//! The length in front of each frame is guest-controlled (QEMU forwards whatever buffer the
//! guest NIC posts). Frames are parsed in place from a fixed read buffer, and a length
//! above the link's largest frame (MTU + Ethernet header + one VLAN tag) closes the link
//! with a logged error; it is never allocated. After such an error no new connection is
//! accepted: the guest has lost its network, and nothing else.
//!
//! # Limitations
//! One connection at a time: a second one waits until the first is gone. QEMU 7.2 does not
//! reconnect, so a link QEMU closed stays down. Frames the stack sends while QEMU is not
//! connected are dropped, as on an unplugged wire.

use std::collections::VecDeque;
use std::io;

use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// Bytes read from QEMU at most per read (about 43 full 1500-byte frames).
pub(crate) const READ_BUF: usize = 64 * 1024;
/// Serialized frames waiting for QEMU's socket at most; more stay in the stack's queue.
pub(crate) const WRITE_BUF: usize = 256 * 1024;
/// Bytes of each frame's length prefix.
const HEADER: usize = 4;
/// Ethernet header plus one 802.1Q tag.
const L2_HEADERS: usize = 14 + 4;

/// What woke the link up.
pub(crate) enum LinkReady {
    /// QEMU connected.
    Accepted(UnixStream),
    /// The connection is readable or writable (or closed): [`Link::next_frame`] and
    /// [`Link::send`] find out without waiting.
    Io,
    /// Accepting or polling failed.
    Failed(io::Error),
}

/// The stream to QEMU and its read and write buffers.
pub(crate) struct Link {
    listener: UnixListener,
    stream: Option<UnixStream>,
    max_frame: usize,
    rbuf: Box<[u8]>,
    /// Unparsed bytes are `rbuf[rstart..rend]`.
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    woff: usize,
    /// A framing error closed the link for good.
    failed: bool,
}

impl Link {
    /// The link on a bound, non-blocking listener, for frames of at most `mtu` IP bytes.
    /// Must be called inside the stack's runtime.
    pub(crate) fn new(listener: std::os::unix::net::UnixListener, mtu: u16) -> io::Result<Link> {
        Ok(Link {
            listener: UnixListener::from_std(listener)?,
            stream: None,
            max_frame: usize::from(mtu) + L2_HEADERS,
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            wbuf: Vec::new(),
            woff: 0,
            failed: false,
        })
    }

    /// Waits until QEMU connects or, once connected, until the stream is readable (or also
    /// writable when `want_write`). Never resolves after a framing error.
    pub(crate) async fn ready(&self, want_write: bool) -> LinkReady {
        match &self.stream {
            None if self.failed => std::future::pending().await,
            None => match self.listener.accept().await {
                Ok((s, _)) => LinkReady::Accepted(s),
                Err(e) => LinkReady::Failed(e),
            },
            Some(s) => {
                let interest = if want_write {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                match s.ready(interest).await {
                    Ok(_) => LinkReady::Io,
                    Err(e) => LinkReady::Failed(e),
                }
            }
        }
    }

    /// Takes QEMU's connection, unless one is up already or the link failed.
    pub(crate) fn attach(&mut self, stream: UnixStream) {
        if self.stream.is_some() || self.failed {
            tracing::warn!("second connection to the network stack socket refused");
            return;
        }
        tracing::debug!("QEMU connected to the network stack");
        self.stream = Some(stream);
        self.rstart = 0;
        self.rend = 0;
        self.wbuf.clear();
        self.woff = 0;
    }

    /// Whether a whole frame (or a length that will close the link) is buffered, so the
    /// loop has work without waiting for the socket.
    pub(crate) fn has_frame(&self) -> bool {
        match self.buffered_len() {
            Some(len) => len > self.max_frame || self.rend - self.rstart >= HEADER + len,
            None => false,
        }
    }

    /// The length prefix at the read position, if all of it is buffered.
    fn buffered_len(&self) -> Option<usize> {
        let h = self.rbuf.get(self.rstart..self.rstart + HEADER)?;
        if self.rend - self.rstart < HEADER {
            return None;
        }
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        Some(usize::try_from(len).unwrap_or(usize::MAX))
    }

    /// The next frame from QEMU: buffered, or read now if the socket has more; `None`
    /// when nothing whole is there yet, the link is down, or it was just closed.
    pub(crate) fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(len) = self.buffered_len() {
                if len > self.max_frame {
                    tracing::error!(
                        len,
                        max = self.max_frame,
                        "guest frame longer than the link allows: network link closed"
                    );
                    self.failed = true;
                    self.close();
                    return None;
                }
                let start = self.rstart + HEADER;
                if self.rend >= start + len {
                    self.rstart = start + len;
                    let frame = self.rbuf.get(start..start + len).map(<[u8]>::to_vec);
                    if len == 0 {
                        continue;
                    }
                    return frame;
                }
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Moves the unparsed bytes to the front and reads more; false when nothing was read.
    fn fill(&mut self) -> bool {
        let Some(s) = &self.stream else {
            return false;
        };
        if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let Some(free) = self.rbuf.get_mut(self.rend..) else {
            return false;
        };
        match s.try_read(free) {
            Ok(0) => {
                tracing::info!("QEMU closed the network link");
                self.close();
                false
            }
            Ok(n) => {
                self.rend += n;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::warn!(error = %e, "network link read failed: link closed");
                self.close();
                false
            }
        }
    }

    /// Whether serialized frames are still waiting for QEMU's socket.
    pub(crate) fn pending_out(&self) -> bool {
        self.woff < self.wbuf.len()
    }

    /// Writes the queued frames to QEMU, as many as its socket takes now; the rest stay
    /// queued. Without a connection they are dropped.
    pub(crate) fn send(&mut self, tx: &mut VecDeque<Vec<u8>>) {
        let Some(s) = &self.stream else {
            tx.clear();
            return;
        };
        loop {
            if self.woff > 0 {
                self.wbuf.drain(..self.woff);
                self.woff = 0;
            }
            while self.wbuf.len() < WRITE_BUF {
                let Some(frame) = tx.pop_front() else { break };
                // Frames come from smoltcp or the stack's own builders: at most an MTU.
                let Ok(len) = u32::try_from(frame.len()) else {
                    continue;
                };
                self.wbuf.extend_from_slice(&len.to_be_bytes());
                self.wbuf.extend_from_slice(&frame);
            }
            let Some(out) = self.wbuf.get(self.woff..).filter(|o| !o.is_empty()) else {
                return;
            };
            match s.try_write(out) {
                Ok(n) => self.woff += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::info!(error = %e, "network link write failed: link closed");
                    self.close();
                    tx.clear();
                    return;
                }
            }
        }
    }

    fn close(&mut self) {
        self.stream = None;
        self.rstart = 0;
        self.rend = 0;
        self.wbuf.clear();
        self.woff = 0;
    }
}

/// The guest's NIC either way: QEMU's stream ([`Link`]) or the vhost-user queues
/// ([`crate::vhost::VhostLink`]).
pub(crate) enum NetLink {
    Stream(Link),
    Vhost(crate::vhost::VhostLink),
}

impl NetLink {
    /// See [`Link::ready`]; the vhost-user link resolves when its backend has frames for
    /// the stack or room for more of the stack's.
    pub(crate) async fn ready(&self, want_write: bool) -> LinkReady {
        match self {
            NetLink::Stream(l) => l.ready(want_write).await,
            NetLink::Vhost(v) => {
                v.ready().await;
                LinkReady::Io
            }
        }
    }

    pub(crate) fn attach(&mut self, stream: UnixStream) {
        match self {
            NetLink::Stream(l) => l.attach(stream),
            NetLink::Vhost(_) => tracing::warn!("stream connection to a vhost-user link refused"),
        }
    }

    pub(crate) fn has_frame(&self) -> bool {
        match self {
            NetLink::Stream(l) => l.has_frame(),
            NetLink::Vhost(v) => v.has_frame(),
        }
    }

    pub(crate) fn next_frame(&mut self) -> Option<Vec<u8>> {
        match self {
            NetLink::Stream(l) => l.next_frame(),
            NetLink::Vhost(v) => v.next_frame(),
        }
    }

    /// Whether frames already taken from the stack's queue still wait for the link.
    pub(crate) fn pending_out(&self) -> bool {
        match self {
            NetLink::Stream(l) => l.pending_out(),
            NetLink::Vhost(_) => false,
        }
    }

    pub(crate) fn send(&mut self, tx: &mut VecDeque<Vec<u8>>) {
        match self {
            NetLink::Stream(l) => l.send(tx),
            NetLink::Vhost(v) => v.send(tx),
        }
    }
}

//! A relay between QEMU and the vhost-user-net backend that holds back the rings' enable
//! messages QEMU 7.2 sends before it has negotiated features.
//!
//! # Design
//! QEMU 7.2's virtio-net sends `VHOST_USER_SET_VRING_ENABLE` as soon as the guest driver
//! acknowledges its features (`peer_attach`), long before `vhost_dev_start` sends
//! `VHOST_USER_SET_FEATURES`; and it refuses to start vhost-user-net at all unless the
//! backend offers `VHOST_USER_F_PROTOCOL_FEATURES`. The `vhost` crate (rightly, by the
//! specification) rejects `SET_VRING_ENABLE` while that feature is not acknowledged and ends
//! the session. This relay passes every message through unchanged (with its file
//! descriptors) except those early enables: it keeps the last state per ring and sends them
//! right after the first `SET_FEATURES`, which is the order the specification requires.
//! Replies go back byte for byte. Only the negotiation passes through here; the frames move
//! through shared memory and eventfds, not this socket.
//!
//! The messages come from QEMU (trusted less than the owner, but not guest-controlled):
//! a payload is bounded by [`MAX_PAYLOAD`] and at most [`MAX_FDS`] descriptors are taken per
//! message; anything else ends the session.
//!
//! # Limitations
//! An enable message that asks for a reply (`NEED_REPLY`, only with `REPLY_ACK`, which the
//! backend does not offer) is passed through as is.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// `NEED_REPLY` in a header's flags.
const NEED_REPLY: u32 = 1 << 3;
/// Request, flags and payload size.
const HDR: usize = 12;
/// Largest payload relayed (a memory table of 8 regions is 264 bytes).
const MAX_PAYLOAD: usize = 4096;
/// Most descriptors relayed with one message (the protocol's maximum).
const MAX_FDS: usize = 8;

/// Descriptors received with a message, closed when dropped (after they were relayed: the
/// backend has its own copies then).
#[derive(Default)]
struct Fds(Vec<RawFd>);

impl Drop for Fds {
    fn drop(&mut self) {
        for fd in self.0.drain(..) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// One message from QEMU.
struct Msg {
    hdr: [u8; HDR],
    payload: Vec<u8>,
    fds: Fds,
}

impl Msg {
    fn code(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
}

/// Relays `qemu` <-> `backend` until either side closes; then shuts both down.
pub(crate) fn relay(qemu: UnixStream, backend: UnixStream) {
    let (Ok(q2), Ok(b2)) = (qemu.try_clone(), backend.try_clone()) else {
        tracing::warn!("vhost-user-net relay: cannot clone its sockets");
        return;
    };
    let back = std::thread::Builder::new()
        .name("matchlock-vnet-reply".into())
        .spawn(move || {
            let (mut from, mut to) = (b2, q2);
            let _ = io::copy(&mut from, &mut to);
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    if let Err(e) = forward(&qemu, &backend) {
        tracing::debug!(error = %e, "vhost-user-net relay ended");
    }
    let _ = qemu.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

/// QEMU -> backend, holding early ring enables until the first `SET_FEATURES`.
fn forward(qemu: &UnixStream, backend: &UnixStream) -> io::Result<()> {
    let mut features_set = false;
    let mut held: BTreeMap<[u8; 4], Msg> = BTreeMap::new();
    loop {
        let Some(msg) = recv(qemu)? else {
            return Ok(());
        };
        let code = msg.code();
        if code == SET_VRING_ENABLE && !features_set && msg.flags() & NEED_REPLY == 0 {
            // The payload is the ring index (u32) and the state; keep the last per ring.
            let mut ring = [0u8; 4];
            if let Some(r) = msg.payload.get(..4) {
                ring.copy_from_slice(r);
            }
            held.insert(ring, msg);
            continue;
        }
        send(backend, &msg)?;
        if code == SET_FEATURES && !features_set {
            features_set = true;
            for m in std::mem::take(&mut held).into_values() {
                send(backend, &m)?;
            }
        }
    }
}

/// The next message, or `None` at end of stream.
fn recv(sock: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut hdr)];
        let m = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Fds::default();
        for c in m.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds.0.extend(v);
            }
        }
        (m.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    let mut r = sock;
    if let Some(rest) = hdr.get_mut(n..) {
        r.read_exact(rest)?;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!(
            "vhost-user message payload of {size} bytes"
        )));
    }
    let mut payload = vec![0; size];
    r.read_exact(&mut payload)?;
    Ok(Some(Msg { hdr, payload, fds }))
}

fn send(sock: &UnixStream, m: &Msg) -> io::Result<()> {
    let raw = &m.fds.0;
    let cmsg = [ControlMessage::ScmRights(raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(&m.hdr), IoSlice::new(&m.payload)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    // A short send on a stream socket: the rest goes without the descriptors (sent once).
    let total = HDR + m.payload.len();
    if n < total {
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&m.hdr);
        all.extend_from_slice(&m.payload);
        let mut w = sock;
        if let Some(rest) = all.get(n..) {
            w.write_all(rest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(code: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&u32::try_from(payload.len()).expect("len").to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn read_msg(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut hdr = [0u8; HDR];
        s.read_exact(&mut hdr).expect("header");
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut p = vec![0; size];
        s.read_exact(&mut p).expect("payload");
        (u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]), p)
    }

    /// QEMU 7.2's order (ring enables before SET_FEATURES) reaches the backend in the
    /// specification's order, the last state per ring; later enables pass at once; replies
    /// come back unchanged; descriptors travel with their message.
    #[test]
    fn early_ring_enables_follow_set_features() {
        let (mut qemu, relay_q) = UnixStream::pair().expect("pair");
        let (relay_b, mut backend) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || relay(relay_q, relay_b));
        let ring = |i: u32, on: u32| [i.to_le_bytes(), on.to_le_bytes()].concat();
        qemu.write_all(&msg(1, &[])).expect("GET_FEATURES");
        qemu.write_all(&msg(SET_VRING_ENABLE, &ring(0, 0)))
            .expect("enable");
        qemu.write_all(&msg(SET_VRING_ENABLE, &ring(0, 1)))
            .expect("enable");
        qemu.write_all(&msg(SET_VRING_ENABLE, &ring(1, 1)))
            .expect("enable");
        // SET_VRING_KICK with an eventfd-like descriptor: a pipe's read end.
        let (r, mut w) = std::io::pipe().expect("pipe");
        let kick = msg(12, &1u64.to_le_bytes());
        let fds = [r.as_raw_fd()];
        sendmsg::<()>(
            qemu.as_raw_fd(),
            &[IoSlice::new(&kick)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("send kick");
        drop(r);
        qemu.write_all(&msg(SET_FEATURES, &(1u64 << 30).to_le_bytes()))
            .expect("features");
        qemu.write_all(&msg(SET_VRING_ENABLE, &ring(1, 0)))
            .expect("enable");

        assert_eq!(read_msg(&mut backend).0, 1);
        // The kick message, with a working copy of the descriptor.
        let mut hdr = [0u8; HDR];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let got = {
            let mut iov = [IoSliceMut::new(&mut hdr)];
            let m = recvmsg::<()>(
                backend.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .expect("recvmsg");
            let mut fds = Vec::new();
            for c in m.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(v) = c {
                    fds.extend(v);
                }
            }
            fds
        };
        assert_eq!(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]), 12);
        let mut p = [0u8; 8];
        backend.read_exact(&mut p).expect("kick payload");
        assert_eq!(got.len(), 1, "the descriptor travels with its message");
        w.write_all(b"k").expect("write pipe");
        let mut b = [0u8; 1];
        let n = nix::unistd::read(got[0], &mut b).expect("read passed fd");
        assert_eq!((n, b[0]), (1, b'k'));
        let _ = nix::unistd::close(got[0]);

        assert_eq!(read_msg(&mut backend).0, SET_FEATURES);
        assert_eq!(read_msg(&mut backend), (SET_VRING_ENABLE, ring(0, 1)));
        assert_eq!(read_msg(&mut backend), (SET_VRING_ENABLE, ring(1, 1)));
        assert_eq!(read_msg(&mut backend), (SET_VRING_ENABLE, ring(1, 0)));

        backend
            .write_all(&msg(1, &7u64.to_le_bytes()))
            .expect("reply");
        assert_eq!(read_msg(&mut qemu), (1, 7u64.to_le_bytes().to_vec()));
        drop(qemu);
        t.join().expect("relay ends when QEMU closes");
        let mut rest = Vec::new();
        backend
            .read_to_end(&mut rest)
            .expect("backend sees the end");
        assert!(rest.is_empty());
    }

    /// A payload size beyond the bound ends the session without allocating it.
    #[test]
    fn oversized_payload_ends_the_session() {
        let (mut qemu, relay_q) = UnixStream::pair().expect("pair");
        let (relay_b, mut backend) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || relay(relay_q, relay_b));
        let mut m = msg(5, &[]);
        m[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        qemu.write_all(&m).expect("write");
        t.join().expect("relay ends");
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).expect("closed");
        assert!(rest.is_empty(), "nothing relayed");
    }
}

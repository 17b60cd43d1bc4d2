//! The boot handshake over the virtio-serial channel, which survives a snapshot restore.
//!
//! # Design
//! A snapshot is taken while the guest waits for `BootConfig` after sending `Hello` on its
//! ready stream (docs/snapshots.md). A restored VM resumes right there, but its new owner
//! runs a new mux session that knows nothing of that stream: the chardev reconnects before
//! the guest runs again, so the guest sees no end of session and the old stream simply
//! never gets an answer. So before dialing, the guest also listens on [`READY_PORT`] for
//! streams the *host* opens: a restoring owner opens one, the guest sends `Hello` again on
//! it and takes its `BootConfig` from there. A cold-booted owner never opens one and the
//! `BootConfig` arrives on the dialed stream as before. Whichever comes first wins; a
//! failed read of the dialed stream (its session ended) keeps waiting for a host-opened
//! stream until [`RESUME_WAIT`].
//!
//! # Limitations
//! One idle thread stays in PID 1 for the life of the VM: after a cold boot the one waiting
//! for a host-opened stream (the ready port stays listened on; only the host can open
//! streams), after a restore the one reading the old stream.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

#[cfg(doc)]
use matchlock_guest_proto::READY_PORT;
use matchlock_guest_proto::{
    read_frame_required, write_frame, BootConfig, Frame, FrameType, Hello, ProtoError,
    PROTOCOL_VERSION,
};

/// How long to wait for a host-opened ready stream once the dialed one has failed. Longer
/// than the host gives a restored guest to answer (15 s once the restored VM runs), so the
/// host, which can fall back to a cold boot, always decides:
/// with 10 s, a restored guest on an overloaded host (64 restores at once on 2 cores) gave up
/// and powered off while its owner was still opening the stream.
pub const RESUME_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("sending hello")]
    Hello(#[source] ProtoError),
    #[error("reading the boot config")]
    ReadConfig(#[source] ProtoError),
    #[error("duplicating the ready stream")]
    Clone(#[source] std::io::Error),
    #[error("starting the boot config reader")]
    Thread(#[source] std::io::Error),
    #[error("the ready stream ended and no new host session opened one within {RESUME_WAIT:?}")]
    NoHost,
}

/// What the boot wait hears first.
enum Event {
    Config(Box<Result<BootConfig, ProtoError>>),
    Fresh(UnixStream),
}

/// Sends `Hello` on a boot stream.
pub fn send_hello(conn: &mut impl std::io::Write) -> Result<(), ProtoError> {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    write_frame(conn, &Frame::json(FrameType::Hello, &hello)?)
}

/// Reads the `BootConfig` frame of a boot stream.
pub fn read_config(conn: &mut impl std::io::Read) -> Result<BootConfig, ProtoError> {
    read_frame_required(conn).and_then(|f| f.expect(FrameType::BootConfig, "boot config"))
}

/// Sends `Hello` on `dialed` and returns the `BootConfig` with the stream it came on:
/// `dialed`, or a stream a restoring host opened (arriving on `fresh`).
pub fn handshake(
    mut dialed: UnixStream,
    fresh: Receiver<UnixStream>,
) -> Result<(BootConfig, UnixStream, bool), ResumeError> {
    send_hello(&mut dialed).map_err(ResumeError::Hello)?;
    let mut reader = dialed.try_clone().map_err(ResumeError::Clone)?;
    let (tx, rx) = mpsc::channel();
    let config_tx = tx.clone();
    std::thread::Builder::new()
        .name("boot-config".into())
        .spawn(move || {
            let _ = config_tx.send(Event::Config(Box::new(read_config(&mut reader))));
        })
        .map_err(ResumeError::Thread)?;
    std::thread::Builder::new()
        .name("boot-resume".into())
        .spawn(move || {
            if let Ok(s) = fresh.recv() {
                let _ = tx.send(Event::Fresh(s));
            }
        })
        .map_err(ResumeError::Thread)?;
    let mut dialed_failed = None;
    loop {
        let event = match dialed_failed {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(_) => rx.recv_timeout(RESUME_WAIT),
        };
        match event {
            Ok(Event::Config(r)) => match *r {
                Ok(cfg) => return Ok((cfg, dialed, false)),
                Err(e) => dialed_failed = Some(e),
            },
            Ok(Event::Fresh(mut s)) => {
                // Not the word "ready" between spaces: the console's ` ready ` line is the
                // boot's `Ready` (e2e_guest_timer orders the timer check before it).
                tracing::info!("host opened a new boot stream (restored VM)");
                send_hello(&mut s).map_err(ResumeError::Hello)?;
                let cfg = read_config(&mut s).map_err(ResumeError::ReadConfig)?;
                return Ok((cfg, s, true));
            }
            Err(_) => {
                return Err(match dialed_failed {
                    Some(e) => ResumeError::ReadConfig(e),
                    None => ResumeError::NoHost,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(host: &str) -> Frame {
        let cfg = BootConfig {
            hostname: host.into(),
            ..serde_json::from_str("{\"hostname\":\"x\"}").expect("cfg")
        };
        Frame::json(FrameType::BootConfig, &cfg).expect("frame")
    }

    #[test]
    fn cold_boot_config_arrives_on_the_dialed_stream() {
        let (guest, mut host) = UnixStream::pair().expect("pair");
        let (_keep, fresh) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let hello = read_frame_required(&mut host).expect("hello");
            assert_eq!(hello.kind, FrameType::Hello);
            write_frame(&mut host, &config("cold")).expect("cfg");
            host
        });
        let (cfg, _, restored) = handshake(guest, fresh).expect("handshake");
        assert_eq!(cfg.hostname, "cold");
        assert!(!restored);
        drop(h.join());
    }

    #[test]
    fn a_host_opened_stream_wins_after_restore() {
        let (guest, _old_host_never_answers) = UnixStream::pair().expect("pair");
        let (tx, fresh) = mpsc::channel();
        let (g2, mut h2) = UnixStream::pair().expect("pair");
        tx.send(g2).expect("send");
        let h = std::thread::spawn(move || {
            let hello = read_frame_required(&mut h2).expect("hello again");
            assert_eq!(hello.kind, FrameType::Hello);
            write_frame(&mut h2, &config("restored")).expect("cfg");
            h2
        });
        let (cfg, _, restored) = handshake(guest, fresh).expect("handshake");
        assert_eq!(cfg.hostname, "restored");
        assert!(restored);
        drop(h.join());
    }

    #[test]
    fn a_dead_dialed_stream_without_a_new_host_fails() {
        let (guest, host) = UnixStream::pair().expect("pair");
        drop(host);
        let (tx, fresh) = mpsc::channel::<UnixStream>();
        drop(tx);
        let e = handshake(guest, fresh).expect_err("fails");
        assert!(
            matches!(e, ResumeError::ReadConfig(_) | ResumeError::Hello(_)),
            "{e}"
        );
    }
}

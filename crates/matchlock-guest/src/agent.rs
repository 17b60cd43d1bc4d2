//! The service agent: accepts host connections and dispatches each on its first frame.
//!
//! # Design
//! One thread per connection (a parked one from [`crate::pool`] when free), one request per
//! connection (see the protocol crate). The
//! dispatcher is generic over [`Conn`] so tests drive it over `UnixStream::pair()`; only
//! [`serve`] knows about vsock, and [`serve_streams`] takes the streams of the virtio-serial
//! host channel (`hostchan`), whose only peer is the host by construction. Power-off is a callback supplied by `init`, so the agent
//! itself never reboots the machine (and tests can observe the request).
//!
//! Only the host may connect: [`serve`] closes any connection whose peer CID is not
//! [`HOST_CID`] before reading a byte, and logs it. The guest kernel has no vsock loopback
//! transport and unprivileged commands cannot open `AF_VSOCK` sockets (seccomp), so this is
//! the last of three layers; it is what stops a `--privileged` command (or a sibling VM)
//! that reaches the listener through the device with the guest's own CID.
//!
//! # Limitations
//! No limit on concurrent connections: the host is trusted to pace itself. The peer CID is
//! what the vsock device reports; the device (on the host) is trusted.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use matchlock_guest_proto::{
    read_frame, write_frame, ExecRequest, Frame, FrameType, PathRequest, PortForwardRequest,
    ProtoError, WriteFileRequest,
};

use crate::conn::Conn;
use crate::exec::{self, ExecContext};
use crate::{files, forward};

/// Shared agent state.
pub struct Agent {
    pub exec: ExecContext,
    /// Called after `Shutdown` was answered `Ok`; in the VM it powers off and never returns.
    pub on_shutdown: Box<dyn Fn() + Send + Sync>,
}

impl Agent {
    /// Root used for user lookups in file ownership.
    fn root(&self) -> &PathBuf {
        &self.exec.root
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading the request frame")]
    ReadRequest(#[source] ProtoError),
    #[error("decoding the request")]
    Decode(#[source] ProtoError),
    #[error("sending the reply")]
    Reply(#[source] ProtoError),
    #[error("exec session")]
    Exec(#[source] exec::ExecError),
    #[error("file session")]
    File(#[source] files::FileError),
    #[error("port-forward session")]
    Forward(#[source] forward::ForwardError),
}

fn reply_error<C: Conn>(conn: &mut C, msg: String) -> Result<(), AgentError> {
    write_frame(conn, &Frame::new(FrameType::Error, msg.into_bytes())).map_err(AgentError::Reply)
}

/// Serves one connection: reads the first frame and runs the matching session.
#[cfg(test)]
pub fn handle<C: Conn>(conn: C, agent: &Agent) -> Result<(), AgentError> {
    handle_accepted(conn, agent, Instant::now())
}

/// [`handle`] for a connection the agent took at `accepted` (the start of an exec's
/// timeline, see [`exec::Timeline`]).
fn handle_accepted<C: Conn>(
    mut conn: C,
    agent: &Agent,
    accepted: Instant,
) -> Result<(), AgentError> {
    let mut timeline = exec::Timeline::new(accepted);
    let Some(first) = read_frame(&mut conn).map_err(AgentError::ReadRequest)? else {
        return Ok(());
    };
    match first.kind {
        FrameType::Exec => match first.parse::<ExecRequest>("exec") {
            Ok(req) => {
                timeline.requested();
                exec::run(conn, req, &agent.exec, timeline).map_err(AgentError::Exec)
            }
            Err(e) => reply_error(&mut conn, format!("bad exec request: {e}")),
        },
        FrameType::WriteFile => match first.parse::<WriteFileRequest>("write file") {
            Ok(req) => files::write_file(&mut conn, &req, agent.root()).map_err(AgentError::File),
            Err(e) => reply_error(&mut conn, format!("bad write-file request: {e}")),
        },
        FrameType::ReadFile => {
            let req: PathRequest = first.parse("read file").map_err(AgentError::Decode)?;
            files::read_file(&mut conn, &req).map_err(AgentError::File)
        }
        FrameType::ListFiles => {
            let req: PathRequest = first.parse("list files").map_err(AgentError::Decode)?;
            files::list_files(&mut conn, &req).map_err(AgentError::File)
        }
        FrameType::PortForward => match first.parse::<PortForwardRequest>("port forward") {
            Ok(req) => forward::run(conn, &req).map_err(AgentError::Forward),
            Err(e) => reply_error(&mut conn, format!("bad port-forward request: {e}")),
        },
        FrameType::Ping => {
            // Echo every Ping on this connection until the host closes it.
            let mut ping = first;
            loop {
                let pong = Frame::new(FrameType::Pong, std::mem::take(&mut ping.payload));
                write_frame(&mut conn, &pong).map_err(AgentError::Reply)?;
                match read_frame(&mut conn).map_err(AgentError::ReadRequest)? {
                    None => return Ok(()),
                    Some(f) if f.kind == FrameType::Ping => ping = f,
                    Some(f) => {
                        return reply_error(
                            &mut conn,
                            format!("unexpected {:?} after Ping", f.kind),
                        )
                    }
                }
            }
        }
        FrameType::Shutdown => {
            write_frame(&mut conn, &Frame::empty(FrameType::Ok)).map_err(AgentError::Reply)?;
            drop(conn);
            tracing::info!("shutdown requested");
            (agent.on_shutdown)();
            Ok(())
        }
        other => reply_error(&mut conn, format!("unexpected first frame {other:?}")),
    }
}

/// The CID `vhost-device-vsock` (like the kernel's vhost-vsock) puts as the source of every
/// host-initiated connection. Anything else reached the listener from inside the VM (its own
/// CID through the device) or from a sibling VM.
pub const HOST_CID: u32 = 2;

/// Whether a connection from `peer_cid` may talk to the agent: only the host may.
pub fn admits(peer_cid: u32) -> bool {
    peer_cid == HOST_CID
}

/// Counts refused connections and says which to log: the first few, then powers of two, so a
/// process that loops on connect cannot flood the console log.
#[derive(Default)]
struct Refusals {
    count: u64,
}

impl Refusals {
    /// Records one refusal; true if this one should be logged.
    fn record(&mut self) -> bool {
        self.count += 1;
        self.count <= 16 || self.count.is_power_of_two()
    }
}

/// Accept loop: one thread per connection from the host; connections from any other peer are
/// closed unread and logged (console). Returns only if the listener fails.
pub fn serve(listener: vsock::VsockListener, agent: Arc<Agent>) {
    let mut refusals = Refusals::default();
    loop {
        let stream = match listener.accept() {
            Ok((s, peer)) if admits(peer.cid()) => s,
            Ok((s, peer)) => {
                if refusals.record() {
                    tracing::warn!(
                        peer_cid = peer.cid(),
                        peer_port = peer.port(),
                        refused = refusals.count,
                        "refused agent connection: not from the host (cid {HOST_CID})"
                    );
                }
                drop(s);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        spawn_session(stream, &agent);
    }
}

/// Serves streams of the virtio-serial host channel (see `hostchan`): every stream that
/// reaches the listener was opened by the host, so no peer check is needed. Returns when
/// the channel's listener is gone.
pub fn serve_streams(streams: Receiver<UnixStream>, agent: Arc<Agent>) {
    for stream in streams {
        spawn_session(stream, &agent);
    }
}

/// Runs one session on its own thread.
fn spawn_session<C: Conn>(stream: C, agent: &Arc<Agent>) {
    let accepted = Instant::now();
    let agent = Arc::clone(agent);
    let spawned = crate::pool::global().run("session", move || {
        if let Err(e) = handle_accepted(stream, &agent, accepted) {
            tracing::debug!(error = %crate::chain(&e), "session ended with an error");
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a session thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use matchlock_guest_proto::{read_frame_required, FileInfo, FileList, MAX_READ_FILE};

    fn agent(flag: Arc<AtomicBool>) -> Arc<Agent> {
        Arc::new(Agent {
            exec: ExecContext {
                root: PathBuf::from("/"),
                privileged: true,
            },
            on_shutdown: Box::new(move || flag.store(true, Ordering::SeqCst)),
        })
    }

    fn connect(a: &Arc<Agent>) -> (UnixStream, std::thread::JoinHandle<Result<(), AgentError>>) {
        let (host, guest) = UnixStream::pair().expect("pair");
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let a = Arc::clone(a);
        (host, std::thread::spawn(move || handle(guest, &a)))
    }

    #[test]
    fn ping_is_echoed_until_close() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        let (mut host, h) = connect(&a);
        for payload in [b"one".to_vec(), Vec::new(), vec![7u8; 1000]] {
            write_frame(&mut host, &Frame::new(FrameType::Ping, payload.clone())).expect("w");
            let pong = read_frame_required(&mut host).expect("pong");
            assert_eq!((pong.kind, pong.payload), (FrameType::Pong, payload));
        }
        drop(host);
        h.join()
            .expect("join")
            .expect("session ends cleanly on close");
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mlg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write(a: &Arc<Agent>, req: &WriteFileRequest, chunks: &[&[u8]]) -> Frame {
        let (mut host, h) = connect(a);
        write_frame(
            &mut host,
            &Frame::json(FrameType::WriteFile, req).expect("json"),
        )
        .expect("w");
        for c in chunks {
            write_frame(&mut host, &Frame::new(FrameType::Data, c.to_vec())).expect("w");
        }
        write_frame(&mut host, &Frame::empty(FrameType::DataEnd)).expect("w");
        let reply = read_frame_required(&mut host).expect("reply");
        h.join().expect("join").expect("session");
        reply
    }

    #[test]
    fn write_read_list() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        let dir = tmpdir("files");
        let path = dir.join("a/b/c.txt");
        let req = WriteFileRequest {
            path: path.to_string_lossy().into_owned(),
            mode: 0o600,
            user: "4242:4343".into(),
        };
        assert_eq!(write(&a, &req, &[b"hello ", b"world"]).kind, FrameType::Ok);
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
        assert_eq!(
            std::fs::metadata(dir.join("a/b")).expect("dir").mode() & 0o777,
            0o755
        );

        // Mode 0 means 0644, applied exactly whatever the umask.
        let req0 = WriteFileRequest {
            path: dir.join("d.txt").to_string_lossy().into_owned(),
            mode: 0,
            user: String::new(),
        };
        assert_eq!(write(&a, &req0, &[b"x"]).kind, FrameType::Ok);
        assert_eq!(
            std::fs::metadata(dir.join("d.txt")).expect("stat").mode() & 0o7777,
            0o644
        );

        let (mut host, h) = connect(&a);
        let pr = PathRequest {
            path: req.path.clone(),
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::ReadFile, &pr).expect("json"),
        )
        .expect("w");
        let info: FileInfo = read_frame_required(&mut host)
            .expect("info")
            .expect(FrameType::FileInfo, "info")
            .expect("json");
        assert_eq!(info.size, 11);
        let mut data = Vec::new();
        loop {
            let f = read_frame_required(&mut host).expect("frame");
            match f.kind {
                FrameType::Data => data.extend_from_slice(&f.payload),
                FrameType::DataEnd => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(data, b"hello world");
        h.join().expect("join").expect("session");

        let (mut host, h) = connect(&a);
        let pr = PathRequest {
            path: dir.to_string_lossy().into_owned(),
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::ListFiles, &pr).expect("json"),
        )
        .expect("w");
        let mut list: FileList = read_frame_required(&mut host)
            .expect("list")
            .expect(FrameType::FileList, "list")
            .expect("json");
        assert_eq!(
            read_frame_required(&mut host).expect("end").kind,
            FrameType::FileListEnd
        );
        h.join().expect("join").expect("session");
        list.files.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<_> = list
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.is_dir))
            .collect();
        assert_eq!(names, vec![("a", true), ("d.txt", false)]);
        assert_eq!(list.files[1].mode, 0o100644);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn read_procfs_file_reports_real_size() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        let (mut host, h) = connect(&a);
        let pr = PathRequest {
            path: "/proc/version".into(),
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::ReadFile, &pr).expect("json"),
        )
        .expect("w");
        let info: FileInfo = read_frame_required(&mut host)
            .expect("info")
            .expect(FrameType::FileInfo, "info")
            .expect("json");
        let data = read_frame_required(&mut host).expect("data");
        assert_eq!(data.kind, FrameType::Data);
        assert!(info.size > 0);
        assert_eq!(info.size, data.payload.len() as u64);
        assert!(data.payload.starts_with(b"Linux version"));
        assert_eq!(
            read_frame_required(&mut host).expect("end").kind,
            FrameType::DataEnd
        );
        h.join().expect("join").expect("session");
    }

    #[test]
    fn file_errors() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        let dir = tmpdir("ferr");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // Reading a directory or a missing file, listing a missing dir: `Error`.
        for (kind, path) in [
            (FrameType::ReadFile, dir.clone()),
            (FrameType::ReadFile, dir.join("missing")),
            (FrameType::ListFiles, dir.join("missing")),
        ] {
            let (mut host, h) = connect(&a);
            let pr = PathRequest {
                path: path.to_string_lossy().into_owned(),
            };
            write_frame(&mut host, &Frame::json(kind, &pr).expect("json")).expect("w");
            assert_eq!(
                read_frame_required(&mut host).expect("f").kind,
                FrameType::Error
            );
            h.join().expect("join").expect("session");
        }
        // Too large.
        let big = dir.join("big");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_READ_FILE + 1).expect("truncate");
        let (mut host, h) = connect(&a);
        let pr = PathRequest {
            path: big.to_string_lossy().into_owned(),
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::ReadFile, &pr).expect("json"),
        )
        .expect("w");
        assert_eq!(
            read_frame_required(&mut host).expect("f").kind,
            FrameType::Error
        );
        h.join().expect("join").expect("session");
        // Write under a regular file (parent is not a directory): data still consumed, `Error`.
        let req = WriteFileRequest {
            path: big.join("x").to_string_lossy().into_owned(),
            mode: 0,
            user: String::new(),
        };
        let reply = write(&a, &req, &[b"data"]);
        assert_eq!(reply.kind, FrameType::Error);
        // Unknown owner.
        let req = WriteFileRequest {
            path: dir.join("y").to_string_lossy().into_owned(),
            mode: 0,
            user: "no-such-user-xyz".into(),
        };
        let reply = write(&a, &req, &[b"data"]);
        assert_eq!(reply.kind, FrameType::Error);
        assert!(String::from_utf8_lossy(&reply.payload).contains("not found"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn port_forward_pipes_bytes_with_half_close() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read");
            s.write_all(b"echo:").expect("w");
            s.write_all(&got).expect("w");
        });
        let (mut host, h) = connect(&a);
        let req = PortForwardRequest {
            host: "127.0.0.1".into(),
            port,
            framed: false,
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::PortForward, &req).expect("json"),
        )
        .expect("w");
        assert_eq!(
            read_frame_required(&mut host).expect("ok").kind,
            FrameType::Ok
        );
        host.write_all(b"ping").expect("w");
        host.shutdown(Shutdown::Write).expect("half close");
        let mut back = Vec::new();
        host.read_to_end(&mut back).expect("read");
        assert_eq!(back, b"echo:ping");
        server.join().expect("server");
        h.join().expect("join").expect("session");

        // A closed port answers `Error` with the address.
        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let (mut host, h) = connect(&a);
        let req = PortForwardRequest {
            host: "127.0.0.1".into(),
            port,
            framed: false,
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::PortForward, &req).expect("json"),
        )
        .expect("w");
        let f = read_frame_required(&mut host).expect("err");
        assert_eq!(f.kind, FrameType::Error);
        assert!(
            String::from_utf8_lossy(&f.payload).starts_with(&format!("connect 127.0.0.1:{port}: "))
        );
        h.join().expect("join").expect("session");
    }

    #[test]
    fn framed_port_forward_honours_half_close() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read");
            s.write_all(b"echo:").expect("w");
            s.write_all(&got).expect("w");
        });
        let (mut host, h) = connect(&a);
        let req = PortForwardRequest {
            host: "127.0.0.1".into(),
            port,
            framed: true,
        };
        write_frame(
            &mut host,
            &Frame::json(FrameType::PortForward, &req).expect("json"),
        )
        .expect("w");
        assert_eq!(
            read_frame_required(&mut host).expect("ok").kind,
            FrameType::Ok
        );
        write_frame(&mut host, &Frame::new(FrameType::Data, b"ping".to_vec())).expect("w");
        write_frame(&mut host, &Frame::empty(FrameType::DataEnd)).expect("w");
        let mut back = Vec::new();
        loop {
            let f = read_frame_required(&mut host).expect("frame");
            match f.kind {
                FrameType::Data => back.extend_from_slice(&f.payload),
                FrameType::DataEnd => break,
                k => panic!("unexpected {k:?}"),
            }
        }
        assert_eq!(back, b"echo:ping");
        server.join().expect("server");
        h.join().expect("join").expect("session");
    }

    #[test]
    fn shutdown_replies_then_calls_hook() {
        let flag = Arc::new(AtomicBool::new(false));
        let a = agent(Arc::clone(&flag));
        let (mut host, h) = connect(&a);
        write_frame(&mut host, &Frame::empty(FrameType::Shutdown)).expect("w");
        assert_eq!(
            read_frame_required(&mut host).expect("ok").kind,
            FrameType::Ok
        );
        h.join().expect("join").expect("session");
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn only_the_host_cid_is_admitted() {
        assert!(admits(2));
        // VMADDR_CID_ANY, hypervisor, local (loopback), this guest, a sibling guest.
        for cid in [u32::MAX, 0, 1, 3, 4] {
            assert!(!admits(cid), "cid {cid} admitted");
        }
    }

    #[test]
    fn refusal_logging_is_bounded() {
        let mut r = Refusals::default();
        let logged = (0..100_000).filter(|_| r.record()).count();
        // 16 first ones, then 32, 64, ..., 65536.
        assert_eq!(logged, 16 + 12);
    }

    #[test]
    fn bad_first_frames() {
        let a = agent(Arc::new(AtomicBool::new(false)));
        for frame in [
            Frame::new(FrameType::Exec, b"{not json".to_vec()),
            Frame::empty(FrameType::Stdout),
        ] {
            let (mut host, h) = connect(&a);
            write_frame(&mut host, &frame).expect("w");
            assert_eq!(
                read_frame_required(&mut host).expect("f").kind,
                FrameType::Error
            );
            h.join().expect("join").expect("session");
        }
    }
}

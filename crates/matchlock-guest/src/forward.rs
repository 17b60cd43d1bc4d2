//! Port-forward sessions: the connection becomes a raw pipe to a TCP peer in the guest.
//!
//! # Design
//! Two threads copy the two directions with blocking I/O. Half-close is propagated: when one
//! side reads EOF the other side's write half is shut down, so protocols that signal the end
//! of a request with a half-close (HTTP/1.0 clients, `nc -N`) work. A failed write tears
//! both sockets down so the opposite copier unblocks too.
//!
//!
//! In framed mode (`PortForwardRequest::framed`) the connection carries `Data` frames and a
//! `DataEnd` per direction instead of raw bytes, because the host's hybrid vsock socket
//! cannot express a half-close: `DataEnd` from the host half-closes the TCP write side, TCP
//! EOF is sent as `DataEnd`, and the session ends when both directions are done.
//!
//! # Limitations
//! The TCP connect uses the system default timeout; the host decides how long to wait.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

use matchlock_guest_proto::{Frame, FrameType, PortForwardRequest, ProtoError};

use crate::conn::Conn;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("sending {what} frame")]
    Send {
        what: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("cloning the {what} socket")]
    Clone {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("starting the copy thread")]
    Thread(#[source] io::Error),
}

fn send<C: Write>(conn: &mut C, frame: &Frame, what: &'static str) -> Result<(), ForwardError> {
    matchlock_guest_proto::write_frame(conn, frame)
        .map_err(|source| ForwardError::Send { what, source })
}

/// Copies `src` into `dst` until EOF, then half-closes `dst`. Returns bytes copied.
fn pipe<R: Read, W: Write>(
    mut src: R,
    mut dst: W,
    shut_dst: impl Fn(Shutdown),
    shut_src: impl Fn(Shutdown),
) -> u64 {
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        match src.read(&mut buf) {
            Ok(0) => {
                shut_dst(Shutdown::Write);
                return total;
            }
            Ok(n) => {
                if dst.write_all(&buf[..n]).is_err() {
                    shut_dst(Shutdown::Both);
                    shut_src(Shutdown::Both);
                    return total;
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                shut_dst(Shutdown::Both);
                shut_src(Shutdown::Both);
                return total;
            }
        }
    }
}

/// Handles a `PortForward` session.
pub fn run<C: Conn>(mut conn: C, req: &PortForwardRequest) -> Result<(), ForwardError> {
    if req.port == 0 {
        let msg = b"invalid remote port 0".to_vec();
        return send(&mut conn, &Frame::new(FrameType::Error, msg), "error");
    }
    let tcp = match TcpStream::connect((req.host.as_str(), req.port)) {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("connect {}:{}: {e}", req.host, req.port);
            return send(
                &mut conn,
                &Frame::new(FrameType::Error, msg.into_bytes()),
                "error",
            );
        }
    };
    send(&mut conn, &Frame::empty(FrameType::Ok), "ok")?;
    if req.framed {
        return run_framed(conn, tcp, req);
    }
    let clone_conn = |what| {
        conn.try_clone_conn()
            .map_err(|source| ForwardError::Clone { what, source })
    };
    let clone_tcp = |what| {
        tcp.try_clone()
            .map_err(|source| ForwardError::Clone { what, source })
    };
    let (c_read, c_shut_a, c_shut_b) = (
        clone_conn("vsock")?,
        clone_conn("vsock")?,
        clone_conn("vsock")?,
    );
    let (t_write, t_shut_a, t_shut_b) = (clone_tcp("tcp")?, clone_tcp("tcp")?, clone_tcp("tcp")?);
    let up = std::thread::Builder::new()
        .name("forward-up".into())
        .spawn(move || {
            pipe(
                c_read,
                t_write,
                |h| {
                    let _ = t_shut_a.shutdown(h);
                },
                |h| {
                    let _ = c_shut_a.shutdown_conn(h);
                },
            )
        })
        .map_err(ForwardError::Thread)?;
    let down = pipe(
        tcp,
        conn,
        |h| {
            let _ = c_shut_b.shutdown_conn(h);
        },
        |h| {
            let _ = t_shut_b.shutdown(h);
        },
    );
    let up = up.join().unwrap_or(0);
    tracing::debug!(host = %req.host, port = req.port, up, down, "port forward closed");
    Ok(())
}

/// Framed session: host `Data` -> TCP, `DataEnd` -> TCP half-close; TCP bytes -> `Data`,
/// TCP EOF -> `DataEnd`. Any error tears both sockets down.
fn run_framed<C: Conn>(
    conn: C,
    tcp: TcpStream,
    req: &PortForwardRequest,
) -> Result<(), ForwardError> {
    let clone_conn = |what| {
        conn.try_clone_conn()
            .map_err(|source| ForwardError::Clone { what, source })
    };
    let clone_tcp = |what| {
        tcp.try_clone()
            .map_err(|source| ForwardError::Clone { what, source })
    };
    let (mut c_read, c_shut) = (clone_conn("vsock")?, clone_conn("vsock")?);
    let (mut t_write, t_shut) = (clone_tcp("tcp")?, clone_tcp("tcp")?);
    let up = std::thread::Builder::new()
        .name("forward-up".into())
        .spawn(move || {
            let mut total = 0u64;
            loop {
                match matchlock_guest_proto::read_frame(&mut c_read) {
                    Ok(Some(f)) if f.kind == FrameType::Data => {
                        if t_write.write_all(&f.payload).is_err() {
                            break;
                        }
                        total += f.payload.len() as u64;
                    }
                    Ok(Some(f)) if f.kind == FrameType::DataEnd => {
                        let _ = t_shut.shutdown(Shutdown::Write);
                        return total;
                    }
                    // Host gone, error or a stray frame: abort both sides.
                    _ => break,
                }
            }
            let _ = t_shut.shutdown(Shutdown::Both);
            let _ = c_shut.shutdown_conn(Shutdown::Both);
            total
        })
        .map_err(ForwardError::Thread)?;
    let mut conn = conn;
    let mut tcp = tcp;
    let mut buf = vec![0u8; 32 * 1024];
    let mut down = 0u64;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => {
                let _ = send(&mut conn, &Frame::empty(FrameType::DataEnd), "data end");
                break;
            }
            Ok(n) => {
                if send(
                    &mut conn,
                    &Frame::new(FrameType::Data, buf[..n].to_vec()),
                    "data",
                )
                .is_err()
                {
                    let _ = tcp.shutdown(Shutdown::Both);
                    break;
                }
                down += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = conn.shutdown_conn(Shutdown::Both);
                break;
            }
        }
    }
    let up = up.join().unwrap_or(0);
    tracing::debug!(host = %req.host, port = req.port, up, down, "framed port forward closed");
    Ok(())
}

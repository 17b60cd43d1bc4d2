//! Firecracker's hybrid vsock, host side.
//!
//! Host-initiated connections to guest port P: connect to the base unix socket, write
//! `CONNECT <P>\n`, read one line that must start with `OK ` (`OK <assigned port>\n`); from
//! then on the unix stream is the raw vsock stream. Guest-initiated connections to host port
//! P arrive at the unix socket `<base>_<P>` ([`listener_path`]), where the host listens.
//!
//! # Design
//! The reply line is read one byte at a time and never past `\n`: the guest may send data
//! right after accepting (e.g. a greeting), and a buffered read would swallow it. Connecting
//! retries while the socket does not exist yet or refuses (the vsock backend is still
//! starting), so callers need not sleep.
//!
//! # Limitations
//! A guest that never answers costs the whole `timeout`. A guest port with no listener is
//! reported as an unexpected EOF (the backend resets the connection); retrying on that is
//! the caller's choice (see `Machine::connect`). Half-close is not reliably preserved by
//! vsock backends, so callers should not rely on `shutdown(Write)`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Longest reply line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;
/// Pause between connection attempts while the socket is missing or refusing.
const RETRY_EVERY: Duration = Duration::from_millis(10);

/// The unix socket where guest-initiated connections to host `port` arrive: `<base>_<port>`.
pub fn listener_path(base: &Path, port: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Opens a host-to-guest connection to guest `port` through the hybrid socket `base`.
///
/// Errors: `TimedOut` if the socket never accepted or the reply did not come in time,
/// `UnexpectedEof` if the backend closed without replying (nothing listens on `port`),
/// `InvalidData` for a reply other than `OK ...`; other I/O errors as they come.
pub fn connect(base: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match UnixStream::connect(base) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                let now = Instant::now();
                if now >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} did not accept within {timeout:?} ({e})", base.display()),
                    ));
                }
                thread::sleep(RETRY_EVERY.min(deadline - now));
            }
            Err(e) => return Err(e),
        }
    };
    if let Err(e) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Err(closed_early(e));
    }
    let line = read_line(&mut stream, deadline)?;
    if !line.starts_with("OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hybrid vsock refused port {port}: {:?}", line.trim_end()),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Reads up to and including the first `\n`, byte by byte, until `deadline`.
fn read_line(stream: &mut UnixStream, deadline: Instant) -> io::Result<String> {
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no hybrid vsock reply in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "hybrid vsock closed before replying (no guest listener?)",
                ))
            }
            Ok(_) => {
                if byte[0] == b'\n' {
                    return Ok(String::from_utf8_lossy(&line).into_owned());
                }
                line.push(byte[0]);
                if line.len() > MAX_REPLY {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "hybrid vsock reply line too long",
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no hybrid vsock reply in time",
                ))
            }
            Err(e) => return Err(closed_early(e)),
        }
    }
}

/// A backend that resets the connection means "nothing listens on that port".
fn closed_early(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("hybrid vsock closed before replying ({e})"),
        ),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A fake backend: checks the CONNECT line, replies `reply` followed immediately by
    /// `greeting` in the same write, then echoes.
    fn fake_backend(
        base: &Path,
        reply: &'static [u8],
        greeting: &'static [u8],
    ) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(base).expect("bind");
        thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut reader = io::BufReader::new(s.try_clone().expect("clone"));
            let mut req = String::new();
            reader.read_line(&mut req).expect("read CONNECT");
            let mut first = reply.to_vec();
            first.extend_from_slice(greeting);
            s.write_all(&first).expect("write reply");
            let mut buf = [0u8; 256];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            req
        })
    }

    #[test]
    fn no_guest_bytes_are_swallowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("vsock.sock");
        let server = fake_backend(&base, b"OK 1234\n", b"hello");
        let mut s = connect(&base, 5000, Duration::from_secs(5)).expect("connect");
        let mut greeting = [0u8; 5];
        s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting, b"hello");
        s.write_all(b"ping").expect("write");
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).expect("echo");
        assert_eq!(&echo, b"ping");
        drop(s);
        assert_eq!(server.join().expect("join"), "CONNECT 5000\n");
    }

    #[test]
    fn waits_for_socket_to_appear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("vsock.sock");
        let base2 = base.clone();
        let late = thread::spawn(move || {
            thread::sleep(Duration::from_millis(150));
            fake_backend(&base2, b"OK 7\n", b"").join().expect("join")
        });
        let s = connect(&base, 42, Duration::from_secs(5)).expect("connect");
        drop(s);
        assert_eq!(late.join().expect("join"), "CONNECT 42\n");
    }

    #[test]
    fn rejects_other_replies_and_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("vsock.sock");
        let server = fake_backend(&base, b"FAILED\n", b"");
        let err = connect(&base, 1, Duration::from_secs(5)).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        server.join().expect("join");

        let missing = dir.path().join("missing.sock");
        let t = Instant::now();
        let err = connect(&missing, 1, Duration::from_millis(100)).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn eof_without_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&base).expect("bind");
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        });
        let err = connect(&base, 1, Duration::from_secs(5)).expect_err("eof");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        server.join().expect("join");
    }

    #[test]
    fn listener_path_appends_port() {
        assert_eq!(
            listener_path(Path::new("/x/vsock.sock"), 5001),
            PathBuf::from("/x/vsock.sock_5001")
        );
    }
}

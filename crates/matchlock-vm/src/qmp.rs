//! A minimal QMP (QEMU Machine Protocol) client, used only to save and restore snapshots.
//!
//! # Design
//! - One command at a time: a JSON line out, then lines in until the `return` or `error`
//!   of that command; asynchronous events in between are skipped (at most
//!   [`MAX_SKIPPED`] of them per command).
//! - QEMU is treated as hostile (it runs guest-influenced code): every line is bounded by
//!   [`MAX_LINE`] bytes, every read by the caller's deadline (a socket read timeout), and a
//!   reply that is not JSON, not an object, or lacks `return`/`error` is an error, never a
//!   panic.
//! - Descriptors reach QEMU with `getfd` and `SCM_RIGHTS` ([`Qmp::send_fd`]); migration then
//!   uses `fd:<name>`. QEMU runs with `-sandbox spawn=deny` and a Landlock ruleset, so the
//!   `exec:` and file URIs the study used are not an option.
//!
//! # Limitations
//! No capability negotiation beyond `qmp_capabilities`; no out-of-band commands.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

/// Longest QMP line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Events skipped while waiting for one reply.
pub const MAX_SKIPPED: usize = 1000;
/// Pause between connection attempts while QEMU creates its socket.
const CONNECT_POLL: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path} did not accept before the deadline")]
    ConnectTimeout {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set the QMP read timeout")]
    Timeout(#[source] io::Error),
    #[error("read from QMP")]
    Read(#[source] io::Error),
    #[error("write to QMP")]
    Write(#[source] io::Error),
    #[error("QMP deadline passed")]
    Deadline,
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP sent invalid JSON")]
    Json(#[source] serde_json::Error),
    #[error("QMP greeting is not a QMP greeting")]
    Greeting,
    #[error("QMP reply to {command} is neither `return` nor `error`")]
    Malformed { command: String },
    #[error("QMP sent more than {MAX_SKIPPED} events without replying to {command}")]
    TooManyEvents { command: String },
    #[error("QMP command {command} failed: {desc}")]
    Command { command: String, desc: String },
    #[error("pass a descriptor to QMP")]
    SendFd(#[source] nix::Error),
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

impl Qmp {
    /// Connects to `path` (retrying until QEMU has created it), reads the greeting and
    /// negotiates capabilities, all before `deadline`, which also bounds every later read.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::ConnectTimeout {
                        path: path.to_owned(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(CONNECT_POLL),
            }
        };
        Self::negotiate(stream, deadline)
    }

    /// Runs the greeting and `qmp_capabilities` on an open stream.
    pub fn negotiate(stream: UnixStream, deadline: Instant) -> Result<Qmp, QmpError> {
        let mut q = Qmp {
            stream,
            buf: Vec::new(),
            deadline,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting);
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream.write_all(&line).map_err(QmpError::Write)?;
        self.reply(command)
    }

    /// Hands `fd` to QEMU under `name` (`getfd`), for a later `fd:<name>` URI.
    pub fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let mut line = json!({ "execute": "getfd", "arguments": { "fdname": name } })
            .to_string()
            .into_bytes();
        line.push(b'\n');
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(&line)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(QmpError::SendFd)?;
        if sent < line.len() {
            self.stream
                .write_all(&line[sent..])
                .map_err(QmpError::Write)?;
        }
        self.reply("getfd").map(|_| ())
    }

    /// Reads messages until the reply to `command`.
    fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        for _ in 0..=MAX_SKIPPED {
            let mut msg = self.read_message()?;
            if let Some(r) = msg.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = msg.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("(no description)");
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    desc: desc.chars().take(500).collect(),
                });
            }
            if msg.get("event").is_none() {
                return Err(QmpError::Malformed {
                    command: command.to_owned(),
                });
            }
        }
        Err(QmpError::TooManyEvents {
            command: command.to_owned(),
        })
    }

    /// One JSON object line, bounded in size and by the deadline.
    fn read_message(&mut self) -> Result<Value, QmpError> {
        let line = self.read_line()?;
        let v: Value = serde_json::from_slice(&line).map_err(QmpError::Json)?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(QmpError::Malformed {
                command: "(any)".into(),
            })
        }
    }

    fn read_line(&mut self) -> Result<Vec<u8>, QmpError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::LineTooLong);
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Deadline);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(QmpError::Timeout)?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Deadline)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(QmpError::Read(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::thread;

    /// A fake QEMU that sends `script` (after reading one line per `\n`-terminated reply it
    /// is due) and returns what the client sent.
    fn fake(replies: Vec<Vec<u8>>) -> (UnixStream, thread::JoinHandle<Vec<String>>) {
        let (a, b) = UnixStream::pair().expect("pair");
        let h = thread::spawn(move || {
            let mut r = io::BufReader::new(b.try_clone().expect("clone"));
            let mut w = b;
            let mut seen = Vec::new();
            let mut replies = replies.into_iter();
            if let Some(g) = replies.next() {
                let _ = w.write_all(&g);
            }
            for reply in replies {
                let mut l = String::new();
                if r.read_line(&mut l).unwrap_or(0) == 0 {
                    break;
                }
                seen.push(l);
                let _ = w.write_all(&reply);
            }
            seen
        });
        (a, h)
    }

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn commands_skip_events_and_map_errors() {
        let (s, h) = fake(vec![
            GREETING.to_vec(),
            b"{\"return\": {}}\n".to_vec(),
            b"{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}\n".to_vec(),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n".to_vec(),
        ]);
        let mut q = Qmp::negotiate(s, soon()).expect("negotiate");
        let r = q.execute("query-status", None).expect("status");
        assert_eq!(r["status"], "paused");
        let e = q
            .execute("migrate", Some(json!({"uri": "fd:x"})))
            .expect_err("error");
        assert!(
            matches!(e, QmpError::Command { ref desc, .. } if desc == "nope"),
            "{e}"
        );
        drop(q);
        let seen = h.join().expect("join");
        assert!(seen[0].contains("qmp_capabilities"));
        assert!(seen[2].contains("\"uri\":\"fd:x\""), "{seen:?}");
    }

    #[test]
    fn hostile_replies_are_errors_not_panics() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json\n".to_vec(), "json"),
            (b"[1,2]\n".to_vec(), "malformed"),
            (b"{\"foo\": 1}\n".to_vec(), "greeting"),
            (vec![b'x'; MAX_LINE + 10], "long"),
            (Vec::new(), "closed"),
        ];
        for (greeting, what) in cases {
            let (s, h) = fake(vec![greeting]);
            let e = Qmp::negotiate(s, soon()).err().expect(what);
            match what {
                "json" => assert!(matches!(e, QmpError::Json(_)), "{e}"),
                "malformed" => assert!(matches!(e, QmpError::Malformed { .. }), "{e}"),
                "greeting" => assert!(matches!(e, QmpError::Greeting), "{e}"),
                "long" => assert!(matches!(e, QmpError::LineTooLong), "{e}"),
                _ => assert!(matches!(e, QmpError::Closed), "{e}"),
            }
            let _ = h.join();
        }
        let mut events = Vec::new();
        for _ in 0..=MAX_SKIPPED {
            events.extend_from_slice(b"{\"event\": \"X\"}\n");
        }
        let (s, h) = fake(vec![GREETING.to_vec(), events]);
        let e = Qmp::negotiate(s, soon()).err().expect("events");
        assert!(matches!(e, QmpError::TooManyEvents { .. }), "{e}");
        let _ = h.join();
        let (s, h) = fake(vec![GREETING.to_vec(), b"{\"neither\": 1}\n".to_vec()]);
        let e = Qmp::negotiate(s, soon()).err().expect("neither");
        assert!(matches!(e, QmpError::Malformed { .. }), "{e}");
        let _ = h.join();
    }

    #[test]
    fn silent_peer_hits_the_deadline() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let t = Instant::now();
        let e = Qmp::negotiate(a, Instant::now() + Duration::from_millis(200))
            .err()
            .expect("deadline");
        assert!(matches!(e, QmpError::Deadline), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn passes_a_descriptor() {
        let (a, b) = UnixStream::pair().expect("pair");
        let h = thread::spawn(move || {
            use nix::sys::socket::{recvmsg, ControlMessageOwned};
            let mut w = b.try_clone().expect("clone");
            w.write_all(GREETING).expect("greet");
            let mut buf = [0u8; 256];
            let n = (&b).read(&mut buf).expect("caps");
            assert!(n > 0);
            w.write_all(b"{\"return\": {}}\n").expect("ret");
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(b.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .expect("recvmsg");
            let got = msg
                .cmsgs()
                .expect("cmsgs")
                .any(|c| matches!(c, ControlMessageOwned::ScmRights(f) if f.len() == 1));
            w.write_all(b"{\"return\": {}}\n").expect("ret");
            got
        });
        let mut q = Qmp::negotiate(a, soon()).expect("negotiate");
        let f = std::fs::File::open("/dev/null").expect("null");
        use std::os::fd::AsFd;
        q.send_fd("snap", f.as_fd()).expect("getfd");
        assert!(h.join().expect("join"), "descriptor arrived");
    }
}

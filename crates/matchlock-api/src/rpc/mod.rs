//! The JSON-RPC contract of `matchlock rpc` (spec §2): method and notification names, typed
//! params and results, error codes, the envelope, and the `[LOCAL:]REMOTE` port syntax.
//!
//! # Design
//! The server (`matchlock-rpc`) and the Rust SDK (`matchlock-sdk`) are both built on this
//! module, so a method name, a field or an error code exists once and cannot drift between
//! them (the Python, TypeScript and Go SDKs speak the same names). Methods are parsed once
//! into [`Method`]; everything after that matches on the enum. Byte payloads stay base64
//! strings on the wire (the reference encodes Go `[]byte` that way); [`b64`] converts them.
//!
//! # Limitations
//! Create params are decoded by the server as [`crate::Config`] (it must accept the loose
//! numbers the reference accepts); [`CreateParams`] is the typed form clients send, and a
//! test checks that it decodes into the same `Config`.

pub mod b64;
pub mod codes;
pub mod envelope;
mod filemode;
mod messages;
pub mod port;

pub use envelope::{BadLine, Incoming, Request, RpcErrorObject};
pub use filemode::go_file_mode;
pub use messages::*;

/// A client -> server method (requests and input notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Create,
    Exec,
    ExecStream,
    ExecPipe,
    ExecTty,
    ExecPipeStdin,
    ExecPipeStdinEof,
    ExecTtyStdin,
    ExecTtyStdinEof,
    ExecTtyResize,
    WriteFile,
    ReadFile,
    ListFiles,
    Log,
    LogStream,
    AllowListAdd,
    AllowListDelete,
    PortForward,
    Cancel,
    Close,
}

const METHODS: [(Method, &str); 20] = [
    (Method::Create, "create"),
    (Method::Exec, "exec"),
    (Method::ExecStream, "exec_stream"),
    (Method::ExecPipe, "exec_pipe"),
    (Method::ExecTty, "exec_tty"),
    (Method::ExecPipeStdin, "exec_pipe.stdin"),
    (Method::ExecPipeStdinEof, "exec_pipe.stdin_eof"),
    (Method::ExecTtyStdin, "exec_tty.stdin"),
    (Method::ExecTtyStdinEof, "exec_tty.stdin_eof"),
    (Method::ExecTtyResize, "exec_tty.resize"),
    (Method::WriteFile, "write_file"),
    (Method::ReadFile, "read_file"),
    (Method::ListFiles, "list_files"),
    (Method::Log, "log"),
    (Method::LogStream, "log_stream"),
    (Method::AllowListAdd, "allow_list_add"),
    (Method::AllowListDelete, "allow_list_delete"),
    (Method::PortForward, "port_forward"),
    (Method::Cancel, "cancel"),
    (Method::Close, "close"),
];

impl Method {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        METHODS
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("", |(_, s)| s)
    }

    /// Parses a wire name; `None` for unknown methods.
    pub fn parse(name: &str) -> Option<Method> {
        METHODS.iter().find(|(_, s)| *s == name).map(|(m, _)| *m)
    }

    /// Every method, for tests and documentation.
    pub fn all() -> impl Iterator<Item = Method> {
        METHODS.iter().map(|(m, _)| *m)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server -> client notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notice {
    ExecStreamStdout,
    ExecStreamStderr,
    ExecPipeReady,
    ExecPipeStdout,
    ExecPipeStderr,
    ExecTtyReady,
    ExecTtyStdout,
    LogStreamData,
    Event,
}

const NOTICES: [(Notice, &str); 9] = [
    (Notice::ExecStreamStdout, "exec_stream.stdout"),
    (Notice::ExecStreamStderr, "exec_stream.stderr"),
    (Notice::ExecPipeReady, "exec_pipe.ready"),
    (Notice::ExecPipeStdout, "exec_pipe.stdout"),
    (Notice::ExecPipeStderr, "exec_pipe.stderr"),
    (Notice::ExecTtyReady, "exec_tty.ready"),
    (Notice::ExecTtyStdout, "exec_tty.stdout"),
    (Notice::LogStreamData, "log_stream.data"),
    (Notice::Event, "event"),
];

impl Notice {
    pub fn as_str(self) -> &'static str {
        NOTICES
            .iter()
            .find(|(n, _)| *n == self)
            .map_or("", |(_, s)| s)
    }

    pub fn parse(name: &str) -> Option<Notice> {
        NOTICES.iter().find(|(_, s)| *s == name).map(|(n, _)| *n)
    }
}

/// The four exec methods and the names that belong to each (spec §2.4): which
/// notifications carry its output, which signal readiness for input, which carry input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// `exec`: output captured and returned in the result.
    Buffered,
    /// `exec_stream`: output as notifications.
    Stream,
    /// `exec_pipe`: output as notifications, stdin from the client.
    Pipe,
    /// `exec_tty`: a PTY; stdout and stderr merged.
    Tty,
}

impl ExecMode {
    pub fn from_method(m: Method) -> Option<ExecMode> {
        match m {
            Method::Exec => Some(ExecMode::Buffered),
            Method::ExecStream => Some(ExecMode::Stream),
            Method::ExecPipe => Some(ExecMode::Pipe),
            Method::ExecTty => Some(ExecMode::Tty),
            _ => None,
        }
    }

    pub fn method(self) -> Method {
        match self {
            ExecMode::Buffered => Method::Exec,
            ExecMode::Stream => Method::ExecStream,
            ExecMode::Pipe => Method::ExecPipe,
            ExecMode::Tty => Method::ExecTty,
        }
    }

    /// Notifications carrying stdout and stderr (`None` when output is captured). A PTY
    /// merges both into stdout.
    pub fn output(self) -> Option<(Notice, Notice)> {
        match self {
            ExecMode::Buffered => None,
            ExecMode::Stream => Some((Notice::ExecStreamStdout, Notice::ExecStreamStderr)),
            ExecMode::Pipe => Some((Notice::ExecPipeStdout, Notice::ExecPipeStderr)),
            ExecMode::Tty => Some((Notice::ExecTtyStdout, Notice::ExecTtyStdout)),
        }
    }

    /// The notification announcing that input is accepted, and the input methods
    /// (data, end of input); `None` for modes without client input.
    pub fn input(self) -> Option<(Notice, Method, Method)> {
        match self {
            ExecMode::Pipe => Some((
                Notice::ExecPipeReady,
                Method::ExecPipeStdin,
                Method::ExecPipeStdinEof,
            )),
            ExecMode::Tty => Some((
                Notice::ExecTtyReady,
                Method::ExecTtyStdin,
                Method::ExecTtyStdinEof,
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Method::all() {
            assert_eq!(Method::parse(m.as_str()), Some(m), "{m:?}");
        }
        for (n, s) in NOTICES {
            assert_eq!(Notice::parse(s), Some(n));
            assert_eq!(n.as_str(), s);
        }
        assert_eq!(Method::parse("nope"), None);
        assert_eq!(Method::ExecTtyResize.as_str(), "exec_tty.resize");
    }

    #[test]
    fn exec_modes() {
        for mode in [
            ExecMode::Buffered,
            ExecMode::Stream,
            ExecMode::Pipe,
            ExecMode::Tty,
        ] {
            assert_eq!(ExecMode::from_method(mode.method()), Some(mode));
        }
        assert_eq!(
            ExecMode::Pipe.input().map(|(r, _, _)| r.as_str()),
            Some("exec_pipe.ready")
        );
        assert_eq!(ExecMode::Buffered.output(), None);
    }
}

//! Every failure a method can report, and the ONE mapping from failures to JSON-RPC error
//! codes (spec §2.2).
//!
//! # Design
//! Handlers return [`Failure`]; [`Failure::code`] is the only place that decides a code, and
//! [`Failure::message`] renders the error chain (`a: b: c`). Messages are built from our own
//! error types and never include request parameters wholesale, so secret values sent in a
//! config cannot be echoed back.
//!
//! # Limitations
//! `-32603 Internal` is defined but, as in the reference, never produced.

pub use matchlock_api::rpc::codes::*;
use matchlock_api::rpc::port::PortSpecError;
use matchlock_sandbox::exec::ExecError;
use matchlock_sandbox::files::FileError;
use matchlock_sandbox::forward::{AddressError, ForwardError};
use matchlock_sandbox::{SandboxError, StartError};

/// The reference's text for features that need the network interception proxy.
pub const NO_INTERCEPTION: &str =
    "allow-list updates unavailable: sandbox was started without network interception";

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("Parse error")]
    Parse,
    #[error("Invalid Request: {0}")]
    InvalidRequest(&'static str),
    #[error("request line exceeds {max} bytes")]
    LineTooLong { max: usize },
    #[error("Method not found")]
    MethodNotFound,
    #[error("Invalid Request: id {0} is already in flight; reuse an id only after its answer")]
    DuplicateId(String),
    #[error("{0} requires a request id")]
    IdRequired(&'static str),
    #[error("invalid params")]
    Params(#[source] serde_json::Error),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("image is required (e.g., alpine:latest)")]
    ImageRequired,
    #[error("id is internal-only and cannot be set")]
    IdInternal,
    #[error("{0}")]
    Config(#[source] matchlock_api::ConfigError),
    #[error("invalid configuration: {0}")]
    Vfs(String),
    #[error("invalid base64 content")]
    Base64,
    #[error("invalid port-forward spec")]
    Spec(#[source] PortSpecError),
    #[error("invalid port-forward spec")]
    Address(#[source] AddressError),
    #[error("VM not created")]
    NoVm,
    #[error("{0}")]
    VmGone(String),
    #[error("a sandbox ({0}) already exists in this session: close it before creating another")]
    VmExists(String),
    #[error("{NO_INTERCEPTION}")]
    NoInterception,
    #[error("create VM")]
    Resources(#[source] matchlock_api::ConfigError),
    #[error("failed to build rootfs: open image store")]
    ImageStore(#[source] matchlock_image::StoreError),
    #[error("failed to build rootfs: image {tag:?} is not stored locally and pulling it failed (import it with `matchlock image import {tag} < image.tar`)")]
    ImagePull {
        tag: String,
        #[source]
        source: Box<matchlock_image::PullError>,
    },
    #[error("image lookup task failed")]
    ImageJoin(#[source] tokio::task::JoinError),
    #[error("create sandbox")]
    Create(#[source] StartError),
    #[error("create VM: network")]
    Network(#[source] matchlock_sandbox::network::NetworkSetupError),
    #[error("start image entrypoint: exit code {0}")]
    EntrypointExit(i32),
    #[error("start image entrypoint")]
    Entrypoint(#[source] SandboxError),
    #[error("start image entrypoint")]
    EntrypointJoin(#[source] tokio::task::JoinError),
    #[error("port forward")]
    Forward(#[source] ForwardError),
    #[error("connect to the guest")]
    Connect(#[source] SandboxError),
    #[error("guest file operation")]
    FileConnect(#[source] SandboxError),
    #[error("exec failed")]
    Exec(#[source] SandboxError),
    #[error(
        "command output exceeds the sandbox's {} MiB capture budget (shared by its concurrent \
         exec requests; use exec_stream for large output)",
        .0 >> 20
    )]
    CaptureBudget(usize),
    #[error(
        "{method}: more than {} MiB of stdin is queued that the guest has not taken; send \
         input no faster than the command reads it (or use write_file for bulk data)",
        .limit >> 20
    )]
    StdinBacklog { method: &'static str, limit: usize },
    #[error("guest file operation")]
    File(#[source] FileError),
    #[error("read VM log {path}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("close sandbox task failed")]
    CloseJoin(#[source] tokio::task::JoinError),
    #[error("context canceled")]
    Cancelled,
}

impl Failure {
    /// The JSON-RPC error code of this failure (the only place codes are chosen).
    pub fn code(&self) -> i64 {
        use Failure::*;
        match self {
            Parse => PARSE_ERROR,
            InvalidRequest(_) | DuplicateId(_) | LineTooLong { .. } | IdRequired(_) => {
                INVALID_REQUEST
            }
            MethodNotFound => METHOD_NOT_FOUND,
            Params(_) | Missing(_) | ImageRequired | IdInternal | Config(_) | Vfs(_) | Base64
            | Spec(_) | Address(_) => INVALID_PARAMS,
            NoVm
            | VmGone(_)
            | VmExists(_)
            | NoInterception
            | Resources(_)
            | ImageStore(_)
            | ImagePull { .. }
            | ImageJoin(_)
            | Create(_)
            | Network(_)
            | EntrypointExit(_)
            | Entrypoint(_)
            | EntrypointJoin(_)
            | Forward(_)
            | CloseJoin(_) => VM_FAILED,
            Exec(SandboxError::Exec(ExecError::Cancelled)) | Cancelled => CANCELLED,
            Connect(_) | Exec(_) | CaptureBudget(_) | StdinBacklog { .. } => EXEC_FAILED,
            File(_) | FileConnect(_) | Log { .. } => FILE_FAILED,
        }
    }

    /// The error chain as one line, `outer: inner: ...`.
    pub fn message(&self) -> String {
        if matches!(
            self,
            Failure::Exec(SandboxError::Exec(ExecError::Cancelled))
        ) {
            return Failure::Cancelled.to_string();
        }
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            let t = e.to_string();
            if !t.is_empty() && !s.ends_with(&t) {
                s.push_str(": ");
                s.push_str(&t);
            }
            src = e.source();
        }
        s
    }

    /// Whether this failure is a cancellation (after which any error is reported as such).
    pub fn is_cancelled(&self) -> bool {
        self.code() == CANCELLED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        assert_eq!(Failure::Parse.code(), -32700);
        assert_eq!(Failure::Parse.message(), "Parse error");
        assert_eq!(Failure::MethodNotFound.code(), -32601);
        assert_eq!(Failure::ImageRequired.code(), -32602);
        assert_eq!(Failure::NoVm.message(), "VM not created");
        assert_eq!(Failure::NoVm.code(), -32000);
        assert_eq!(
            Failure::Exec(SandboxError::Exec(ExecError::Cancelled)).code(),
            -32003
        );
        assert_eq!(
            Failure::Exec(SandboxError::Exec(ExecError::Cancelled)).message(),
            "context canceled"
        );
        let e = Failure::File(FileError::Guest("read /x: No such file".into()));
        assert_eq!(e.code(), -32002);
        assert_eq!(e.message(), "guest file operation: read /x: No such file");
        assert_eq!(Failure::NoInterception.message(), NO_INTERCEPTION);
        assert_eq!(INTERNAL, -32603);
        let e = Failure::CaptureBudget(64 << 20);
        assert_eq!(e.code(), -32001);
        assert!(e
            .message()
            .starts_with("command output exceeds the sandbox's 64 MiB capture budget"));
        assert_eq!(Failure::DuplicateId("7".into()).code(), -32600);
    }
}

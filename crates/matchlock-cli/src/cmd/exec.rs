//! `matchlock exec`: run a command in a running sandbox, through its exec relay.

use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use matchlock_guest_proto::{ExecRequest, ExitStatus, WinSize};
use matchlock_sandbox::exec::{run_exec, ExecError, ExecIo};
use matchlock_sandbox::RunningSandbox;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::common;
use crate::{term, ExitWith};

/// Run a command in a running sandbox.
///
/// Examples:
///   matchlock exec vm-1a2b3c4d -- ls -la /
///   matchlock exec -it vm-1a2b3c4d sh
///   echo data | matchlock exec -i vm-1a2b3c4d -- cat
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ExecArgs {
    /// Sandbox ID, then the command and its arguments.
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true, value_name = "ID [--] COMMAND")]
    pub args: Vec<String>,
    /// Allocate a terminal (with -i: an interactive session).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// Forward this process's stdin to the command.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Working directory inside the sandbox (default: the image WORKDIR, else /).
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// User as uid, uid:gid or name (default: the image USER, else root).
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
}

/// How a command's local I/O is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Output streamed, stdin is /dev/null.
    Stream,
    /// Output streamed, local stdin forwarded.
    Pipe,
    /// A PTY session on the local terminal.
    Tty,
}

impl Mode {
    pub fn from_flags(tty: bool, interactive: bool) -> Mode {
        match (tty, interactive) {
            (true, true) => Mode::Tty,
            (_, true) => Mode::Pipe,
            _ => Mode::Stream,
        }
    }
}

/// Where a command runs: in a sandbox this process owns, or through another owner's exec
/// relay. Either way the sandbox applies its exec defaults.
pub enum Target<'a> {
    Owned(&'a RunningSandbox),
    Relay { id: String, dir: PathBuf },
}

impl Target<'_> {
    async fn run(self, req: ExecRequest, io: ExecIo) -> anyhow::Result<ExitStatus> {
        match self {
            Target::Owned(sb) => sb.exec(req, io).await.map_err(anyhow::Error::new),
            Target::Relay { id, dir } => {
                let conn = relay_conn(&id, &dir).await?;
                run_exec(conn, &req, io)
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("executing command"))
            }
        }
    }
}

/// A connection to the relay in `dir`, or why there is none: a sandbox whose relay takes
/// the connection is running (only its owner listens there), so the state database is read
/// only to explain a failure (not found, stopped, crashed, still starting).
async fn relay_conn(id: &str, dir: &std::path::Path) -> anyhow::Result<tokio::net::UnixStream> {
    match matchlock_sandbox::relay::connect(id, dir).await {
        Ok(conn) => Ok(conn),
        Err(e) => {
            let paths = common::paths()?;
            let state = common::state(&paths)?;
            common::running_vm(&state, id)?;
            Err(e.into())
        }
    }
}

fn is_cancelled(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<ExecError>(), Some(ExecError::Cancelled)))
}

/// Why a session ended without an exit status.
pub enum SessionEnd {
    Exited(ExitStatus),
    Interrupted(i32),
}

/// Runs `req` on `target`, wiring local stdio per `mode`. SIGINT and SIGTERM cancel the
/// command (the guest kills it) and yield 130/143; `deadline` cancels it with 124.
pub async fn drive(
    target: Target<'_>,
    mut req: ExecRequest,
    mode: Mode,
    log: Option<matchlock_vm::console::ConsoleWriter>,
    deadline: CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let cancel = CancellationToken::new();
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut _raw = None;
    let mut io_stdin: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>> = None;
    let mut resize_rx = None;
    match mode {
        Mode::Stream => {}
        Mode::Pipe => {
            req.stdin = true;
            io_stdin = Some(Box::new(tokio::io::stdin()));
        }
        Mode::Tty => {
            if !term::stdin_is_tty() {
                anyhow::bail!("-it requires a TTY");
            }
            req.tty = Some(term::size());
            _raw = Some(term::RawMode::enable().context("put the terminal in raw mode")?);
            io_stdin = Some(Box::new(tokio::io::stdin()));
            let (tx, rx) = mpsc::channel::<WinSize>(1);
            let mut winch =
                signal(SignalKind::window_change()).context("install SIGWINCH handler")?;
            tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    // A full channel means a resize is already pending: drop stale sizes.
                    let _ = tx.try_send(term::size());
                }
            });
            resize_rx = Some(rx);
        }
    }
    let stdout: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &log {
        Some(w) => Box::new(crate::output::Tee::new(
            tokio::io::stdout(),
            Some(w.clone()),
        )),
        None => Box::new(tokio::io::stdout()),
    };
    let stderr: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &log {
        Some(w) => Box::new(crate::output::Tee::new(
            tokio::io::stderr(),
            Some(w.clone()),
        )),
        None => Box::new(tokio::io::stderr()),
    };
    let io = ExecIo {
        stdout,
        stderr,
        stdin: io_stdin,
        resize: resize_rx,
        signals: None,
        cancel: cancel.clone(),
    };
    let fut = target.run(req, io);
    tokio::pin!(fut);
    let mut interrupted = None;
    let res = loop {
        tokio::select! {
            r = &mut fut => break r,
            _ = sigint.recv(), if interrupted.is_none() => { interrupted = Some(130); cancel.cancel(); }
            _ = sigterm.recv(), if interrupted.is_none() => { interrupted = Some(143); cancel.cancel(); }
            () = deadline.cancelled(), if interrupted.is_none() => { interrupted = Some(124); cancel.cancel(); }
        }
    };
    drop(_raw);
    match res {
        Ok(st) => Ok(SessionEnd::Exited(st)),
        Err(e) if is_cancelled(&e) => Ok(SessionEnd::Interrupted(interrupted.unwrap_or(130))),
        Err(e) => Err(e),
    }
}

pub fn exec(a: ExecArgs) -> anyhow::Result<()> {
    let mut args = a.args.into_iter();
    let id = args.next().unwrap_or_default();
    let mut argv: Vec<String> = args.collect();
    if argv.first().is_some_and(|s| s == "--") {
        argv.remove(0);
    }
    let mode = Mode::from_flags(a.tty, a.interactive);
    if argv.is_empty() {
        if mode == Mode::Tty {
            argv.push("sh".into());
        } else {
            anyhow::bail!("command required (or use -it for interactive mode)");
        }
    }
    // Straight to the relay socket (see `relay_conn`): opening the state database costs
    // more than the rest of a warm exec's host side.
    matchlock_state::validate_vm_id(&id).map_err(|e| anyhow::anyhow!("VM not found {id}: {e}"))?;
    let dir = common::paths()?.state.join("vms").join(&id);
    let req = ExecRequest {
        argv,
        cwd: a.workdir.unwrap_or_default(),
        user: a.user.unwrap_or_default(),
        ..Default::default()
    };
    let rt = common::runtime()?;
    let end = rt.block_on(async move {
        let target = Target::Relay { id, dir };
        drive(target, req, mode, None, CancellationToken::new()).await
    })?;
    rt.shutdown_timeout(Duration::from_millis(100));
    match end {
        SessionEnd::Exited(st) if st.code == 0 => Ok(()),
        SessionEnd::Exited(st) => Err(ExitWith(st.code).into()),
        SessionEnd::Interrupted(code) => Err(ExitWith(code).into()),
    }
}

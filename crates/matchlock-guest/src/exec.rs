//! Exec sessions: run one command and stream it over a connection.
//!
//! # Design
//! Blocking I/O, one session per connection, as few threads as the semantics allow:
//! - the session thread spawns the command (through the [`reaper`], never
//!   `Child::wait`), sends `Started`, then itself copies the output fds (stdout/stderr pipes,
//!   or the PTY master) to `Stdout` / `Stderr` frames with one `poll` over them and a pidfd
//!   of the command, which wakes it at the exit; it drains what is left and sends `Exit`.
//!   All frames go through one [`FrameWriter`], so frames never interleave;
//! - a reader (a thread from the agent's [`crate::pool`], like the session's own, so a warm
//!   agent starts no thread per exec) keeps reading host frames until the command ends, even after
//!   `StdinEof`; host EOF or error before `Exit` cancels: SIGTERM to the process group, then
//!   SIGKILL after [`KILL_GRACE_MS`], in every mode;
//! - only when the command has a stdin, a stdin thread owns the write side, so a child that
//!   does not read its stdin cannot stall the reader (and with it cancellation).
//!
//! Threads are emulated work under TCG: one pump thread per output fd cost two thread
//! starts per exec for nothing a `poll` cannot do (issue 11).
//!
//! Every command runs in a new session (its own process group). When the main process exits,
//! the reaper SIGKILLs what is left of its group while the leader is still a zombie; the
//! session then drains the output to EOF, bounded by [`DRAIN_TIMEOUT`] in case a process
//! outside the group (e.g. one that called `setsid` itself) still holds the pipes. A gate flag taken with every
//! output frame guarantees no output frame follows `Exit`.
//!
//! The command is started by [`spawn`] (a `CLONE_VFORK` child sharing our memory until it
//! execs, not a fork of the whole agent). Unless the VM is privileged, the child hardens
//! itself before exec ([`sys::apply_child_setup`]): its own mount namespace with `/proc/sys`
//! and `/sys` read-only, a smaller capability bounding set, `no_new_privs` and a seccomp
//! filter (no ptrace, no kexec, no `AF_VSOCK` sockets).
//!
//! Spawn failures are reported like a shell would: a message on `Stderr`, then `Exit` with
//! 127 (not found, unknown user, bad working directory) or 126 (not executable). Protocol
//! misuse (bad JSON, empty argv) gets an `Error` frame.
//!
//! # Limitations
//! Signals from the host are sent with `kill(-pgid)` while the leader is alive; a tiny window
//! remains between the reaper collecting the leader and this session noticing, in which the
//! pgid could in theory be reused (it would need the pid space to wrap in microseconds).
//! A kernel without `pidfd_open` (before 5.3) still works: the session then checks the
//! reaper for the exit every 20 ms while it pumps.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use matchlock_guest_proto::{
    read_frame, ExecRequest, ExitStatus, Frame, FrameType, FrameWriter, GuestTiming, ProtoError,
    Started, TimedExit, WinSize, CHUNK, KILL_GRACE_MS,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::conn::Conn;
use crate::reaper;
use crate::spawn::{self, SpawnSpec};
use crate::sys::{self, ChildSetup};
use crate::user;

/// How long output is drained after the command's group is gone.
pub const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// Session-wide settings.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// Root whose `/etc/passwd` and `/etc/group` resolve users (`/` in the VM).
    pub root: PathBuf,
    /// Skip the capability drop.
    pub privileged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("sending {what} frame")]
    Send {
        what: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("cloning the connection")]
    CloneConn(#[source] io::Error),
    #[error("creating {what} pipe")]
    Pipe {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("opening /dev/null for stdin")]
    DevNull(#[source] io::Error),
    #[error("opening a pty")]
    OpenPty(#[source] nix::Error),
    #[error("duplicating the pty master")]
    DupMaster(#[source] io::Error),
    #[error("starting the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reaper dropped the exit status of pid {pid}")]
    LostExit { pid: i32 },
}

/// The output side shared by the session and pump threads.
struct Output<C: Conn> {
    writer: FrameWriter<C>,
    /// Set once `Exit` is sent; held while sending so nothing can follow `Exit`.
    closed: Mutex<bool>,
}

impl<C: Conn> Output<C> {
    fn send(&self, frame: &Frame) -> Result<(), ProtoError> {
        let closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        if *closed {
            return Err(ProtoError::Closed);
        }
        self.writer.send(frame)
    }

    fn send_last(&self, frame: &Frame) -> Result<(), ProtoError> {
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        *closed = true;
        self.writer.send(frame)
    }
}

/// Whether the main process has exited (shared with the reader for cancellation).
#[derive(Default)]
struct Done {
    exited: Mutex<bool>,
    cv: Condvar,
}

impl Done {
    fn is_set(&self) -> bool {
        *self.exited.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn set(&self) {
        *self.exited.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }
    /// Waits up to `d`; true if the process exited meanwhile.
    fn wait(&self, d: Duration) -> bool {
        let g = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |e| !*e)
            .unwrap_or_else(PoisonError::into_inner);
        *g
    }
}

enum StdinMsg {
    Data(Vec<u8>),
    Eof,
}

/// Why a command could not be started, mapped to shell exit codes.
fn spawn_failure(argv0: &str, e: &io::Error) -> (String, i32) {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => (format!("matchlock: exec {argv0:?}: not found\n"), 127),
        (io::ErrorKind::PermissionDenied, _) => (
            format!("matchlock: exec {argv0:?}: permission denied\n"),
            126,
        ),
        (_, Some(libc::ENOEXEC)) => (
            format!("matchlock: exec {argv0:?}: exec format error\n"),
            126,
        ),
        _ => (format!("matchlock: exec {argv0:?}: {e}\n"), 126),
    }
}

/// The guest-side marks of one session ([`GuestTiming`]): a few clock reads, always taken,
/// sent back only when the request asked for them.
pub struct Timeline {
    accepted: Instant,
    timing: GuestTiming,
}

impl Timeline {
    /// Marks start at `accepted` (when the agent took the connection); `session` is now.
    pub fn new(accepted: Instant) -> Timeline {
        let mut t = Timeline {
            accepted,
            timing: GuestTiming::default(),
        };
        t.timing.session_us = t.now();
        t
    }

    /// Microseconds since the connection was accepted.
    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records that the request was read and decoded.
    pub fn requested(&mut self) {
        self.timing.request_us = self.now();
    }
}

/// Runs one exec session whose `Exec` frame (already read) carried `req`.
pub fn run<C: Conn>(
    conn: C,
    req: ExecRequest,
    ctx: &ExecContext,
    timeline: Timeline,
) -> Result<(), ExecError> {
    let reader = conn.try_clone_conn().map_err(ExecError::CloneConn)?;
    let closer = conn.try_clone_conn().map_err(ExecError::CloneConn)?;
    let out = Arc::new(Output {
        writer: FrameWriter::new(conn),
        closed: Mutex::new(false),
    });
    let result = run_inner(reader, &out, req, ctx, timeline);
    // The host sees EOF after `Exit` (or the error frame); the reader thread unblocks.
    let _ = closer.shutdown_conn(Shutdown::Both);
    result
}

fn fail_early<C: Conn>(out: &Output<C>, msg: String, code: i32) -> Result<(), ExecError> {
    out.send(&Frame::new(FrameType::Stderr, msg.into_bytes()))
        .map_err(|source| ExecError::Send {
            what: "stderr",
            source,
        })?;
    send_exit(out, ExitStatus { code, signal: None }, None)
}

/// Sends `Exit` (with the session's timing when it was asked for).
fn send_exit<C: Conn>(
    out: &Output<C>,
    status: ExitStatus,
    timing: Option<GuestTiming>,
) -> Result<(), ExecError> {
    let frame = match timing {
        None => Frame::json(FrameType::Exit, &status),
        Some(timing) => Frame::json(
            FrameType::Exit,
            &TimedExit {
                status,
                timing: Some(timing),
            },
        ),
    }
    .map_err(|source| ExecError::Send {
        what: "exit",
        source,
    })?;
    out.send_last(&frame).map_err(|source| ExecError::Send {
        what: "exit",
        source,
    })
}

fn send_error<C: Conn>(out: &Output<C>, msg: &str) -> Result<(), ExecError> {
    out.send_last(&Frame::new(FrameType::Error, msg.as_bytes().to_vec()))
        .map_err(|source| ExecError::Send {
            what: "error",
            source,
        })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), nix::Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// Why a session ends before its command runs.
enum Refusal {
    /// Protocol misuse: an `Error` frame.
    Protocol(&'static str),
    /// What a shell would say: the message on `Stderr`, then `Exit` with the code.
    Exit(String, i32),
}

impl Refusal {
    fn send<C: Conn>(self, out: &Output<C>) -> Result<(), ExecError> {
        match self {
            Refusal::Protocol(msg) => send_error(out, msg),
            Refusal::Exit(msg, code) => fail_early(out, msg, code),
        }
    }
}

/// Parent-side ends of the child's stdio: output sources, stdin sink, pty master.
struct Wiring {
    sources: Vec<(FrameType, File)>,
    stdin_sink: Option<File>,
    master: Option<Arc<File>>,
}

/// What the session thread keeps of a started session (the reader thread has the rest).
struct Running {
    done: Arc<Done>,
    /// The output sources the session thread pumps itself.
    sources: Vec<(FrameType, File)>,
    master: Option<Arc<File>>,
}

fn run_inner<C: Conn>(
    reader: C,
    out: &Arc<Output<C>>,
    req: ExecRequest,
    ctx: &ExecContext,
    mut timeline: Timeline,
) -> Result<(), ExecError> {
    let (env, cwd, ident) = match check_request(&req, ctx) {
        Ok(x) => x,
        Err(refusal) => return refusal.send(out),
    };
    let (wiring, stdio) = wire_stdio(&req)?;
    let setup = match child_setup(&ident, req.tty.is_some(), ctx) {
        Ok(s) => s,
        Err(refusal) => return refusal.send(out),
    };
    let spec = SpawnSpec {
        argv: &req.argv,
        env: &env,
        cwd,
        stdio,
        setup,
    };
    let mut pidfd = None;
    let spawned = reaper::global().spawn_with(
        || {
            let pid = spawn::spawn(&spec)?;
            // Under the reaper's lock: the child cannot have been reaped yet, so the pidfd
            // is surely this child's.
            pidfd = sys::pidfd_open(pid).ok();
            Ok(pid)
        },
        true,
    );
    // Close our copies of the child's ends (pipe write sides, pty slave) right away.
    drop(spec);
    let argv0 = req.argv.first().map(String::as_str).unwrap_or_default();
    let (pid, exit_rx) = match spawned {
        Ok(x) => x,
        Err(e) => {
            let (msg, code) = spawn_failure(argv0, &e);
            return fail_early(out, msg, code);
        }
    };
    timeline.timing.spawned_us = timeline.now();
    tracing::debug!(pid, argv0 = %argv0, "command started");
    let started =
        Frame::json(FrameType::Started, &Started { pid }).map_err(|source| ExecError::Send {
            what: "started",
            source,
        })?;
    // If the host is already gone the reader notices and cancels; keep going.
    let _ = out.send(&started);
    timeline.timing.started_us = timeline.now();
    let running = start_threads(reader, pid, wiring, req.tty.is_some())?;
    let timeline = req.timing.then_some(timeline);
    finish(out, pid, &exit_rx, pidfd, running, timeline)
}

/// The command's environment (the request's, plus `HOME` of its user unless set), working
/// directory and user, or why it cannot run.
fn check_request<'r>(
    req: &'r ExecRequest,
    ctx: &ExecContext,
) -> Result<(BTreeMap<String, String>, &'r str, user::Identity), Refusal> {
    match req.argv.first() {
        None => return Err(Refusal::Protocol("exec: empty argv")),
        Some(a) if a.is_empty() => return Err(Refusal::Protocol("exec: empty argv[0]")),
        Some(_) => {}
    }
    let ident = user::resolve_in(&req.user, &ctx.root).map_err(|e| {
        Refusal::Exit(
            format!("matchlock: resolve user {:?}: {e}\n", req.user),
            127,
        )
    })?;
    let cwd = if req.cwd.is_empty() { "/" } else { &req.cwd };
    if !Path::new(cwd).is_dir() {
        return Err(Refusal::Exit(
            format!("matchlock: chdir {cwd:?}: no such directory\n"),
            127,
        ));
    }
    let mut env = req.env.clone();
    if !env.contains_key("HOME") {
        let home = ident.home.as_deref().unwrap_or("/");
        env.insert("HOME".into(), home.into());
    }
    Ok((env, cwd, ident))
}

/// Connects the child's stdio (fds 0, 1, 2) to a new pty or to pipes.
fn wire_stdio(req: &ExecRequest) -> Result<(Wiring, [OwnedFd; 3]), ExecError> {
    match req.tty {
        Some(size) => wire_pty(size),
        None => wire_pipes(req.stdin),
    }
}

/// stdin, stdout and stderr on one pty slave; the master is both the output and input side.
fn wire_pty(size: WinSize) -> Result<(Wiring, [OwnedFd; 3]), ExecError> {
    let pty = nix::pty::openpty(Some(&to_winsize(size)), None).map_err(ExecError::OpenPty)?;
    // `openpty` leaves both fds inheritable: the command must get the slave only as 0/1/2,
    // never the master (or a stray slave) as an extra fd.
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(ExecError::OpenPty)?;
    }
    let slave = File::from(pty.slave);
    let master = File::from(pty.master);
    let dup = |f: &File| f.try_clone().map_err(ExecError::DupMaster);
    let stdio = [dup(&slave)?.into(), dup(&slave)?.into(), slave.into()];
    let wiring = Wiring {
        sources: vec![(FrameType::Stdout, dup(&master)?)],
        stdin_sink: Some(dup(&master)?),
        master: Some(Arc::new(master)),
    };
    Ok((wiring, stdio))
}

/// One pipe per output stream; stdin is a pipe only if the host sends input, else
/// `/dev/null`.
fn wire_pipes(stdin: bool) -> Result<(Wiring, [OwnedFd; 3]), ExecError> {
    let pipe_for = |what: &'static str| pipe().map_err(|source| ExecError::Pipe { what, source });
    let (out_r, out_w) = pipe_for("stdout")?;
    let (err_r, err_w) = pipe_for("stderr")?;
    let (child_in, stdin_sink) = if stdin {
        let (in_r, in_w) = pipe_for("stdin")?;
        (in_r, Some(File::from(in_w)))
    } else {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .open("/dev/null")
            .map_err(ExecError::DevNull)?;
        (OwnedFd::from(null), None)
    };
    let wiring = Wiring {
        sources: vec![
            (FrameType::Stdout, File::from(out_r)),
            (FrameType::Stderr, File::from(err_r)),
        ],
        stdin_sink,
        master: None,
    };
    Ok((wiring, [child_in, out_w, err_w]))
}

/// Session, user and (unless privileged) the hardening the child applies to itself.
fn child_setup(
    ident: &user::Identity,
    tty: bool,
    ctx: &ExecContext,
) -> Result<ChildSetup, Refusal> {
    let seccomp = if ctx.privileged {
        None
    } else {
        let program = sys::seccomp_program()
            .map_err(|e| Refusal::Exit(format!("matchlock: seccomp filter: {e}\n"), 126))?;
        Some(program)
    };
    Ok(ChildSetup {
        controlling_tty: tty,
        readonly_kernel_fs: !ctx.privileged,
        drop_caps: !ctx.privileged,
        uid: ident.uid,
        gid: ident.gid,
        groups: ident.all_groups(),
        seccomp,
    })
}

/// Starts the stdin writer (if the command has a stdin to feed) and the host reader; the
/// output is pumped by the session thread itself ([`finish`]).
fn start_threads<C: Conn>(
    reader: C,
    pid: i32,
    wiring: Wiring,
    tty: bool,
) -> Result<Running, ExecError> {
    let done = Arc::new(Done::default());
    let stdin_tx = match wiring.stdin_sink {
        Some(sink) => Some(spawn_stdin(sink, tty)?),
        None => None,
    };
    let reader_done = Arc::clone(&done);
    let reader_master = wiring.master.clone();
    crate::pool::global()
        .run("exec-reader", move || {
            read_host(
                reader,
                pid,
                &reader_done,
                stdin_tx,
                reader_master.as_deref(),
            );
        })
        .map_err(|source| ExecError::Thread {
            what: "reader",
            source,
        })?;
    Ok(Running {
        done,
        sources: wiring.sources,
        master: wiring.master,
    })
}

/// Pumps output until the command exits, drains what is left (bounded by
/// [`DRAIN_TIMEOUT`]) and sends `Exit`.
fn finish<C: Conn>(
    out: &Output<C>,
    pid: i32,
    exit_rx: &Receiver<reaper::Exit>,
    pidfd: Option<OwnedFd>,
    running: Running,
    mut timeline: Option<Timeline>,
) -> Result<(), ExecError> {
    let mut pump = Pump {
        sources: running.sources,
        buf: vec![0u8; CHUNK],
        host_gone: false,
    };
    let exit = pump
        .until_exit(out, pidfd.as_ref(), exit_rx)
        .ok_or(ExecError::LostExit { pid })?;
    if let Some(t) = timeline.as_mut() {
        t.timing.exited_us = t.now();
    }
    running.done.set();
    // The reaper already SIGKILLed the rest of the group; drain what they wrote.
    if !pump.drain(out, Instant::now() + DRAIN_TIMEOUT) {
        tracing::debug!(pid, "output still held open after exit; not waiting");
    }
    drop(pump);
    drop(running.master);
    tracing::debug!(pid, ?exit, "command exited");
    let timing = timeline.map(|mut t| {
        t.timing.exit_us = t.now();
        t.timing
    });
    if let Err(e) = send_exit(out, exit.to_status(), timing) {
        // Normal after a cancellation: the host closed the connection first.
        tracing::debug!(pid, error = %e, "exit not delivered");
    }
    Ok(())
}

/// How often the exit is checked for when there is no pidfd, in ms.
const NO_PIDFD_TICK: u16 = 20;

/// The command's output sources (stdout/stderr pipes, or the pty master), copied to frames
/// by the session thread: one `poll` over all of them, no thread per source.
struct Pump {
    sources: Vec<(FrameType, File)>,
    buf: Vec<u8>,
    /// A send failed: keep reading (so the command never blocks on a full pipe) but drop
    /// the data; the reader thread handles the cancellation.
    host_gone: bool,
}

impl Pump {
    /// Copies output until the command exits (the reaper's status; `None` if the reaper
    /// dropped it). `pidfd` wakes us at the exit; without one (a kernel before 5.3) the
    /// reaper's channel is checked every [`NO_PIDFD_TICK`].
    fn until_exit<C: Conn>(
        &mut self,
        out: &Output<C>,
        pidfd: Option<&OwnedFd>,
        exit_rx: &Receiver<reaper::Exit>,
    ) -> Option<reaper::Exit> {
        loop {
            let timeout = match pidfd {
                Some(_) => PollTimeout::NONE,
                None => match exit_rx.try_recv() {
                    Ok(exit) => return Some(exit),
                    Err(mpsc::TryRecvError::Disconnected) => return None,
                    Err(mpsc::TryRecvError::Empty) => PollTimeout::from(NO_PIDFD_TICK),
                },
            };
            let Some((exited, ready)) = self.poll(pidfd, timeout) else {
                return exit_rx.recv().ok();
            };
            self.read_ready(out, &ready);
            if exited {
                return exit_rx.recv().ok();
            }
        }
    }

    /// Copies output until every source is at EOF (true) or `deadline` passes (false).
    fn drain<C: Conn>(&mut self, out: &Output<C>, deadline: Instant) -> bool {
        while !self.sources.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let Some((_, ready)) = self.poll(None, PollTimeout::from(ms)) else {
                return false;
            };
            self.read_ready(out, &ready);
        }
        true
    }

    /// Polls the sources (and `pidfd`); returns whether `pidfd` fired and which sources are
    /// readable (or hung up), or `None` if polling itself failed.
    fn poll(&self, pidfd: Option<&OwnedFd>, timeout: PollTimeout) -> Option<(bool, Vec<bool>)> {
        let mut fds: Vec<PollFd<'_>> = self
            .sources
            .iter()
            .map(|(_, f)| PollFd::new(f.as_fd(), PollFlags::POLLIN))
            .collect();
        if let Some(p) = pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => return Some((false, vec![false; self.sources.len()])),
            Err(e) => {
                tracing::debug!(error = %e, "poll on output failed");
                return None;
            }
        }
        let fired = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
        let exited = pidfd.is_some() && fds.last().is_some_and(fired);
        let ready = fds.iter().take(self.sources.len()).map(fired).collect();
        Some((exited, ready))
    }

    /// One read from each ready source; sources at EOF (or EIO on a pty master, meaning
    /// every slave fd is closed) are dropped.
    fn read_ready<C: Conn>(&mut self, out: &Output<C>, ready: &[bool]) {
        let mut i = 0;
        let mut ready = ready.iter();
        while i < self.sources.len() {
            if !ready.next().copied().unwrap_or(false) {
                i += 1;
                continue;
            }
            let (kind, src) = &mut self.sources[i];
            match src.read(&mut self.buf) {
                Ok(0) => {
                    self.sources.remove(i);
                    continue;
                }
                Ok(n) => {
                    if !self.host_gone {
                        let frame = Frame::new(*kind, self.buf[..n].to_vec());
                        self.host_gone = out.send(&frame).is_err();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.sources.remove(i);
                    continue;
                }
            }
            i += 1;
        }
    }
}

fn to_winsize(size: WinSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn spawn_stdin(mut sink: File, tty: bool) -> Result<Sender<StdinMsg>, ExecError> {
    let (tx, rx): (Sender<StdinMsg>, Receiver<StdinMsg>) = mpsc::channel();
    std::thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || {
            for msg in rx {
                match msg {
                    StdinMsg::Data(d) => {
                        if sink.write_all(&d).is_err() {
                            // The child closed its stdin; drop further input.
                            if !tty {
                                return;
                            }
                        }
                    }
                    StdinMsg::Eof if tty => {
                        let _ = sink.write_all(&[0x04]);
                    }
                    StdinMsg::Eof => return,
                }
            }
        })
        .map_err(|source| ExecError::Thread {
            what: "stdin",
            source,
        })?;
    Ok(tx)
}

fn signal_group(pid: i32, sig: i32) {
    if let Err(e) = sys::kill_group(pid, sig) {
        tracing::debug!(pid, sig, error = %e, "signalling process group failed");
    }
}

/// Reads host frames until EOF; cancels the command if the host leaves before it exits.
fn read_host<C: Conn>(
    mut conn: C,
    pid: i32,
    done: &Done,
    mut stdin: Option<Sender<StdinMsg>>,
    master: Option<&File>,
) {
    loop {
        let frame = match read_frame(&mut conn) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(pid, error = %e, "exec connection read failed");
                break;
            }
        };
        match frame.kind {
            FrameType::Stdin => {
                if let Some(tx) = &stdin {
                    let _ = tx.send(StdinMsg::Data(frame.payload));
                }
            }
            FrameType::StdinEof => {
                if let Some(tx) = &stdin {
                    let _ = tx.send(StdinMsg::Eof);
                }
                if master.is_none() {
                    stdin = None;
                }
            }
            FrameType::Resize => match (WinSize::decode(&frame.payload), master) {
                (Ok(size), Some(m)) => {
                    if let Err(e) = sys::set_winsize(m.as_fd(), size) {
                        tracing::debug!(pid, error = %e, "resize failed");
                    }
                }
                (Err(e), _) => tracing::debug!(pid, error = %e, "bad resize frame"),
                (Ok(_), None) => {}
            },
            FrameType::Signal => {
                // Any number the kernel accepts (incl. real-time signals); 0 is a no-op probe.
                let sig = match frame.payload.as_slice() {
                    [n] if *n > 0 && i32::from(*n) <= libc::SIGRTMAX() => Some(i32::from(*n)),
                    _ => None,
                };
                match sig {
                    Some(sig) if !done.is_set() => signal_group(pid, sig),
                    Some(_) => {}
                    None => tracing::debug!(pid, payload = ?frame.payload, "bad signal frame"),
                }
            }
            other => tracing::debug!(pid, ?other, "unexpected frame in exec session"),
        }
    }
    drop(stdin);
    if done.is_set() {
        return;
    }
    tracing::debug!(pid, "host left before exit; killing the process group");
    signal_group(pid, libc::SIGTERM);
    if !done.wait(Duration::from_millis(KILL_GRACE_MS)) {
        signal_group(pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    use matchlock_guest_proto::{read_frame_required, write_frame};

    struct Outcome {
        pid: Option<i32>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        exit: Option<ExitStatus>,
        error: Option<String>,
    }

    fn req(argv: &[&str]) -> ExecRequest {
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string(),
        );
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env,
            ..Default::default()
        }
    }

    fn start(r: ExecRequest) -> (UnixStream, JoinHandle<Result<(), ExecError>>) {
        start_with(r, true)
    }

    fn start_with(
        r: ExecRequest,
        privileged: bool,
    ) -> (UnixStream, JoinHandle<Result<(), ExecError>>) {
        let (host, guest) = UnixStream::pair().expect("pair");
        let ctx = ExecContext {
            root: PathBuf::from("/"),
            privileged,
        };
        let h = std::thread::spawn(move || run(guest, r, &ctx, Timeline::new(Instant::now())));
        (host, h)
    }

    fn collect(host: &mut UnixStream) -> Outcome {
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut o = Outcome {
            pid: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: None,
            error: None,
        };
        loop {
            let f = read_frame_required(host).expect("frame");
            match f.kind {
                FrameType::Started => {
                    o.pid = Some(f.parse::<Started>("started").expect("json").pid)
                }
                FrameType::Stdout => o.stdout.extend_from_slice(&f.payload),
                FrameType::Stderr => o.stderr.extend_from_slice(&f.payload),
                FrameType::Exit => {
                    o.exit = Some(f.parse("exit").expect("json"));
                    break;
                }
                FrameType::Error => {
                    o.error = Some(String::from_utf8_lossy(&f.payload).into_owned());
                    break;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        // Nothing may follow the last frame.
        assert!(read_frame(host).expect("eof").is_none());
        o
    }

    fn run_to_end(r: ExecRequest) -> Outcome {
        let (mut host, h) = start(r);
        let o = collect(&mut host);
        h.join().expect("join").expect("session");
        o
    }

    /// The raw `Exit` frame of a session (everything before it skipped).
    fn exit_frame(r: ExecRequest) -> Frame {
        let (mut host, h) = start(r);
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let exit = loop {
            let f = read_frame_required(&mut host).expect("frame");
            if f.kind == FrameType::Exit {
                break f;
            }
        };
        h.join().expect("join").expect("session");
        exit
    }

    /// The guest's marks come back in `Exit` only when asked for, in the order the steps
    /// happen (the benchmark's exec timeline).
    #[test]
    fn timing_is_sent_only_when_asked_and_in_order() {
        let plain = exit_frame(req(&["true"]));
        assert!(
            !String::from_utf8_lossy(&plain.payload).contains("timing"),
            "{:?}",
            String::from_utf8_lossy(&plain.payload)
        );
        let mut r = req(&["sh", "-c", "sleep 0.05"]);
        r.timing = true;
        let timed: TimedExit = exit_frame(r).parse("exit").expect("timed exit");
        assert_eq!(timed.status.code, 0);
        let t = timed.timing.expect("timing requested");
        let marks = [
            t.session_us,
            t.request_us,
            t.spawned_us,
            t.started_us,
            t.exited_us,
            t.exit_us,
        ];
        assert!(marks.windows(2).all(|w| w[0] <= w[1]), "{t:?}");
        // The command slept 50 ms between its start and its exit.
        assert!(t.exited_us - t.started_us >= 50_000, "{t:?}");
    }

    #[test]
    fn unprivileged_commands_are_hardened() {
        let status = |privileged: bool| {
            let (mut host, h) = start_with(
                req(&[
                    "grep",
                    "-E",
                    "^(NoNewPrivs|Seccomp|CapBnd):",
                    "/proc/self/status",
                ]),
                privileged,
            );
            let o = collect(&mut host);
            h.join().expect("join").expect("session");
            assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let hardened = status(false);
        assert!(hardened.contains("NoNewPrivs:\t1"), "{hardened}");
        assert!(hardened.contains("Seccomp:\t2"), "{hardened}");
        let bnd = hardened
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:\t"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("CapBnd");
        for cap in crate::sys::DROPPED_CAPS {
            assert_eq!(
                bnd & (1 << cap),
                0,
                "capability {cap} still in the bounding set"
            );
        }
        // Privileged commands inherit whatever this test process has.
        let nnp = |s: &str| {
            s.lines()
                .find(|l| l.starts_with("NoNewPrivs:"))
                .map(str::to_owned)
        };
        let own = std::fs::read_to_string("/proc/self/status").expect("status");
        assert_eq!(nnp(&status(true)), nnp(&own));
    }

    #[test]
    fn unprivileged_commands_see_kernel_interfaces_read_only() {
        // Rewriting the current value is harmless if the protection were missing.
        let script = "cat /proc/sys/kernel/hostname > /proc/sys/kernel/hostname && echo wrote; \
                      grep -E ' /(proc/sys|sys|sys/fs/cgroup) ' /proc/self/mountinfo";
        let (mut host, h) = start_with(req(&["sh", "-c", script]), false);
        let o = collect(&mut host);
        h.join().expect("join").expect("session");
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!out.contains("wrote"), "{out}");
        assert!(err.contains("Read-only file system"), "{err}");
        let mounts: Vec<&str> = out.lines().collect();
        assert!(mounts.iter().any(|l| l.contains(" /proc/sys ")), "{out}");
        assert!(mounts.iter().any(|l| l.contains(" /sys ")), "{out}");
        for line in mounts {
            // Field 6 holds the per-mount options.
            let opts = line.split(' ').nth(5).unwrap_or_default();
            assert!(opts.split(',').any(|o| o == "ro"), "not read-only: {line}");
        }
        // The agent's own view (and privileged commands') stays writable.
        let own = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let proc_sys_bound = own
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/proc/sys"));
        assert!(
            !proc_sys_bound,
            "the bind mount leaked into the parent namespace"
        );
    }

    fn code(o: &Outcome) -> i32 {
        o.exit.expect("exit").code
    }

    #[test]
    fn echo() {
        let o = run_to_end(req(&["echo", "hi"]));
        assert!(o.pid.is_some());
        assert_eq!(o.stdout, b"hi\n");
        assert_eq!(code(&o), 0);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(code(&run_to_end(req(&["sh", "-c", "exit 42"]))), 42);
        let o = run_to_end(req(&["sh", "-c", "kill -9 $$"]));
        assert_eq!(
            o.exit,
            Some(ExitStatus {
                code: 137,
                signal: Some(9)
            })
        );
    }

    #[test]
    fn not_found_and_not_executable() {
        let o = run_to_end(req(&["definitely-not-a-command-xyz"]));
        assert_eq!(code(&o), 127);
        assert!(o.pid.is_none());
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "matchlock: exec \"definitely-not-a-command-xyz\": not found\n"
        );
        assert_eq!(code(&run_to_end(req(&["/etc/passwd"]))), 126);
        let mut r = req(&["pwd"]);
        r.cwd = "/nonexistent-dir".into();
        let o = run_to_end(r);
        assert_eq!(code(&o), 127);
        assert!(String::from_utf8_lossy(&o.stderr).contains("chdir"));
        let mut r = req(&["id"]);
        r.user = "no-such-user-xyz".into();
        let o = run_to_end(r);
        assert_eq!(code(&o), 127);
        assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
        assert!(run_to_end(req(&[])).error.is_some());
    }

    #[test]
    fn env_cwd_and_user() {
        let mut r = req(&["sh", "-c", "echo $FOO:$HOME:$(pwd):$(id -u):$(id -g)"]);
        r.env.insert("FOO".into(), "bar".into());
        r.cwd = "/tmp".into();
        r.user = "4242:4343".into();
        let o = run_to_end(r);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "bar:/:/tmp:4242:4343\n");
        // The inherited environment is cleared.
        let o = run_to_end(req(&["sh", "-c", "echo ${CARGO:-unset}"]));
        assert_eq!(o.stdout, b"unset\n");
    }

    #[test]
    fn script_without_shebang_runs_with_sh() {
        // `execvp` semantics: ENOEXEC falls back to `/bin/sh <file> args...`.
        let dir = std::env::temp_dir().join(format!("mlg-noshebang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let script = dir.join("noshebang");
        std::fs::write(&script, "echo ran:$0:$1\n").expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let path = script.to_string_lossy().into_owned();
        let o = run_to_end(req(&[&path, "arg1"]));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("ran:{path}:arg1\n")
        );
    }

    #[test]
    fn commands_start_with_default_signals() {
        // The agent (like every Rust program) ignores SIGPIPE and the spawner blocks all
        // signals around the clone: neither may leak into the command.
        let o = run_to_end(req(&["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"]));
        assert_eq!(code(&o), 0);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let mask = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .expect("mask")
        };
        assert_eq!(mask("SigBlk:"), 0, "{text}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
    }

    #[test]
    fn stdin_through_cat() {
        let mut r = req(&["cat"]);
        r.stdin = true;
        let (mut host, h) = start(r);
        write_frame(&mut host, &Frame::new(FrameType::Stdin, b"hello ".to_vec())).expect("w");
        write_frame(&mut host, &Frame::new(FrameType::Stdin, b"world".to_vec())).expect("w");
        write_frame(&mut host, &Frame::empty(FrameType::StdinEof)).expect("w");
        let o = collect(&mut host);
        h.join().expect("join").expect("session");
        assert_eq!(o.stdout, b"hello world");
        assert_eq!(code(&o), 0);
    }

    #[test]
    fn large_output_both_streams() {
        let o = run_to_end(req(&["sh", "-c", "seq 1 200000; seq 1 200000 >&2"]));
        let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
        assert_eq!(o.stdout.len(), expected.len());
        assert!(o.stdout == expected.as_bytes());
        assert!(o.stderr == expected.as_bytes());
        assert_eq!(code(&o), 0);
    }

    #[test]
    fn drain_is_bounded_when_outsider_holds_output() {
        // `setsid` moves the writer out of the command's group, so the group kill misses it
        // and it keeps stdout open (and busy) for seconds.
        let t = Instant::now();
        let o = run_to_end(req(&[
            "sh",
            "-c",
            "setsid sh -c 'echo pid:$$; for i in $(seq 500); do echo spam; sleep 0.01; done' & \
             sleep 0.2; echo done",
        ]));
        assert_eq!(code(&o), 0);
        assert!(String::from_utf8_lossy(&o.stdout).contains("done"));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // Once the pump gives up it closes the read end, and the outsider dies of SIGPIPE on
        // its next write (a pump that never gives up would keep it alive for 5 s).
        let text = String::from_utf8_lossy(&o.stdout);
        let pid: i32 = text
            .lines()
            .find_map(|l| l.strip_prefix("pid:"))
            .and_then(|p| p.parse().ok())
            .expect("outsider pid");
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "outsider {pid} still writing");
    }

    #[test]
    fn background_child_does_not_hold_exit() {
        let t = Instant::now();
        let o = run_to_end(req(&["sh", "-c", "sleep 100 & echo bg"]));
        assert_eq!(o.stdout, b"bg\n");
        assert_eq!(code(&o), 0);
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    /// True while `pid` exists and is not a zombie. Orphans of the test process are reaped by
    /// the host's init, so a dead one may linger as a zombie for a moment.
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[test]
    fn host_close_kills_group() {
        let mut r = req(&["sh", "-c", "sleep 1000 & echo $!; sleep 1000"]);
        r.stdin = true;
        let (mut host, h) = start(r);
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let started = read_frame_required(&mut host).expect("started");
        let pid = started.parse::<Started>("started").expect("json").pid;
        let out = read_frame_required(&mut host).expect("stdout");
        assert_eq!(out.kind, FrameType::Stdout);
        let bg: i32 = String::from_utf8_lossy(&out.payload)
            .trim()
            .parse()
            .expect("bg pid");
        // Even after StdinEof, closing the connection cancels.
        write_frame(&mut host, &Frame::empty(FrameType::StdinEof)).expect("w");
        assert!(alive(pid) && alive(bg));
        drop(host);
        h.join().expect("join").expect("session");
        // The session returns once the leader is reaped; the reaper SIGKILLs the rest of the
        // group at that moment, but the kernel may take a little while to tear it down.
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "main process {pid} still exists"
        );
        assert!(
            gone_within(bg, Duration::from_secs(10)),
            "background process {bg} still exists"
        );
    }

    /// Polls [`alive`] until `pid` is gone or `timeout` passes; true if it is gone.
    fn gone_within(pid: i32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while alive(pid) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    #[test]
    fn signal_frame() {
        let (mut host, h) = start(req(&["sleep", "1000"]));
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let _ = read_frame_required(&mut host).expect("started");
        write_frame(&mut host, &Frame::new(FrameType::Signal, vec![15])).expect("w");
        let o = collect(&mut host);
        h.join().expect("join").expect("session");
        assert_eq!(
            o.exit,
            Some(ExitStatus {
                code: 143,
                signal: Some(15)
            })
        );

        // Real-time signals are delivered too (default action: terminate).
        let (mut host, h) = start(req(&["sleep", "1000"]));
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let _ = read_frame_required(&mut host).expect("started");
        write_frame(&mut host, &Frame::new(FrameType::Signal, vec![40])).expect("w");
        let o = collect(&mut host);
        h.join().expect("join").expect("session");
        assert_eq!(
            o.exit,
            Some(ExitStatus {
                code: 168,
                signal: Some(40)
            })
        );
    }

    #[test]
    fn tty_mode() {
        let mut r = req(&["sh", "-c", "tty; stty size"]);
        r.tty = Some(WinSize {
            rows: 33,
            cols: 101,
        });
        let o = run_to_end(r);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.starts_with("/dev/pts/"), "{text:?}");
        assert!(text.contains("33 101"), "{text:?}");
        assert!(o.stderr.is_empty());
        assert_eq!(code(&o), 0);
    }

    #[test]
    fn commands_get_no_pty_fds_beyond_stdio() {
        // Neither the pty master nor a stray slave may leak into a command (fds 0-2 are
        // its stdio; the test harness may pass unrelated fds of its own, so only ptys are
        // checked). Both modes, since another session's pty must not leak either.
        for tty in [false, true] {
            let mut r = req(&["ls", "-l", "/proc/self/fd/"]);
            r.tty = tty.then_some(WinSize { rows: 24, cols: 80 });
            let o = run_to_end(r);
            assert_eq!(code(&o), 0);
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let leaked: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split_once(" -> "))
                .filter(|(a, _)| {
                    let fd = a.rsplit(' ').next().unwrap_or_default();
                    !["0", "1", "2"].contains(&fd)
                })
                .filter(|(_, target)| target.contains("/dev/pt"))
                .map(|(a, _)| a)
                .collect();
            assert!(leaked.is_empty(), "tty={tty}: {text}");
        }
    }

    #[test]
    fn tty_stdin_eof_and_close_kills() {
        let mut r = req(&["cat"]);
        r.tty = Some(WinSize { rows: 24, cols: 80 });
        let (mut host, h) = start(r);
        write_frame(&mut host, &Frame::new(FrameType::Stdin, b"abc\n".to_vec())).expect("w");
        write_frame(&mut host, &Frame::empty(FrameType::StdinEof)).expect("w");
        let o = collect(&mut host);
        h.join().expect("join").expect("session");
        assert!(String::from_utf8_lossy(&o.stdout).contains("abc"));
        assert_eq!(code(&o), 0);

        let mut r = req(&["sleep", "1000"]);
        r.tty = Some(WinSize { rows: 24, cols: 80 });
        let (mut host, h) = start(r);
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let pid = read_frame_required(&mut host)
            .expect("started")
            .parse::<Started>("started")
            .expect("json")
            .pid;
        drop(host);
        h.join().expect("join").expect("session");
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "{pid} still exists"
        );
    }
}

//! Host side of an exec session.
//!
//! # Design
//! One connection per command. The reader half turns `Stdout`/`Stderr` frames into writes on
//! the caller's sinks and ends at `Exit`; the writer half forwards stdin, window resizes and
//! signals. Cancellation drops the connection, which makes the guest kill the command's whole
//! process group, in every mode.
//!
//! Output is written to the caller's sinks with back-pressure: while a sink is not ready
//! (a slow JSON-RPC client, a full terminal), no more frames are read from the guest, so the
//! guest's pipe fills and the command blocks; host memory stays at one frame per command.
//! A cancel also ends a write that is waiting. The guest must accept the request and answer
//! it (`Started` or `Error`) within [`REPLY_TIMEOUT`]; a wedged agent is an error naming
//! that step.

use std::collections::BTreeMap;

use matchlock_api::ImageConfig;
use matchlock_guest_proto::{
    ExecRequest, ExitStatus, Frame, FrameType, GuestTiming, ProtoError, Started, TimedExit,
    WinSize, CHUNK,
};

use crate::codec::{read_frame, write_frame, REPLY_TIMEOUT};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The default `PATH` when neither the image nor the caller sets one (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("send request to the guest")]
    SendRequest(#[source] ProtoError),
    #[error("the guest did not accept the exec request within {0:?}")]
    SendTimeout(Duration),
    #[error("the guest did not start the command within {0:?}")]
    StartTimeout(Duration),
    #[error("guest connection failed")]
    Receive(#[source] ProtoError),
    #[error("write command output")]
    Output(#[source] std::io::Error),
    #[error("guest closed the connection before the command finished")]
    ClosedEarly,
    #[error("{0}")]
    Guest(String),
    #[error("command cancelled")]
    Cancelled,
    #[error("unexpected {0:?} frame from the guest")]
    Unexpected(FrameType),
}

/// Where a command's I/O goes.
pub struct ExecIo {
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
    pub stderr: Box<dyn AsyncWrite + Send + Unpin>,
    /// Forwarded as `Stdin` frames, then `StdinEof` (requires `ExecRequest::stdin` or `tty`).
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub resize: Option<mpsc::Receiver<WinSize>>,
    /// Signals to deliver to the command's process group.
    pub signals: Option<mpsc::Receiver<u8>>,
    pub cancel: CancellationToken,
}

impl ExecIo {
    /// Output to the given sinks, no stdin.
    pub fn new(
        stdout: Box<dyn AsyncWrite + Send + Unpin>,
        stderr: Box<dyn AsyncWrite + Send + Unpin>,
        cancel: CancellationToken,
    ) -> Self {
        ExecIo {
            stdout,
            stderr,
            stdin: None,
            resize: None,
            signals: None,
            cancel,
        }
    }
}

/// Where one exec's time went (the benchmark's exec timeline): host steps on the host's
/// monotonic clock, guest steps as the guest measured them (its clock is not the host's,
/// so only differences within each side are meaningful).
#[derive(Debug, Clone, Copy)]
pub struct ExecTimeline {
    /// The caller asked for the exec.
    pub begin: Instant,
    /// The guest connection is open (vsock connect or mux stream open).
    pub connected: Instant,
    /// The `Exec` frame is written.
    pub sent: Instant,
    /// `Started` arrived.
    pub started: Option<Instant>,
    /// `Exit` arrived.
    pub exited: Option<Instant>,
    /// The guest's own marks (sent in `Exit` because the request asked for them).
    pub guest: Option<GuestTiming>,
}

impl ExecTimeline {
    /// A timeline whose connection opened between `begin` and `connected`.
    pub fn new(begin: Instant, connected: Instant) -> Self {
        ExecTimeline {
            begin,
            connected,
            sent: connected,
            started: None,
            exited: None,
            guest: None,
        }
    }
}

/// Runs one command over `stream` (a fresh connection to the guest's service port, or to
/// the exec relay) and returns how it ended.
pub async fn run_exec<S>(stream: S, req: &ExecRequest, io: ExecIo) -> Result<ExitStatus, ExecError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    run_exec_marked(stream, req, io, None).await
}

/// [`run_exec`] that also fills in `timeline` (and asks the guest for its marks).
pub async fn run_exec_timed<S>(
    stream: S,
    req: &ExecRequest,
    io: ExecIo,
    timeline: &mut ExecTimeline,
) -> Result<ExitStatus, ExecError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let req = ExecRequest {
        timing: true,
        ..req.clone()
    };
    run_exec_marked(stream, &req, io, Some(timeline)).await
}

async fn run_exec_marked<S>(
    stream: S,
    req: &ExecRequest,
    io: ExecIo,
    mut timeline: Option<&mut ExecTimeline>,
) -> Result<ExitStatus, ExecError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let frame = Frame::json(FrameType::Exec, req).map_err(ExecError::SendRequest)?;
    tokio::select! {
        r = tokio::time::timeout(REPLY_TIMEOUT, write_frame(&mut wr, &frame)) => match r {
            Ok(r) => r.map_err(ExecError::SendRequest)?,
            Err(_) => return Err(ExecError::SendTimeout(REPLY_TIMEOUT)),
        },
        () = io.cancel.cancelled() => return Err(ExecError::Cancelled),
    }
    if let Some(t) = timeline.as_deref_mut() {
        t.sent = Instant::now();
    }
    let ExecIo {
        mut stdout,
        mut stderr,
        stdin,
        resize,
        signals,
        cancel,
    } = io;

    // Input pump: stdin, resizes and signals go out on the write half.
    let pump_cancel = cancel.child_token();
    let pump = tokio::spawn(input_pump(wr, stdin, resize, signals, pump_cancel.clone()));

    let result = async {
        let mut answered = false;
        loop {
            let frame = tokio::select! {
                f = next_frame(&mut rd, answered) => f?,
                () = cancel.cancelled() => return Err(ExecError::Cancelled),
            };
            let Some(frame) = frame else {
                return Err(ExecError::ClosedEarly);
            };
            answered = true;
            match frame.kind {
                FrameType::Started => {
                    if let Some(t) = timeline.as_deref_mut() {
                        t.started = Some(Instant::now());
                    }
                    let s: Started = frame.parse("started").map_err(ExecError::Receive)?;
                    tracing::debug!(pid = s.pid, "guest command started");
                }
                FrameType::Stdout => deliver(&mut stdout, &frame.payload, &cancel).await?,
                FrameType::Stderr => deliver(&mut stderr, &frame.payload, &cancel).await?,
                FrameType::Exit => {
                    let Some(t) = timeline.as_deref_mut() else {
                        return frame
                            .parse::<ExitStatus>("exit")
                            .map_err(ExecError::Receive);
                    };
                    t.exited = Some(Instant::now());
                    let exit: TimedExit = frame.parse("exit").map_err(ExecError::Receive)?;
                    t.guest = exit.timing;
                    return Ok(exit.status);
                }
                FrameType::Error => {
                    return Err(ExecError::Guest(
                        String::from_utf8_lossy(&frame.payload).into_owned(),
                    ))
                }
                other => return Err(ExecError::Unexpected(other)),
            }
        }
    }
    .await;
    pump_cancel.cancel();
    // Dropping the write half (inside the pump) closes our side of the connection; if the
    // command had not finished, the guest kills its process group.
    let _ = pump.await;
    result
}

/// The next frame from the guest; the first one (its answer to the request) within
/// [`REPLY_TIMEOUT`].
async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    answered: bool,
) -> Result<Option<Frame>, ExecError> {
    if answered {
        return read_frame(rd).await.map_err(ExecError::Receive);
    }
    match tokio::time::timeout(REPLY_TIMEOUT, read_frame(rd)).await {
        Ok(r) => r.map_err(ExecError::Receive),
        Err(_) => Err(ExecError::StartTimeout(REPLY_TIMEOUT)),
    }
}

/// Writes one chunk of output, waiting as long as the sink needs (back-pressure), unless
/// the command is cancelled meanwhile.
async fn deliver<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    data: &[u8],
    cancel: &CancellationToken,
) -> Result<(), ExecError> {
    tokio::select! {
        r = async { w.write_all(data).await?; w.flush().await } => r.map_err(ExecError::Output),
        () = cancel.cancelled() => Err(ExecError::Cancelled),
    }
}

async fn input_pump<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    mut resize: Option<mpsc::Receiver<WinSize>>,
    mut signals: Option<mpsc::Receiver<u8>>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => return,
            n = async { match stdin.as_mut() { Some(s) => s.read(&mut buf).await, None => std::future::pending().await } } => {
                match n {
                    Ok(0) | Err(_) => { stdin = None; Frame::empty(FrameType::StdinEof) }
                    Ok(n) => Frame::new(FrameType::Stdin, buf[..n].to_vec()),
                }
            }
            ws = async { match resize.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                match ws { Some(ws) => Frame::new(FrameType::Resize, ws.encode()), None => { resize = None; continue } }
            }
            sig = async { match signals.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                match sig { Some(s) => Frame::new(FrameType::Signal, vec![s]), None => { signals = None; continue } }
            }
        };
        if write_frame(&mut wr, &frame).await.is_err() {
            // The guest went away; the reader half reports it.
            cancel.cancelled().await;
            return;
        }
    }
}

/// Exec defaults of a sandbox (spec §5.8): applied to every command that does not override
/// them. Environment precedence, lowest first: default PATH < image ENV < config env <
/// request env.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecDefaults {
    pub env: BTreeMap<String, String>,
    /// Overrides every other environment source (secret placeholders).
    pub forced_env: BTreeMap<String, String>,
    pub cwd: String,
    pub user: String,
}

impl ExecDefaults {
    pub fn new(image: &ImageConfig, config_env: &BTreeMap<String, String>) -> Self {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.extend(image.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(config_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        ExecDefaults {
            env,
            forced_env: BTreeMap::new(),
            cwd: image.working_dir.clone(),
            user: image.user.clone(),
        }
    }

    /// Adds the network's environment: `defaults` under the image's, `forced` over all.
    pub fn with_network(
        mut self,
        forced: Vec<(String, String)>,
        defaults: Vec<(String, String)>,
    ) -> Self {
        for (k, v) in defaults {
            self.env.entry(k).or_insert(v);
        }
        self.forced_env.extend(forced);
        self
    }

    /// Fills in what `req` leaves empty; `req.env` entries override the defaults.
    pub fn apply(&self, req: &mut ExecRequest) {
        let mut env = self.env.clone();
        env.append(&mut req.env);
        env.extend(self.forced_env.clone());
        if req.tty.is_some() && !env.contains_key("TERM") {
            env.insert("TERM".to_string(), "xterm".to_string());
        }
        req.env = env;
        if req.cwd.is_empty() {
            req.cwd = if self.cwd.is_empty() {
                "/".to_string()
            } else {
                self.cwd.clone()
            };
        }
        if req.user.is_empty() {
            req.user = self.user.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_precedence() {
        let image = ImageConfig {
            env: [("PATH".into(), "/img".into()), ("A".into(), "img".into())].into(),
            working_dir: "/app".into(),
            user: "app".into(),
            ..Default::default()
        };
        let cfg: BTreeMap<String, String> =
            [("A".into(), "cfg".into()), ("B".into(), "cfg".into())].into();
        let d = ExecDefaults::new(&image, &cfg);
        let mut req = ExecRequest {
            argv: vec!["true".into()],
            env: [("B".into(), "req".into())].into(),
            ..Default::default()
        };
        d.apply(&mut req);
        assert_eq!(req.env["PATH"], "/img");
        assert_eq!(req.env["A"], "cfg");
        assert_eq!(req.env["B"], "req");
        assert_eq!(req.cwd, "/app");
        assert_eq!(req.user, "app");
        let mut req = ExecRequest {
            cwd: "/x".into(),
            user: "0".into(),
            tty: Some(WinSize { rows: 1, cols: 1 }),
            ..Default::default()
        };
        ExecDefaults::new(&ImageConfig::default(), &BTreeMap::new()).apply(&mut req);
        assert_eq!(req.env["PATH"], DEFAULT_PATH);
        assert_eq!(req.env["TERM"], "xterm");
        assert_eq!((req.cwd.as_str(), req.user.as_str()), ("/x", "0"));
    }

    /// A scripted guest on a socket pair: proves output ordering, exit decoding and that the
    /// connection closes when the command is cancelled.
    #[tokio::test]
    async fn exec_against_scripted_guest() {
        let (host, guest) = tokio::net::UnixStream::pair().expect("pair");
        let guest_task = tokio::spawn(async move {
            let mut g = guest;
            let f = read_frame(&mut g).await.expect("read").expect("frame");
            let req: ExecRequest = f.expect(FrameType::Exec, "exec").expect("json");
            assert_eq!(req.argv, ["echo", "hi"]);
            for f in [
                Frame::json(FrameType::Started, &Started { pid: 7 }).expect("j"),
                Frame::new(FrameType::Stdout, b"hi\n".to_vec()),
                Frame::new(FrameType::Stderr, b"warn\n".to_vec()),
                Frame::json(
                    FrameType::Exit,
                    &ExitStatus {
                        code: 3,
                        signal: None,
                    },
                )
                .expect("j"),
            ] {
                write_frame(&mut g, &f).await.expect("write");
            }
        });
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        let (err_w, mut err_r) = tokio::io::duplex(1024);
        let req = ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            ..Default::default()
        };
        let st = run_exec(
            host,
            &req,
            ExecIo::new(Box::new(out_w), Box::new(err_w), CancellationToken::new()),
        )
        .await
        .expect("exec");
        assert_eq!(st.code, 3);
        guest_task.await.expect("guest");
        let mut s = String::new();
        out_r.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "hi\n");
        s.clear();
        err_r.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "warn\n");
    }

    #[tokio::test]
    async fn cancel_closes_connection() {
        let (host, guest) = tokio::net::UnixStream::pair().expect("pair");
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let task = tokio::spawn(async move {
            let req = ExecRequest {
                argv: vec!["sleep".into()],
                ..Default::default()
            };
            run_exec(
                host,
                &req,
                ExecIo::new(Box::new(tokio::io::sink()), Box::new(tokio::io::sink()), c2),
            )
            .await
        });
        let mut g = guest;
        read_frame(&mut g).await.expect("read").expect("exec frame");
        cancel.cancel();
        assert!(matches!(
            task.await.expect("join"),
            Err(ExecError::Cancelled)
        ));
        // The guest sees EOF: that is what makes it kill the process group.
        assert!(read_frame(&mut g).await.expect("eof").is_none());
    }

    /// A wedged agent that reads the request but never answers: an error naming the step
    /// after REPLY_TIMEOUT, not a hang.
    #[tokio::test(start_paused = true)]
    async fn unanswered_request_times_out() {
        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        let g = tokio::spawn(async move {
            read_frame(&mut guest)
                .await
                .expect("read")
                .expect("exec frame");
            // Keep the connection open and say nothing.
            std::future::pending::<()>().await;
        });
        let req = ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        let io = ExecIo::new(
            Box::new(tokio::io::sink()),
            Box::new(tokio::io::sink()),
            CancellationToken::new(),
        );
        let r = tokio::time::timeout(REPLY_TIMEOUT * 6, run_exec(host, &req, io))
            .await
            .expect("run_exec hung past its deadline");
        let e = r.expect_err("no answer");
        assert!(matches!(e, ExecError::StartTimeout(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the guest did not start the command within 10s"
        );
        g.abort();
    }

    /// While the output sink is not ready, no more frames are read from the guest (its
    /// writes stall), and a cancel still ends the command promptly.
    #[tokio::test]
    async fn slow_sink_back_pressures_the_guest_and_cancel_still_acts() {
        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s2 = sent.clone();
        let g = tokio::spawn(async move {
            read_frame(&mut guest)
                .await
                .expect("read")
                .expect("exec frame");
            let started = Frame::json(FrameType::Started, &Started { pid: 1 }).expect("j");
            write_frame(&mut guest, &started).await.expect("w");
            let chunk = Frame::new(FrameType::Stdout, vec![0u8; CHUNK]);
            // An endless producer: `cat /dev/zero`.
            while write_frame(&mut guest, &chunk).await.is_ok() {
                s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        // A sink that accepts 1 KiB and is never read.
        let (out_w, _out_r) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let req = ExecRequest {
            argv: vec!["cat".into()],
            ..Default::default()
        };
        let io = ExecIo::new(Box::new(out_w), Box::new(tokio::io::sink()), cancel.clone());
        let task = tokio::spawn(async move { run_exec(host, &req, io).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = sent.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = sent.load(std::sync::atomic::Ordering::SeqCst);
        // Only what the socket buffers hold was accepted, and nothing more since.
        assert_eq!(a, b, "the host kept reading from the guest");
        assert!(a < 64, "{a} chunks accepted without a reader");
        cancel.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("cancel did not end a blocked write")
            .expect("join");
        assert!(matches!(r, Err(ExecError::Cancelled)), "{r:?}");
        g.await.expect("guest");
    }
}

//! The four exec methods (`exec`, `exec_stream`, `exec_pipe`, `exec_tty`) and their input
//! notifications.
//!
//! # Design
//! Every mode builds one `ExecRequest` (`sh -c <command>`, as the SDKs expect a shell
//! string) and differs only in how output and input are wired ([`ExecMode`] names the
//! notifications): captured (`exec`), notifications (the others), client stdin routed by
//! request id (`exec_pipe`, `exec_tty`). Cancellation drops the guest connection, which
//! kills the command's process group in every mode.
//!
//! Bounds (see `io`): streamed output waits for the client (back-pressure to the command),
//! captured output draws on the sandbox's capture budget, and client stdin is queued
//! without ever blocking the server's reader, up to a backlog limit per exec.

use std::sync::Arc;
use std::time::Instant;

use matchlock_api::rpc::{
    b64, envelope, to_value, ExecMode, ExecParams, ExecResult, ExecStreamResult, InputParams,
    Method, ReadyParams,
};
use matchlock_guest_proto::{ExecRequest, ExitStatus, WinSize};
use matchlock_sandbox::exec::ExecIo;
use matchlock_sandbox::SandboxError;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{params, Reply};
use crate::error::Failure;
use crate::io::{Backlog, Capture, ChanReader, Input, Notify, OutLine, MAX_STDIN_BACKLOG};
use crate::shared::{InputRoute, Shared};

type Sink = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Where a command's output goes: captured buffers, or notifications.
enum Output {
    Captured(Capture, Capture),
    Notified,
}

pub async fn exec(
    s: &Arc<Shared>,
    p: ExecParams,
    mode: ExecMode,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Reply, Failure> {
    let started = Instant::now();
    if mode.input().is_some() && id.is_none() {
        return Err(Failure::IdRequired(mode.method().as_str()));
    }
    if p.command.is_empty() {
        return Err(Failure::Missing("command"));
    }
    let sandbox = s.current()?;
    let idv = id.cloned().unwrap_or(Value::Null);
    let mut req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), p.command.clone()],
        cwd: p.working_dir.clone(),
        user: p.user.clone(),
        ..Default::default()
    };
    // The command's own token: the request's cancel, or a stdin overflow.
    let stop = cancel.child_token();
    let (mut io, output) = output_for(s, mode, &idv, stop.clone());
    let input_id = id.filter(|_| mode.input().is_some());
    let backlog = match input_id {
        Some(rid) => wire_input(s, mode, rid, &p, &mut req, &mut io, stop).await,
        None => None,
    };
    let result = sandbox.exec(req, io).await;
    if let Some(rid) = input_id {
        s.remove_route(rid);
    }
    let st = result.map_err(|e| failure(e, &output, backlog.as_deref(), mode))?;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(reply(st, output, duration_ms))
}

/// Why an exec failed: a limit it hit, else the sandbox's error.
fn failure(e: SandboxError, output: &Output, backlog: Option<&Backlog>, mode: ExecMode) -> Failure {
    if let Output::Captured(out, err) = output {
        if out.overflowed() || err.overflowed() {
            return Failure::CaptureBudget(crate::io::CAPTURE_BUDGET);
        }
    }
    if let Some(b) = backlog.filter(|b| b.overflowed()) {
        return Failure::StdinBacklog {
            method: mode.method().as_str(),
            limit: b.limit(),
        };
    }
    match e {
        e @ SandboxError::Exec(_) => Failure::Exec(e),
        e => Failure::Connect(e),
    }
}

fn reply(st: ExitStatus, output: Output, duration_ms: u64) -> Reply {
    match output {
        Output::Captured(out, err) => {
            let (stdout, mut hold) = out.finish();
            let (stderr, h) = err.finish();
            hold.absorb(h);
            let value = to_value(&ExecResult {
                exit_code: st.code,
                stdout: b64::encode(&stdout),
                stderr: b64::encode(&stderr),
                duration_ms,
            });
            // The captured bytes stay reserved until this answer is written.
            Reply {
                value,
                hold: Some(hold),
            }
        }
        Output::Notified => Reply::from(to_value(&ExecStreamResult {
            exit_code: st.code,
            duration_ms,
        })),
    }
}

/// The command's output sinks for `mode`.
fn output_for(
    s: &Shared,
    mode: ExecMode,
    id: &Value,
    cancel: CancellationToken,
) -> (ExecIo, Output) {
    let notify = |notice| -> Sink { Box::new(Notify::new(s.data_sender(), notice, id.clone())) };
    match mode.output() {
        None => {
            let (out, err) = (Capture::new(&s.capture), Capture::new(&s.capture));
            let io = ExecIo::new(Box::new(out.clone()), Box::new(err.clone()), cancel);
            (io, Output::Captured(out, err))
        }
        Some((out, err)) => (
            ExecIo::new(notify(out), notify(err), cancel),
            Output::Notified,
        ),
    }
}

/// Routes the client's input notifications for request `id` into the command (stdin, and
/// resizes on a PTY), then announces readiness. `stop` ends the command if its stdin
/// backlog overflows.
async fn wire_input(
    s: &Shared,
    mode: ExecMode,
    id: &Value,
    p: &ExecParams,
    req: &mut ExecRequest,
    io: &mut ExecIo,
    stop: CancellationToken,
) -> Option<Arc<Backlog>> {
    let (ready, _, _) = mode.input()?;
    let (tx, rx) = mpsc::unbounded_channel::<Input>();
    let backlog = Backlog::new(MAX_STDIN_BACKLOG, stop);
    io.stdin = Some(Box::new(ChanReader::new(rx, backlog.clone())));
    let resize = if mode == ExecMode::Tty {
        let (rtx, rrx) = mpsc::channel::<WinSize>(16);
        io.resize = Some(rrx);
        req.tty = Some(WinSize {
            rows: if p.rows == 0 { 24 } else { p.rows },
            cols: if p.cols == 0 { 80 } else { p.cols },
        });
        Some(rtx)
    } else {
        req.stdin = true;
        None
    };
    let route = InputRoute {
        stdin: tx,
        backlog: backlog.clone(),
        resize,
    };
    s.add_route(id, route);
    let line = envelope::notification(ready, to_value(&ReadyParams { id: id.clone() }));
    s.send_data(OutLine::from(line)).await;
    Some(backlog)
}

/// Exec input notifications: routed by `params.id`, in order; unknown ids and undecodable
/// data are ignored (no response is ever sent). Never waits: stdin is queued against the
/// route's backlog, and an exec whose backlog overflows is stopped (its answer says why).
pub fn input(s: &Shared, req: &envelope::Request) {
    let Ok(p) = params::<InputParams>(req.params.clone()) else {
        return;
    };
    let Some(route) = s.route(&p.id) else {
        return;
    };
    let event = match req.method {
        Method::ExecPipeStdin | Method::ExecTtyStdin => match b64::decode(&p.data) {
            Ok(data) => Input::Data(data),
            Err(_) => return,
        },
        Method::ExecPipeStdinEof | Method::ExecTtyStdinEof => Input::Eof,
        Method::ExecTtyResize => {
            if let Some(r) = route.resize {
                // A full queue means resizes are pending: the newest ones win eventually.
                let _ = r.try_send(WinSize {
                    rows: p.rows,
                    cols: p.cols,
                });
            }
            return;
        }
        _ => return,
    };
    let len = match &event {
        Input::Data(d) => d.len(),
        Input::Eof => 0,
    };
    if !route.backlog.push(len) {
        tracing::warn!(id = %p.id, "exec stdin backlog overflowed; stopping the command");
        s.remove_route(&p.id);
        return;
    }
    let _ = route.stdin.send(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::{Outputs, ServerOptions};
    use matchlock_guest_proto::{Frame, FrameType, Started};
    use matchlock_sandbox::codec::{read_frame, write_frame};
    use matchlock_sandbox::exec::{run_exec, ExecError};
    use serde_json::json;

    fn shared(dir: &std::path::Path) -> (Arc<Shared>, Outputs) {
        let paths = matchlock_sandbox::paths::Paths {
            state: dir.join("state"),
            cache: dir.join("cache"),
        };
        let state = matchlock_state::StateDb::open(&paths.state).expect("state db");
        let opts = ServerOptions {
            paths,
            accel: matchlock_vm::Accel::Tcg,
            owner_pid: std::process::id(),
        };
        let (s, o) = Shared::new(CancellationToken::new(), opts, Arc::new(state));
        (Arc::new(s), o)
    }

    /// A guest agent that starts the command and then never reads its connection again:
    /// the client's stdin is queued without the reader ever waiting (`input` cannot block),
    /// and past the backlog limit the exec stops with an error naming the limit.
    #[tokio::test]
    async fn stdin_for_a_guest_that_stops_reading_is_bounded_and_never_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let (s, mut outputs) = shared(dir.path());
        let id = json!(6);
        let p = ExecParams {
            command: "cat".into(),
            ..Default::default()
        };
        let mut req = ExecRequest::default();
        let stop = CancellationToken::new();
        let (mut io, output) = output_for(&s, ExecMode::Pipe, &id, stop.clone());
        let backlog = wire_input(&s, ExecMode::Pipe, &id, &p, &mut req, &mut io, stop)
            .await
            .expect("pipe mode routes input");
        let ready = outputs.data.recv().await.expect("ready line");
        assert!(ready.text.contains("exec_pipe.ready"), "{}", ready.text);

        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        let g = tokio::spawn(async move {
            read_frame(&mut guest)
                .await
                .expect("r")
                .expect("exec frame");
            let started = Frame::json(FrameType::Started, &Started { pid: 1 }).expect("j");
            write_frame(&mut guest, &started).await.expect("w");
            // Wedged: holds the connection, reads nothing more.
            std::future::pending::<()>().await;
        });
        let exec = tokio::spawn(async move { run_exec(host, &req, io).await });
        let msg = envelope::Request {
            method: Method::ExecPipeStdin,
            params: json!({"id": 6, "data": b64::encode(&vec![7u8; 64 << 10])}),
            id: None,
        };
        let events = (MAX_STDIN_BACKLOG >> 16) + 16;
        for _ in 0..events {
            input(&s, &msg);
            assert!(backlog.queued() <= MAX_STDIN_BACKLOG);
        }
        assert!(backlog.overflowed());
        assert!(s.route(&id).is_none(), "the route outlived the overflow");
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), exec)
            .await
            .expect("the overflow did not stop the exec")
            .expect("join");
        let e = r.expect_err("stopped");
        assert!(matches!(e, ExecError::Cancelled), "{e:?}");
        let f = failure(
            SandboxError::Exec(e),
            &output,
            Some(&backlog),
            ExecMode::Pipe,
        );
        assert_eq!(f.code(), crate::error::EXEC_FAILED);
        assert!(
            f.message()
                .starts_with("exec_pipe: more than 16 MiB of stdin is queued"),
            "{}",
            f.message()
        );
        g.abort();
    }
}

//! The four exec methods (`exec`, `exec_stream`, `exec_pipe`, `exec_tty`) and their input
//! notifications.
//!
//! # Design
//! Every mode builds one `ExecRequest` (`sh -c <command>`, as the SDKs expect a shell
//! string) and differs only in how output and input are wired ([`ExecMode`] names the
//! notifications): captured (`exec`), notifications (the others), client stdin routed by
//! request id (`exec_pipe`, `exec_tty`). Cancellation drops the guest connection, which
//! kills the command's process group in every mode.

use std::sync::Arc;
use std::time::Instant;

use matchlock_api::rpc::{
    b64, envelope, to_value, ExecMode, ExecParams, ExecResult, ExecStreamResult, InputParams,
    Method, ReadyParams,
};
use matchlock_guest_proto::{ExecRequest, WinSize};
use matchlock_sandbox::exec::ExecIo;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::params;
use crate::error::Failure;
use crate::io::{Capture, ChanReader, Input, Notify};
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
) -> Result<Value, Failure> {
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
    let (mut io, output) = output_for(s, mode, &idv, cancel);
    if let Some(rid) = id.filter(|_| mode.input().is_some()) {
        wire_input(s, mode, rid, &p, &mut req, &mut io);
    }
    let result = sandbox.exec(req, io).await;
    if let Some(rid) = id.filter(|_| mode.input().is_some()) {
        s.remove_route(rid);
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let st = match (result, &output) {
        (Ok(st), _) => st,
        (Err(_), Output::Captured(o, e)) if o.overflowed() || e.overflowed() => {
            return Err(Failure::OutputTooLarge(crate::io::MAX_CAPTURE))
        }
        (Err(e @ matchlock_sandbox::SandboxError::Exec(_)), _) => return Err(Failure::Exec(e)),
        (Err(e), _) => return Err(Failure::Connect(e)),
    };
    Ok(match output {
        Output::Captured(out, err) => to_value(&ExecResult {
            exit_code: st.code,
            stdout: b64::encode(&out.take()),
            stderr: b64::encode(&err.take()),
            duration_ms,
        }),
        Output::Notified => to_value(&ExecStreamResult {
            exit_code: st.code,
            duration_ms,
        }),
    })
}

/// The command's output sinks for `mode`.
fn output_for(
    s: &Shared,
    mode: ExecMode,
    id: &Value,
    cancel: CancellationToken,
) -> (ExecIo, Output) {
    let notify = |notice| -> Sink {
        Box::new(Notify {
            out: s.out.clone(),
            notice,
            id: id.clone(),
        })
    };
    match mode.output() {
        None => {
            let (out, err) = (Capture::default(), Capture::default());
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
/// resizes on a PTY), then announces readiness.
fn wire_input(
    s: &Shared,
    mode: ExecMode,
    id: &Value,
    p: &ExecParams,
    req: &mut ExecRequest,
    io: &mut ExecIo,
) {
    let Some((ready, _, _)) = mode.input() else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Input>(64);
    io.stdin = Some(Box::new(ChanReader::new(rx)));
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
    s.add_route(id, InputRoute { stdin: tx, resize });
    s.send(envelope::notification(
        ready,
        to_value(&ReadyParams { id: id.clone() }),
    ));
}

/// Exec input notifications: routed by `params.id`, in order; unknown ids and undecodable
/// data are ignored (no response is ever sent).
pub async fn input(s: &Shared, req: &envelope::Request) {
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
    tokio::select! {
        _ = route.stdin.send(event) => {}
        () = s.run.cancelled() => {}
    }
}

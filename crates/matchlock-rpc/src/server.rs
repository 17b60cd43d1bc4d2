//! The server loop: reads requests, runs them concurrently, writes responses (spec §2.3).
//!
//! # Design
//! One reader (this loop) and one writer task, so lines never interleave. Each line is
//! parsed once into a [`Request`] (method already an enum); [`handlers::lane`] says how it
//! runs. Ordinary methods run as their own tasks, each with a cancellation token registered
//! under its id (a second request with an in-flight id is refused, `-32600`). `cancel` and
//! the exec-input notifications (`*.stdin`, `*.stdin_eof`, `exec_tty.resize`) are handled
//! inline and never wait, so input order is preserved and a `cancel` is never queued behind
//! work or output. `create` and `close` also run inline: `close` cancels in-flight requests
//! and waits (at most [`DRAIN`]) for their answers, then tears the sandbox down.
//!
//! Output (see `shared`): the reader's own answers take the control path, which never
//! waits and which the writer prefers; notifications and task answers take the bounded
//! data path, on which their producers wait while the client is behind. So a client that
//! reads slowly slows the commands producing output (down to the guest, whose pipes fill),
//! host memory stays bounded, and `cancel` is still answered at once.
//!
//! Unlike the reference, stdin EOF, a stdout failure or SIGINT/SIGTERM (the caller's `stop`
//! token) all end in the same graceful teardown: in-flight requests are cancelled (and
//! answered `-32003` while stdout works), the VM is shut down and its disks and sockets are
//! removed, so nothing is left for `gc`.
//!
//! # Limitations
//! `create` blocks the reader while the VM boots; requests sent meanwhile wait. A client
//! that never reads its stdout grows the control path by one small line per request line it
//! sends (its own doing; nothing a guest can cause).

use std::sync::Arc;
use std::time::Duration;

use matchlock_state::StateDb;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::handlers::{self, Lane, Reply};
use crate::io::OutLine;
use crate::shared::{Outputs, ServerOptions, Shared};
use crate::wire::{self, BadLine, Line, LineReader, Request};

/// How long `close` and the final teardown wait for cancelled requests to hand over their
/// answers (a client that stops reading cannot hold the teardown up longer).
pub const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("open state database")]
    State(#[source] matchlock_state::StateError),
}

/// Serves JSON-RPC on `input`/`output` until EOF, `close` + next line, a stdout failure or
/// `stop`; always tears the sandbox down before returning.
pub async fn serve<R, W>(
    input: R,
    output: W,
    opts: ServerOptions,
    stop: CancellationToken,
) -> Result<(), ServeError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(StateDb::open(&opts.paths.state).map_err(ServeError::State)?);
    let run = stop.child_token();
    let (shared, outputs) = Shared::new(run.clone(), opts, state);
    let writer = tokio::spawn(write_lines(output, outputs, run.clone()));
    let shared = Arc::new(shared);
    let mut reader = LineReader::new(input, wire::MAX_LINE);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut closed = false;
    loop {
        let line = tokio::select! {
            () = run.cancelled() => break,
            l = reader.next() => l,
        };
        while tasks.try_join_next().is_some() {}
        let text = match line {
            Ok(Some(Line::Text(t))) => t,
            Ok(Some(Line::TooLong)) => {
                let max = wire::MAX_LINE;
                respond(&shared, None, Err(Failure::LineTooLong { max }));
                continue;
            }
            Ok(None) | Err(_) => break,
        };
        if closed {
            break;
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req = match wire::parse_request(&text) {
            Ok(r) => r,
            Err(bad) => {
                let (id, f) = match bad {
                    BadLine::Parse => (None, Failure::Parse),
                    BadLine::Invalid { id, why } => (id, Failure::InvalidRequest(why)),
                    BadLine::UnknownMethod { id } => (id, Failure::MethodNotFound),
                };
                respond(&shared, id.as_ref(), Err(f));
                continue;
            }
        };
        tracing::debug!(method = %req.method, "rpc request");
        let lane = handlers::lane(req.method);
        if lane != Lane::Input && reused_id(&shared, &req) {
            continue;
        }
        match lane {
            Lane::Input => handlers::input(&shared, &req),
            Lane::Cancel => {
                let r = handlers::cancel(&shared, req.params);
                respond(&shared, req.id.as_ref(), r);
            }
            Lane::Create => {
                let r = handlers::create(&shared, req.params).await;
                respond(&shared, req.id.as_ref(), r);
            }
            Lane::Close => {
                close(&shared, &mut tasks, req).await;
                closed = true;
            }
            Lane::Task => spawn_request(&shared, &mut tasks, req),
        }
    }
    // Teardown: the same path for EOF, signals, stdout failure and after `close`.
    shared.cancel_all();
    drain(&mut tasks).await;
    if let Some(s) = shared.take_session(Some("sandbox closed".into())) {
        if let Err(e) = s.close(Duration::ZERO, "rpc session ended").await {
            tracing::warn!(error = %e, "closing the sandbox failed");
        }
    }
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

/// Refuses (answers `-32600`) a request whose id is in flight already.
fn reused_id(shared: &Shared, req: &Request) -> bool {
    let Some(id) = &req.id else { return false };
    match shared.check_free(id) {
        Ok(()) => false,
        Err(f) => {
            respond(shared, Some(id), Err(f));
            true
        }
    }
}

/// `close`: the sandbox is going away, so in-flight requests cannot complete; they are
/// cancelled (answered -32003) rather than making `close` wait for them (the reference
/// waits, and SDKs then kill the server after their timeout).
async fn close(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, req: Request) {
    shared.closing.cancel();
    shared.cancel_all();
    drain(tasks).await;
    let r = handlers::close(shared, req.params).await;
    // After the cancelled requests' answers, on the same path (bounded wait: a client that
    // stops reading cannot hold the reader).
    let line = line_for(req.id.as_ref(), r.map(Reply::from));
    let _ = tokio::time::timeout(DRAIN, shared.send_data(line)).await;
}

/// Waits up to [`DRAIN`] for the request tasks to finish (answers handed over), then
/// aborts the rest (which drops their guest connections: the guest kills the commands).
async fn drain(tasks: &mut JoinSet<()>) {
    let done = tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_ok();
    if !done {
        tracing::warn!(
            left = tasks.len(),
            "requests did not deliver their answers in time (is the client reading?); aborting them"
        );
        tasks.shutdown().await;
    }
}

/// The answer line for `id`, carrying the result's reservation.
fn line_for(id: Option<&Value>, r: Result<Reply, Failure>) -> OutLine {
    match r {
        Ok(Reply { value, hold }) => OutLine {
            text: wire::response(id, value),
            hold,
        },
        Err(f) => OutLine::from(wire::error_response(id, f.code(), &f.message())),
    }
}

/// Answers on the control path (the reader's own answers; never waits).
fn respond(shared: &Shared, id: Option<&Value>, r: Result<Value, Failure>) {
    shared.send(line_for(id, r.map(Reply::from)).text);
}

fn spawn_request(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, req: Request) {
    let token = shared.run.child_token();
    if let Some(id) = &req.id {
        if let Err(f) = shared.track(id, token.clone()) {
            respond(shared, Some(id), Err(f));
            return;
        }
    }
    let shared = shared.clone();
    tasks.spawn(async move {
        let Request { method, params, id } = req;
        let r = handlers::call(&shared, method, params, id.as_ref(), token.clone()).await;
        // Any failure after cancellation is reported as the cancellation (spec §2.2).
        let r = match r {
            Err(f) if token.is_cancelled() && !f.is_cancelled() => Err(Failure::Cancelled),
            r => r,
        };
        // The id is free again once the request has finished: a client learns that from
        // the answer, which is sent next (waiting while the client is behind), behind
        // every notification of this request.
        if let Some(id) = &id {
            shared.untrack(id);
        }
        shared.send_data(line_for(id.as_ref(), r)).await;
    });
}

/// Writes lines until both paths are closed, control lines first.
async fn write_lines<W: AsyncWrite + Unpin>(mut out: W, outputs: Outputs, run: CancellationToken) {
    let Outputs {
        mut control,
        mut data,
    } = outputs;
    loop {
        let line = tokio::select! {
            biased;
            Some(l) = control.recv() => OutLine::from(l),
            Some(l) = data.recv() => l,
            else => return,
        };
        let mut text = line.text;
        text.push('\n');
        let ok = out.write_all(text.as_bytes()).await.is_ok() && out.flush().await.is_ok();
        // Only now is a captured answer's reservation released (when `line.hold` drops).
        drop(line.hold);
        if !ok {
            // Nobody is listening: shut down (the loop tears the sandbox down).
            run.cancel();
            return;
        }
    }
}

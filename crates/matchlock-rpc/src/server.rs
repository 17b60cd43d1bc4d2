//! The server loop: reads requests, runs them concurrently, writes responses (spec §2.3).
//!
//! # Design
//! One reader (this loop) and one writer task; every output line goes through one channel so
//! lines never interleave. Each line is parsed once into a [`Request`] (method already an
//! enum); [`handlers::lane`] says how it runs. Ordinary methods run as their own tasks, each
//! with a cancellation token registered under its id. `cancel` and the exec-input
//! notifications (`*.stdin`, `*.stdin_eof`, `exec_tty.resize`) are handled inline, so input
//! order is preserved and a `cancel` is never queued behind work. `create` and `close` also
//! run inline: `close` cancels in-flight requests and waits for their answers, then tears
//! the sandbox down.
//!
//! Unlike the reference, stdin EOF, a stdout failure or SIGINT/SIGTERM (the caller's `stop`
//! token) all end in the same graceful teardown: in-flight requests are cancelled (and
//! answered `-32003` while stdout works), the VM is shut down and its disks and sockets are
//! removed, so nothing is left for `gc`.
//!
//! # Limitations
//! `create` blocks the reader while the VM boots; requests sent meanwhile wait.

use std::sync::Arc;
use std::time::Duration;

use matchlock_state::StateDb;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::handlers::{self, Lane};
use crate::shared::{ServerOptions, Shared};
use crate::wire::{self, BadLine, Line, LineReader, Request};

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
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let run = stop.child_token();
    let writer = tokio::spawn(write_lines(output, rx, run.clone()));
    let shared = Arc::new(Shared::new(tx, run.clone(), opts, state));
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
        match handlers::lane(req.method) {
            Lane::Input => handlers::input(&shared, &req).await,
            Lane::Cancel => {
                let r = handlers::cancel(&shared, req.params);
                respond(&shared, req.id.as_ref(), r);
            }
            Lane::Create => {
                let r = handlers::create(&shared, req.params).await;
                respond(&shared, req.id.as_ref(), r);
            }
            Lane::Close => {
                // The sandbox is going away: in-flight requests cannot complete, so they
                // are cancelled (answered -32003) rather than making `close` wait for them
                // (the reference waits, and SDKs then kill the server after their timeout).
                shared.closing.cancel();
                shared.cancel_all();
                while tasks.join_next().await.is_some() {}
                let r = handlers::close(&shared, req.params).await;
                respond(&shared, req.id.as_ref(), r);
                closed = true;
            }
            Lane::Task => spawn_request(&shared, &mut tasks, req),
        }
    }
    // Teardown: the same path for EOF, signals, stdout failure and after `close`.
    shared.cancel_all();
    while tasks.join_next().await.is_some() {}
    if let Some(s) = shared.take_session(Some("sandbox closed".into())) {
        if let Err(e) = s.close(Duration::ZERO, "rpc session ended").await {
            tracing::warn!(error = %e, "closing the sandbox failed");
        }
    }
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

fn respond(shared: &Shared, id: Option<&Value>, r: Result<Value, Failure>) {
    let line = match r {
        Ok(v) => wire::response(id, v),
        Err(f) => wire::error_response(id, f.code(), &f.message()),
    };
    shared.send(line);
}

fn spawn_request(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, req: Request) {
    let token = shared.run.child_token();
    if let Some(id) = &req.id {
        shared.track(id, token.clone());
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
        if let Some(id) = &id {
            shared.untrack(id);
        }
        respond(&shared, id.as_ref(), r);
    });
}

async fn write_lines<W: AsyncWrite + Unpin>(
    mut out: W,
    mut rx: mpsc::UnboundedReceiver<String>,
    run: CancellationToken,
) {
    while let Some(mut line) = rx.recv().await {
        line.push('\n');
        let ok = out.write_all(line.as_bytes()).await.is_ok() && out.flush().await.is_ok();
        if !ok {
            // Nobody is listening: shut down (the loop tears the sandbox down).
            run.cancel();
            return;
        }
    }
}

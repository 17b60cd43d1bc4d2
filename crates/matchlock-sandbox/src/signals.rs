//! Shutdown signals of a sandbox owner: the first SIGINT or SIGTERM asks the owner to stop
//! its sandbox cleanly (and remembers which, for the 130/143 exit code).
//!
//! # Design
//! One task per owner receives the signals and cancels a token; everything that must stop
//! (a boot in progress, the wait of a kept-alive sandbox, the RPC server loop) selects on
//! that token. Handlers are installed before the sandbox boots, so a signal during boot
//! never kills the owner half-way (which would leave state for `gc`).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// What SIGHUP does to the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hangup {
    /// Keep running when the controlling terminal goes away (`run --rm=false`, `run -d`).
    Ignore,
    /// The default action.
    Default,
}

#[derive(Debug, thiserror::Error)]
#[error("install the {0} handler")]
pub struct SignalError(&'static str, #[source] std::io::Error);

/// The owner's shutdown request, from SIGINT or SIGTERM.
#[derive(Clone)]
pub struct ShutdownSignals {
    token: CancellationToken,
    code: Arc<AtomicI32>,
}

impl ShutdownSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install(hangup: Hangup) -> Result<ShutdownSignals, SignalError> {
        let mut int = signal(SignalKind::interrupt()).map_err(|e| SignalError("SIGINT", e))?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| SignalError("SIGTERM", e))?;
        let hup = match hangup {
            Hangup::Ignore => {
                Some(signal(SignalKind::hangup()).map_err(|e| SignalError("SIGHUP", e))?)
            }
            Hangup::Default => None,
        };
        let token = CancellationToken::new();
        let code = Arc::new(AtomicI32::new(0));
        let (t, c) = (token.clone(), code.clone());
        tokio::spawn(async move {
            // Keeping the SIGHUP stream alive is what ignores it.
            let _hup = hup;
            let n = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            c.store(n, Ordering::SeqCst);
            t.cancel();
        });
        Ok(ShutdownSignals { token, code })
    }

    /// Cancelled when a shutdown signal arrives.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The conventional exit code of the signal received (130 SIGINT, 143 SIGTERM).
    pub fn exit_code(&self) -> Option<i32> {
        match self.code.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n),
        }
    }
}

//! The sandbox a server session owns, with everything attached to it: its exec relay (so CLI
//! processes can reach it), port forwards, the launched entrypoint and the lifetime timer.
//!
//! # Design
//! [`Session::close`] is the single teardown path (used by `close`, stdin EOF, signals, a
//! new `create` never replaces a live session, and `resources.timeout_seconds` expiry): it
//! stops port forwards, the entrypoint and the relay, then shuts the VM down cleanly and
//! removes its disks and sockets (the state directory and logs stay until `matchlock rm`).
//!
//! # Limitations
//! Teardown is bounded by the sandbox's own shutdown timeouts (a few seconds); a process
//! killed with SIGKILL leaves recorded resources to `matchlock gc`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use matchlock_sandbox::forward::Forwarder;
use matchlock_sandbox::Sandbox;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;

pub struct Session {
    pub sandbox: Arc<Sandbox>,
    pub relay_stop: CancellationToken,
    pub entrypoint: CancellationToken,
    pub lifetime: CancellationToken,
    pub forwarder: tokio::sync::Mutex<Option<Forwarder>>,
}

impl Session {
    pub fn id(&self) -> &str {
        &self.sandbox.id
    }

    pub fn log_path(&self) -> PathBuf {
        self.sandbox.console_log()
    }

    /// Stops everything attached to the sandbox, then the sandbox itself.
    pub async fn close(&self, grace: Duration) -> Result<(), Failure> {
        if let Some(f) = self.forwarder.lock().await.take() {
            f.close().await;
        }
        self.entrypoint.cancel();
        self.relay_stop.cancel();
        self.lifetime.cancel();
        let sb = self.sandbox.clone();
        tokio::task::spawn_blocking(move || sb.shutdown(grace))
            .await
            .map_err(Failure::CloseJoin)
    }
}

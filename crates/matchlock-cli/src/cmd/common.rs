//! Helpers shared by subcommands: paths, state, the async runtime.

use std::sync::Arc;

use anyhow::Context;
use matchlock_sandbox::paths::Paths;
use matchlock_state::StateDb;

pub fn paths() -> anyhow::Result<Paths> {
    Paths::from_env().context("locate matchlock directories")
}

pub fn state(paths: &Paths) -> anyhow::Result<Arc<StateDb>> {
    Ok(Arc::new(
        StateDb::open(&paths.state).context("open state database")?,
    ))
}

pub fn image_store(paths: &Paths) -> anyhow::Result<matchlock_image::ImageStore> {
    matchlock_image::ImageStore::open(&paths.images()).context("open image store")
}

/// A single-threaded runtime: a sandbox owner mostly waits, and this keeps it small.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start async runtime")
}

/// Looks up a VM and checks it can take requests through its relay (spec §1.4 messages).
pub fn running_vm(state: &StateDb, id: &str) -> anyhow::Result<std::path::PathBuf> {
    let rec = state
        .get(id)
        .map_err(|e| anyhow::anyhow!("VM not found {id}: {e}"))?;
    if rec.status != matchlock_state::VmStatus::Running || !state.is_owner_alive(&rec) {
        let status = if rec.status == matchlock_state::VmStatus::Running {
            "crashed".to_string()
        } else {
            rec.status.to_string()
        };
        anyhow::bail!("VM {id} is not running (status: {status})");
    }
    let dir = state.vm_dir(id);
    if !dir.join(matchlock_sandbox::relay::SOCKET_NAME).exists() {
        anyhow::bail!("exec socket not found for {id} (is it still starting?)");
    }
    Ok(dir)
}

/// The accelerator to use for `requested` (`auto` resolved), and the one-line warning to
/// show when `auto` fell back to TCG emulation (unless `MATCHLOCK_QUIET_ACCEL` is set, as
/// for the detached child of `run -d`).
pub fn resolve_accel(requested: matchlock_vm::Accel) -> (matchlock_vm::Accel, Option<String>) {
    let choice = matchlock_vm::detect_accel(requested);
    let warn = choice.accel == matchlock_vm::Accel::Tcg
        && requested == matchlock_vm::Accel::Auto
        && std::env::var_os("MATCHLOCK_QUIET_ACCEL").is_none();
    (choice.accel, warn.then_some(choice.reason))
}

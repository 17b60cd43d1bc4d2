//! Sandbox lifecycle commands: list, get, inspect, kill, rm, prune, gc, log.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use matchlock_state::VmStatus;

use super::common;
use crate::output::table;

/// List sandboxes.
#[derive(Args)]
pub struct ListArgs {
    /// Only running sandboxes.
    #[arg(long)]
    pub running: bool,
}

/// The sandbox a command acts on.
#[derive(Args)]
pub struct IdArg {
    /// Sandbox ID (vm-xxxxxxxx).
    pub id: String,
}

/// Stop a sandbox (its owner shuts the VM down cleanly).
#[derive(Args)]
pub struct KillArgs {
    /// Sandbox ID.
    pub id: Option<String>,
    /// Every running sandbox.
    #[arg(long)]
    pub all: bool,
}

/// Remove a stopped sandbox's state and logs.
#[derive(Args)]
pub struct RmArgs {
    /// Sandbox ID.
    pub id: Option<String>,
    /// Every sandbox that is not running.
    #[arg(long)]
    pub stopped: bool,
}

/// Reclaim host resources leaked by crashed sandboxes (processes, disks, sockets).
#[derive(Args)]
pub struct GcArgs {
    /// Only this sandbox (default: all).
    pub id: Option<String>,
    /// Also clean sandboxes whose owner is still running.
    #[arg(long = "force-running")]
    pub force_running: bool,
}

/// Print a sandbox's log (VM console and command output).
#[derive(Args)]
pub struct LogArgs {
    /// Sandbox ID.
    pub id: String,
    /// Keep printing as the log grows, until interrupted.
    #[arg(short = 'f', long = "follow")]
    pub follow: bool,
    /// Print the sandbox's structured event log instead (one JSON object per line: network
    /// requests and blocked connections, sandbox ready and stopped).
    #[arg(long)]
    pub events: bool,
}

fn short_time(rfc3339: &str) -> String {
    // "2026-11-28T10:15:30.123Z" -> "2026-11-28 10:15"
    let s = rfc3339.replace('T', " ");
    s.chars().take(16).collect()
}

pub fn list(a: ListArgs) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let rows: Vec<Vec<String>> = state
        .list()?
        .into_iter()
        .filter(|r| !a.running || r.status == VmStatus::Running)
        .map(|r| {
            vec![
                r.id.clone(),
                r.status.to_string(),
                r.image.clone(),
                short_time(&r.created_at),
                if r.pid == 0 {
                    "-".into()
                } else {
                    r.pid.to_string()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ID", "STATUS", "IMAGE", "CREATED", "PID"], &rows)
    );
    Ok(())
}

fn vm_json(r: &matchlock_state::VmRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "pid": r.pid,
        "status": r.status.to_string(),
        "image": r.image,
        "created_at": r.created_at,
        "config": r.config,
    })
}

pub fn get(a: IdArg) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    // list() first so a dead owner shows as crashed.
    let _ = state.list();
    let r = state.get(&a.id)?;
    println!("{}", serde_json::to_string_pretty(&vm_json(&r))?);
    Ok(())
}

pub fn inspect(a: IdArg) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let _ = state.list();
    let r = state.get(&a.id)?;
    let out = serde_json::json!({
        "vm": vm_json(&r),
        "lifecycle": state.lifecycle_latest(&a.id)?,
        "history": state.lifecycle_history(&a.id)?,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn kill(a: KillArgs) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let mut killed = Vec::new();
    if a.all {
        for r in state.list()? {
            if r.status != VmStatus::Running {
                continue;
            }
            match state.kill(&r.id) {
                Ok(()) => killed.push(r.id),
                Err(e) => eprintln!("Failed to kill {}: {e}", r.id),
            }
        }
    } else {
        let id =
            a.id.ok_or_else(|| anyhow::anyhow!("VM ID required (or use --all)"))?;
        state.kill(&id)?;
        killed.push(id);
    }
    // Return once each sandbox has stopped, so `kill` followed by `rm` just works.
    for id in killed {
        if !state.wait_stopped(&id, KILL_WAIT)? {
            eprintln!(
                "warning: {id} is still stopping after {}s (its owner got SIGTERM)",
                KILL_WAIT.as_secs()
            );
        }
        println!("Killed {id}");
    }
    Ok(())
}

/// How long `kill` waits for a sandbox to finish its clean shutdown.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn remove_one(state: &matchlock_state::StateDb, id: &str) -> anyhow::Result<()> {
    let report = state.reconcile(id, false)?;
    if let Some(why) = report.skipped {
        anyhow::bail!("{why} {id}");
    }
    if !report.failed.is_empty() {
        let items: Vec<String> = report
            .failed
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        anyhow::bail!("reconcile {id}: {}", items.join("; "));
    }
    state.remove(id)?;
    Ok(())
}

pub fn rm(a: RmArgs) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    if a.stopped {
        for r in state.list()? {
            if r.status == VmStatus::Running {
                continue;
            }
            match remove_one(&state, &r.id) {
                Ok(()) => println!("Removed {}", r.id),
                Err(e) => eprintln!("Failed to remove {}: {e:#}", r.id),
            }
        }
        return Ok(());
    }
    let id =
        a.id.ok_or_else(|| anyhow::anyhow!("VM ID required (or use --stopped)"))?;
    let _ = state.list();
    remove_one(&state, &id)?;
    println!("Removed {id}");
    Ok(())
}

pub fn prune() -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let mut n = 0;
    let mut errors = Vec::new();
    for r in state.list()? {
        if r.status == VmStatus::Running {
            continue;
        }
        match remove_one(&state, &r.id) {
            Ok(()) => {
                println!("Pruned {}", r.id);
                n += 1;
            }
            Err(e) => errors.push(format!("{}: {e:#}", r.id)),
        }
    }
    println!("Pruned {n} VMs");
    if !errors.is_empty() {
        anyhow::bail!("prune: {}", errors.join("; "));
    }
    Ok(())
}

pub fn gc(a: GcArgs) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let mut ids: Vec<String> = match &a.id {
        Some(id) => vec![id.clone()],
        None => state.list()?.into_iter().map(|r| r.id).collect(),
    };
    ids.sort();
    let mut failed = false;
    for id in &ids {
        match state.reconcile(id, a.force_running) {
            Ok(rep) => {
                if let Some(why) = rep.skipped {
                    println!("{id}: skipped ({why})");
                    failed = true;
                    continue;
                }
                if rep.cleaned.is_empty() {
                    println!("{id}: no resources to clean");
                } else {
                    println!("{id}: cleaned {}", rep.cleaned.join(", "));
                }
                for (item, err) in &rep.failed {
                    eprintln!("{id}: failed {item}: {err}");
                    failed = true;
                }
            }
            Err(e) => {
                eprintln!("{id}: failed state: {e}");
                failed = true;
            }
        }
    }
    if failed {
        anyhow::bail!("gc: some sandboxes could not be reconciled");
    }
    if a.id.is_none() {
        println!("Reconciled {} VMs", ids.len());
    }
    Ok(())
}

pub fn log(a: LogArgs) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    state
        .get(&a.id)
        .map_err(|e| anyhow::anyhow!("VM not found {}: {e}", a.id))?;
    let name = if a.events {
        matchlock_sandbox::services::EVENT_LOG
    } else {
        "vm.log"
    };
    let path = state.vm_dir(&a.id).join("logs").join(name);
    let mut out = std::io::stdout().lock();
    let mut offset = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if a.follow {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            signal_hook_flag(sig, stop.clone())?;
        }
    }
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0;
            }
            f.seek(SeekFrom::Start(offset))
                .with_context(|| format!("read VM log {}", a.id))?;
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("read VM log {}", a.id))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
                offset += n as u64;
            }
            out.flush()?;
        }
        if !a.follow || stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets `flag` when `sig` arrives (used by `log -f` to stop cleanly with exit 0).
fn signal_hook_flag(
    sig: i32,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let kind = tokio::signal::unix::SignalKind::from_raw(sig);
    std::thread::spawn(move || {
        rt.block_on(async move {
            if let Ok(mut s) = tokio::signal::unix::signal(kind) {
                s.recv().await;
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    });
    Ok(())
}

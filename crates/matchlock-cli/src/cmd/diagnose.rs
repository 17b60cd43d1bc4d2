//! `matchlock diagnose`: checks that this host can run sandboxes, and says how to fix what
//! is missing.
//!
//! # Design
//! - `guest-runtime` fails unless the guest binary found is a static x86_64 ELF (a dynamic
//!   one panics the guest kernel at boot), naming `scripts/build-guest.sh` as the fix.
//! - `confinement` reports whether VM helpers get QEMU's seccomp sandbox and Landlock (with
//!   the kernel's ABI); missing confinement is a warning, not a failure, because sandboxes
//!   still run (the VM stays the boundary).
//! - The state and cache directories are created 0700 (and tightened if looser), like every
//!   other path that creates them.

use clap::Args;
use serde::Serialize;

use super::common;

/// Check that this host can run sandboxes.
#[derive(Args)]
pub struct DiagnoseArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    status: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: &'static str, r: Result<String, (String, String)>) -> Check {
    match r {
        Ok(message) => Check {
            name,
            status: "pass",
            message,
            fix: None,
        },
        Err((message, fix)) => Check {
            name,
            status: "fail",
            message,
            fix: Some(fix),
        },
    }
}

pub fn diagnose(a: DiagnoseArgs) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    checks.push(check(
        "qemu",
        matchlock_vm::qemu_version(None).map_err(|e| {
            (
                format!("{e:#}"),
                "apt-get install qemu-system-x86".to_string(),
            )
        }),
    ));
    let accel = matchlock_vm::detect_accel(matchlock_vm::Accel::Auto);
    checks.push(Check {
        name: "accel",
        status: if accel.accel == matchlock_vm::Accel::Kvm {
            "pass"
        } else {
            "warn"
        },
        message: format!("{:?}: {}", accel.accel, accel.reason),
        fix: (accel.accel != matchlock_vm::Accel::Kvm).then(|| {
            "for full speed use a host with KVM and read/write access to /dev/kvm".to_string()
        }),
    });
    checks.push(check(
        "vsock-backend",
        matchlock_vm::vsock_backend_path(None)
            .map(|p| p.display().to_string())
            .map_err(|e| {
                (
                    format!("{e:#}"),
                    "cargo install vhost-device-vsock".to_string(),
                )
            }),
    ));
    let kernel = matchlock_vm::assets::kernel_path();
    checks.push(check(
        "kernel",
        if kernel.is_file() {
            Ok(kernel.display().to_string())
        } else {
            Err((
                format!("not built: {}", kernel.display()),
                "scripts/build-kernel.sh".to_string(),
            ))
        },
    ));
    checks.push(check(
        "guest-runtime",
        matchlock_vm::assets::find_guest_binary()
            .map(|p| p.display().to_string())
            .map_err(|e| {
                (
                    format!("{e:#}"),
                    "scripts/build-guest.sh (builds the static matchlock-guest), or set MATCHLOCK_GUEST_INIT to a static build".to_string(),
                )
            }),
    ));
    checks.push(confinement());
    checks.push(check(
        "mke2fs",
        matchlock_sandbox::disk::find_mkfs()
            .map(|p| p.display().to_string())
            .ok_or_else(|| {
                (
                    "not found".to_string(),
                    "apt-get install e2fsprogs".to_string(),
                )
            }),
    ));
    checks.push(check(
        "tar2sqfs",
        which("tar2sqfs").ok_or_else(|| {
            (
                "not found (needed to import images)".to_string(),
                "apt-get install squashfs-tools-ng".to_string(),
            )
        }),
    ));
    match common::paths() {
        Ok(p) => {
            for (name, dir) in [
                ("state-dir", p.state.clone()),
                ("cache-dir", p.cache.clone()),
            ] {
                checks.push(check(name, writable(&dir)));
            }
        }
        Err(e) => checks.push(check(
            "state-dir",
            Err((format!("{e:#}"), "set HOME".into())),
        )),
    }
    let ok = checks.iter().all(|c| c.status != "fail");
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "checks": checks}))?
        );
    } else {
        for c in &checks {
            let mark = match c.status {
                "pass" => "✓",
                "warn" => "⚠",
                _ => "✗",
            };
            println!("{mark} {}: {}", c.name, c.message);
            if let Some(f) = &c.fix {
                println!("  fix: {f}");
            }
        }
    }
    if !ok {
        anyhow::bail!("diagnose failed: one or more checks failed");
    }
    Ok(())
}

fn which(tool: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

/// Whether VM helpers run under QEMU's seccomp sandbox and Landlock on this host.
fn confinement() -> Check {
    let c = matchlock_vm::host_confinement(None);
    let seccomp = match &c.qemu_seccomp {
        Ok(()) => "QEMU seccomp sandbox: yes".to_owned(),
        Err(why) => format!("QEMU seccomp sandbox: no ({why})"),
    };
    let landlock = match c.landlock_abi {
        Some(abi) => format!("Landlock: ABI {abi}"),
        None => "Landlock: not available".to_owned(),
    };
    let full = c.qemu_seccomp.is_ok() && c.landlock_abi.is_some();
    Check {
        name: "confinement",
        status: if full { "pass" } else { "warn" },
        message: format!("{seccomp}; {landlock}"),
        fix: (!full).then(|| {
            "use a QEMU built with seccomp (Debian's is) and a kernel with Landlock enabled (Linux 5.13+, lsm=landlock)".to_owned()
        }),
    }
}

fn writable(dir: &std::path::Path) -> Result<String, (String, String)> {
    let probe = dir.join(format!(".diagnose-{}", std::process::id()));
    matchlock_state::StateDb::ensure_private_dir(dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe))
        .map(|()| format!("{} is writable", dir.display()))
        .map_err(|e| {
            (
                format!("{}: {e}", dir.display()),
                format!("make {} writable by this user", dir.display()),
            )
        })
}

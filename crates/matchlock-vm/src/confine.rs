//! Confining the host helpers that handle guest-controlled device I/O: QEMU and
//! `vhost-device-vsock`.
//!
//! # Design
//! - Both helpers parse what the guest writes to its devices, so a device-emulation bug is a
//!   way out of the VM. They run with two independent layers:
//!   - QEMU's own seccomp filter, `-sandbox on,obsolete=deny,elevateprivileges=deny,
//!     spawn=deny,resourcecontrol=deny` ([`QEMU_SANDBOX`]): no exec/fork of new programs,
//!     no set*id, no scheduler/affinity changes, no obsolete syscalls. Whether a QEMU build
//!     supports it is probed by starting it with the option, `-machine none` and a QMP
//!     `quit` (~0.1 s, too much to pay on every cold start), so the answer is cached in
//!     memory and on disk (`<cache>/probes/`), keyed by the binary's path, device, inode,
//!     size and mtime: a replaced QEMU is probed again. Builds without seccomp run without
//!     it (one warning).
//!   - A Landlock ruleset ([`Rules`], built in the owner with the `landlock` crate, enforced
//!     in the child between fork and exec by the spawner, which also sets `no_new_privs`).
//!     Everything the filesystem offers is denied except: read+execute on the system
//!     program directories (`/usr`, `/lib*`, `/bin`, `/sbin`) and the helper binary itself;
//!     read on the kernel, the initramfs, read-only disks, the few `/etc` files the dynamic
//!     loader and QEMU's libraries read (found with `strace -f -e trace=%file`), `/proc`,
//!     `/sys`, `/dev/urandom` and `/dev/random`; read+write on the VM's state directory
//!     (sockets), the console log, writable disks, `/dev/null` and, under KVM, `/dev/kvm`.
//!     Where the kernel supports them (ABI 6+), signals to and abstract unix sockets of
//!     processes outside the sandbox are denied too.
//! - Landlock is best effort across kernels: rights a kernel does not know are dropped; a
//!   kernel without Landlock runs the helpers unconfined with one warning naming it.
//!   [`host_confinement`] reports what this host enforces (`matchlock diagnose`).
//!
//! # Limitations
//! - `/proc` is readable (QEMU reads `/proc/self/*`); other processes' sensitive entries
//!   (`environ`, `mem`, `fd`) stay closed because Landlock denies ptrace-mode access to
//!   processes outside the sandbox.
//! - A QEMU installed outside `/usr` that loads firmware or modules from its own prefix needs
//!   that prefix under `/usr` or a custom build path; only the binary itself is added.
//! - Connecting to pathname unix sockets is not restricted by Landlock ABIs up to 7.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use landlock::{
    path_beneath_rules, Access, AccessFs, BitFlags, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetError, Scope, ABI,
};

use crate::{Accel, VmConfig};

/// QEMU's seccomp sandbox option.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The newest Landlock ABI whose rights this crate asks for (older kernels get a subset).
const LANDLOCK_ABI: ABI = ABI::V6;
/// How long the seccomp probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Program directories helpers may read and execute from.
const SYSTEM_EXEC: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin"];
/// Files and directories helpers may read (those missing on a host are skipped).
const SYSTEM_READ: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/gnutls",
    "/etc/libnl",
    "/etc/selinux",
    "/etc/qemu",
    "/proc",
    "/sys",
    "/dev/urandom",
    "/dev/random",
];
/// Device files helpers may read and write.
const SYSTEM_RW: &[&str] = &["/dev/null"];

/// What the filesystem sandbox of one helper allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub read_exec: Vec<PathBuf>,
    pub read: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
}

impl Rules {
    /// The rules for a helper of `cfg` whose executable is `binary`.
    pub fn for_vm(cfg: &VmConfig, binary: &Path, accel: Accel) -> Rules {
        let mut r = Rules {
            read_exec: SYSTEM_EXEC.iter().map(PathBuf::from).collect(),
            read: SYSTEM_READ.iter().map(PathBuf::from).collect(),
            read_write: SYSTEM_RW.iter().map(PathBuf::from).collect(),
        };
        r.read_exec.push(binary.to_owned());
        r.read.extend([cfg.kernel.clone(), cfg.initramfs.clone()]);
        r.read_write
            .extend([cfg.state_dir.clone(), cfg.console_log.clone()]);
        for d in &cfg.disks {
            if d.readonly {
                r.read.push(d.path.clone());
            } else {
                r.read_write.push(d.path.clone());
            }
        }
        if accel == Accel::Kvm {
            r.read_write.push(PathBuf::from("/dev/kvm"));
        }
        if let Some(snap) = &cfg.snapshot {
            // QEMU 7.2 opens a file RAM backend read-write even when mapped private
            // (crate::snapshot, Limitations); a restore's is the VM's own copy.
            r.read_write.push(snap.ram().to_owned());
        }
        r
    }

    /// Creates the Landlock ruleset; `None` when this kernel has no Landlock.
    pub(crate) fn landlock_fd(&self) -> Result<Option<OwnedFd>, RulesetError> {
        let all = AccessFs::from_all(LANDLOCK_ABI);
        let read: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
        let read_exec = read | AccessFs::Execute;
        // Execute is never granted by the read-write rules.
        let rw = all & !AccessFs::Execute;
        let created = Ruleset::default()
            .handle_access(all)?
            .scope(Scope::AbstractUnixSocket | Scope::Signal)?
            .create()?
            .add_rules(path_beneath_rules(&self.read_exec, read_exec))?
            .add_rules(path_beneath_rules(&self.read, read))?
            .add_rules(path_beneath_rules(&self.read_write, rw))?;
        Ok(created.into())
    }
}

/// Which confinement this host gives VM helpers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// `Ok` if QEMU accepts [`QEMU_SANDBOX`], else why not.
    pub qemu_seccomp: Result<(), String>,
    /// The kernel's Landlock ABI version, `None` if it has no Landlock.
    pub landlock_abi: Option<u32>,
}

/// Probes QEMU (`qemu_binary`, default from `PATH`) and the kernel.
pub fn host_confinement(qemu_binary: Option<&Path>) -> Confinement {
    let qemu_seccomp = match crate::qemu::qemu_path(qemu_binary) {
        Ok(bin) => qemu_supports_sandbox(&bin),
        Err(e) => Err(e.to_string()),
    };
    Confinement {
        qemu_seccomp,
        landlock_abi: crate::spawn::landlock_abi(),
    }
}

/// Whether `qemu` accepts [`QEMU_SANDBOX`]; probed once per binary and process.
pub(crate) fn qemu_supports_sandbox(qemu: &Path) -> Result<(), String> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Result<(), String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(r) = cache.lock().ok().and_then(|c| c.get(qemu).cloned()) {
        return r;
    }
    let marker = probe_marker(qemu);
    let r = match marker
        .as_ref()
        .and_then(|m| std::fs::read_to_string(m).ok())
    {
        Some(s) if s == "ok" => Ok(()),
        Some(s) if !s.is_empty() => Err(s),
        _ => {
            let r = probe_sandbox(qemu);
            if let Some(m) = &marker {
                save_marker(m, &r);
            }
            r
        }
    };
    if let Ok(mut c) = cache.lock() {
        c.insert(qemu.to_owned(), r.clone());
    }
    r
}

/// `<cache>/probes/qemu-sandbox-<hash of the binary's identity>`, `None` if it cannot stat.
fn probe_marker(qemu: &Path) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(qemu).ok()?;
    let key = format!(
        "{}\n{}\n{}\n{}\n{}.{}\n{QEMU_SANDBOX}",
        qemu.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    );
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    Some(
        crate::assets::cache_root()
            .join("probes")
            .join(format!("qemu-sandbox-{}", &hash[..16])),
    )
}

/// Best effort: a probe that cannot be cached is simply run again next time.
fn save_marker(marker: &Path, r: &Result<(), String>) {
    let Some(dir) = marker.parent() else { return };
    if crate::assets::private_dir(dir).is_err() {
        return;
    }
    let body = match r {
        Ok(()) => "ok",
        Err(e) => e.as_str(),
    };
    let tmp = marker.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, body).is_ok() && std::fs::rename(&tmp, marker).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Starts `qemu -machine none -sandbox ...` with QMP on stdio and asks it to quit.
fn probe_sandbox(qemu: &Path) -> Result<(), String> {
    let mut child = Command::new(qemu)
        .args(["-machine", "none", "-nodefaults", "-no-user-config"])
        .args([
            "-display",
            "none",
            "-qmp",
            "stdio",
            "-sandbox",
            QEMU_SANDBOX,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {}: {e}", qemu.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // QEMU may already have exited (option refused); its status says so.
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} -sandbox probe timed out", qemu.display()));
            }
            Err(e) => return Err(format!("wait for {}: {e}", qemu.display())),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for {}: {e}", qemu.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().next().unwrap_or("no message").trim().to_owned();
        Err(format!("this QEMU build refuses -sandbox ({line})"))
    }
}

/// The Landlock fd for a helper, or `None` (with one warning per process) when the kernel
/// has no Landlock. A ruleset that cannot be built is an error: never run unconfined on a
/// kernel that could confine.
pub(crate) fn landlock_for(rules: &Rules) -> Result<Option<OwnedFd>, RulesetError> {
    let fd = rules.landlock_fd()?;
    if fd.is_none() {
        static WARNED: OnceLock<()> = OnceLock::new();
        WARNED.get_or_init(|| {
            tracing::warn!("this kernel has no Landlock: QEMU and vhost-device-vsock run without filesystem confinement");
        });
    }
    Ok(fd)
}

/// Runs `cmd` under `rules` through the same spawner the VM helpers use and returns its
/// output. For `matchlock diagnose` and tests that must show the ruleset is enforced.
pub fn run_confined(rules: &Rules, mut cmd: Command) -> std::io::Result<std::process::Output> {
    let fd = landlock_for(rules).map_err(std::io::Error::other)?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = crate::spawn::spawn_tied(cmd, fd)?;
    child.wait_with_output()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> VmConfig {
        VmConfig {
            id: "t".into(),
            state_dir: dir.join("vm"),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            vcpus: 1,
            memory_mb: 64,
            disks: vec![
                crate::Disk {
                    path: dir.join("ro.sqfs"),
                    serial: "ro".into(),
                    readonly: true,
                },
                crate::Disk {
                    path: dir.join("rw.ext4"),
                    serial: "rw".into(),
                    readonly: false,
                },
            ],
            console_log: dir.join("logs/vm.log"),
            console_max_bytes: crate::console::DEFAULT_CONSOLE_MAX_BYTES,
            net: None,
            fs: None,
            channel: crate::Channel::Vsock,
            snapshot: None,
            accel: Accel::Tcg,
            extra_cmdline: Vec::new(),
            qemu_binary: None,
            vsock_binary: None,
        }
    }

    #[test]
    fn rules_name_exactly_the_vm_assets() {
        let dir = Path::new("/x");
        let r = Rules::for_vm(&cfg(dir), Path::new("/opt/q/qemu"), Accel::Tcg);
        assert!(r.read_exec.contains(&PathBuf::from("/opt/q/qemu")));
        for p in ["vmlinux", "initramfs.cpio", "ro.sqfs"] {
            assert!(r.read.contains(&dir.join(p)), "{p}");
        }
        for p in ["vm", "logs/vm.log", "rw.ext4"] {
            assert!(r.read_write.contains(&dir.join(p)), "{p}");
        }
        assert!(!r.read_write.contains(&PathBuf::from("/dev/kvm")));
        let kvm = Rules::for_vm(&cfg(dir), Path::new("/q"), Accel::Kvm);
        assert!(kvm.read_write.contains(&PathBuf::from("/dev/kvm")));
        // Nothing of the user's home or the whole cache is granted.
        let all: Vec<&PathBuf> = r
            .read_exec
            .iter()
            .chain(&r.read)
            .chain(&r.read_write)
            .collect();
        assert!(!all
            .iter()
            .any(|p| p.starts_with("/root") || p.starts_with("/home")));
    }

    #[test]
    fn this_qemu_supports_the_sandbox() {
        // Debian's QEMU is built with seccomp; the probe must accept it (and cache it).
        let c = host_confinement(None);
        assert_eq!(c.qemu_seccomp, Ok(()));
        assert_eq!(host_confinement(None).qemu_seccomp, Ok(()));
        let bad = qemu_supports_sandbox(Path::new("/bin/false"));
        assert!(bad.is_err());
        // The disk cache holds the answer under the binary's identity.
        let marker = probe_marker(Path::new("/usr/bin/qemu-system-x86_64")).expect("marker");
        assert_eq!(std::fs::read_to_string(&marker).expect("cached"), "ok");
        let other = probe_marker(Path::new("/bin/false")).expect("marker");
        assert_ne!(marker, other);
    }
}

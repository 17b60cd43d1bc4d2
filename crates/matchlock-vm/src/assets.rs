//! Guest boot assets: the kernel location, the guest binary, and the initramfs built from it.
//!
//! # Design
//! - The kernel is built once per machine and config by `scripts/build-kernel.sh`, which
//!   caches it under `${XDG_CACHE_HOME:-~/.cache}/matchlock/kernels/6.1-<hash>/vmlinux`, the
//!   hash being the first 16 hex digits of the config's SHA-256. The config is compiled into
//!   this crate (`include_bytes!`), so the binary looks exactly where the script puts the
//!   kernel for the config it was built with; a unit test checks both agree.
//! - The initramfs holds only `dev/`, `dev/console` and `init` (the static guest binary);
//!   everything else comes from disks. It is cached by the binary's SHA-256 and written to a
//!   temporary file then renamed, so concurrent sandboxes never see a partial archive.
//!
//! # Limitations
//! The ELF check only looks at the header (64-bit, little-endian, x86_64); a dynamically
//! linked binary passes it and then fails in the guest. Old initramfs files are never removed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cpio::{self, Entry};

/// The guest kernel configuration this crate was built with.
const KERNEL_CONFIG: &[u8] = include_bytes!("../../../guest/kernel/x86_64.config");
/// Kernel series the config is for (Debian's `linux-source-6.1`).
const KERNEL_SERIES: &str = "6.1";
/// Name of the guest binary next to the host binary and in the cache.
const GUEST_BINARY: &str = "matchlock-guest";

/// Errors of asset lookup and initramfs building.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("guest binary from $MATCHLOCK_GUEST_INIT not found at {path}")]
    GuestFromEnvMissing { path: PathBuf },
    #[error("guest binary matchlock-guest not found (looked at {tried}); build it or set $MATCHLOCK_GUEST_INIT")]
    GuestNotFound { tried: String },
    #[error("read guest binary {path}")]
    ReadGuest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest binary {path} is not an x86_64 ELF executable")]
    GuestNotX86_64 { path: PathBuf },
    #[error("create initramfs cache directory {path}")]
    CreateCacheDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write initramfs {path}")]
    WriteInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rename initramfs into place at {path}")]
    RenameInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `${XDG_CACHE_HOME:-~/.cache}/matchlock`, the root of every cached asset.
pub fn cache_root() -> PathBuf {
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
    match xdg {
        Some(x) => PathBuf::from(x),
        None => home_dir().join(".cache"),
    }
    .join("matchlock")
}

fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// First 16 hex digits of the SHA-256 of `bytes`.
fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut h = hex::encode(digest);
    h.truncate(16);
    h
}

/// The guest kernel: `$MATCHLOCK_KERNEL` if set, else the path `scripts/build-kernel.sh`
/// builds to for the config compiled into this crate. The file may not exist yet.
pub fn kernel_path() -> PathBuf {
    match std::env::var_os("MATCHLOCK_KERNEL").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => default_kernel_path(),
    }
}

fn default_kernel_path() -> PathBuf {
    cache_root()
        .join("kernels")
        .join(format!("{KERNEL_SERIES}-{}", short_hash(KERNEL_CONFIG)))
        .join("vmlinux")
}

/// Finds the static guest binary: `$MATCHLOCK_GUEST_INIT` (must be an x86_64 ELF), else the
/// first x86_64 ELF among `matchlock-guest` next to the running executable,
/// `~/.cache/matchlock/guest/matchlock-guest` and, as root under sudo, the same path in
/// `$SUDO_USER`'s home. Candidates of another architecture are skipped with a warning.
pub fn find_guest_binary() -> Result<PathBuf, AssetError> {
    if let Some(p) = std::env::var_os("MATCHLOCK_GUEST_INIT").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(AssetError::GuestFromEnvMissing { path });
        }
        check_x86_64_elf(&path)?;
        return Ok(path);
    }
    let mut tried = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        tried.push(dir.join(GUEST_BINARY));
    }
    tried.push(cache_root().join("guest").join(GUEST_BINARY));
    // Run through sudo, the invoking user's cache is where `setup` put the binary.
    if nix::unistd::geteuid().is_root() {
        if let Some(user) = std::env::var_os("SUDO_USER").filter(|u| !u.is_empty()) {
            let home = nix::unistd::User::from_name(&user.to_string_lossy())
                .ok()
                .flatten()
                .map(|u| u.dir)
                .unwrap_or_else(|| Path::new("/home").join(&user));
            tried.push(home.join(".cache/matchlock/guest").join(GUEST_BINARY));
        }
    }
    for path in &tried {
        if !path.is_file() {
            continue;
        }
        match check_x86_64_elf(path) {
            Ok(()) => return Ok(path.clone()),
            // As the reference does: a wrong-architecture candidate is skipped, not fatal.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping guest binary candidate")
            }
        }
    }
    Err(AssetError::GuestNotFound {
        tried: tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn check_x86_64_elf(path: &Path) -> Result<(), AssetError> {
    use std::io::Read;
    let mut header = [0u8; 20];
    let mut f = fs::File::open(path).map_err(|source| AssetError::ReadGuest {
        path: path.to_owned(),
        source,
    })?;
    let ok = f.read_exact(&mut header).is_ok() && is_x86_64_elf(&header);
    if ok {
        Ok(())
    } else {
        Err(AssetError::GuestNotX86_64 {
            path: path.to_owned(),
        })
    }
}

fn is_x86_64_elf(header: &[u8]) -> bool {
    const EM_X86_64: u16 = 62;
    header.len() >= 20
        && header[..4] == *b"\x7fELF"
        && header[4] == 2 // ELFCLASS64
        && header[5] == 1 // little-endian
        && u16::from_le_bytes([header[18], header[19]]) == EM_X86_64
}

/// Returns `<cache_root>/initramfs-<hash16>.cpio` for `guest_binary`, building it if missing:
/// `dev/` (0755), `dev/console` (char 5:1, 0600) and `init` (0755, the binary).
pub fn initramfs_for(guest_binary: &Path, cache_root: &Path) -> Result<PathBuf, AssetError> {
    let binary = fs::read(guest_binary).map_err(|source| AssetError::ReadGuest {
        path: guest_binary.to_owned(),
        source,
    })?;
    if !is_x86_64_elf(&binary) {
        return Err(AssetError::GuestNotX86_64 {
            path: guest_binary.to_owned(),
        });
    }
    let path = cache_root.join(format!("initramfs-{}.cpio", short_hash(&binary)));
    if path.is_file() {
        return Ok(path);
    }
    let entries = vec![
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::file("init", 0o755, binary),
    ];
    write_atomically(&entries, cache_root, &path)?;
    tracing::debug!(path = %path.display(), "built initramfs");
    Ok(path)
}

/// Writes an arbitrary initramfs to `path` (temporary file + rename), for callers and tests
/// that need a different `/init`.
pub fn write_initramfs(entries: &[Entry], path: &Path) -> Result<(), AssetError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    write_atomically(entries, dir, path)
}

fn write_atomically(entries: &[Entry], dir: &Path, path: &Path) -> Result<(), AssetError> {
    fs::create_dir_all(dir).map_err(|source| AssetError::CreateCacheDir {
        path: dir.to_owned(),
        source,
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".initramfs.{}.{nanos}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(fs::File::create(&tmp)?);
        cpio::write_newc(entries, &mut f)?;
        f.flush()?;
        f.get_ref().sync_all()
    };
    if let Err(source) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(AssetError::WriteInitramfs { path: tmp, source });
    }
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        AssetError::RenameInitramfs {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn kernel_path_matches_build_script() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-kernel.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--print-path")
            .output()
            .expect("run build-kernel.sh");
        assert!(out.status.success());
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(PathBuf::from(printed), default_kernel_path());
    }

    #[test]
    fn guest_binary_from_env() {
        // The only test touching this variable, so setting it cannot race another reader.
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("text");
        fs::write(&text, "not an ELF binary at all").expect("write");
        std::env::set_var("MATCHLOCK_GUEST_INIT", "/bin/busybox");
        let found = find_guest_binary();
        std::env::set_var("MATCHLOCK_GUEST_INIT", &text);
        let wrong = find_guest_binary();
        std::env::set_var("MATCHLOCK_GUEST_INIT", dir.path().join("missing"));
        let missing = find_guest_binary();
        std::env::remove_var("MATCHLOCK_GUEST_INIT");
        assert_eq!(found.expect("busybox"), PathBuf::from("/bin/busybox"));
        assert!(matches!(wrong, Err(AssetError::GuestNotX86_64 { .. })));
        assert!(matches!(
            missing,
            Err(AssetError::GuestFromEnvMissing { .. })
        ));
    }

    #[test]
    fn elf_check() {
        assert!(check_x86_64_elf(Path::new("/bin/busybox")).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("script");
        fs::write(&f, "#!/bin/sh\necho not an elf at all\n").expect("write");
        assert!(matches!(
            check_x86_64_elf(&f),
            Err(AssetError::GuestNotX86_64 { .. })
        ));
    }

    #[test]
    fn initramfs_is_cached_and_listed_by_cpio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("guest");
        fs::copy("/bin/busybox", &bin).expect("copy busybox");
        let cache = dir.path().join("cache");
        let a = initramfs_for(&bin, &cache).expect("build");
        let mtime = fs::metadata(&a).and_then(|m| m.modified()).expect("mtime");
        let b = initramfs_for(&bin, &cache).expect("cached");
        assert_eq!(a, b);
        assert_eq!(
            fs::metadata(&b).and_then(|m| m.modified()).expect("mtime"),
            mtime
        );
        // Only the archive is left in the cache (no temporary files).
        assert_eq!(fs::read_dir(&cache).expect("readdir").count(), 1);

        let out = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&a)
            .output()
            .expect("run cpio");
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(lines[1].starts_with("crw-------") && lines[1].ends_with(" dev/console"));
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));

        let not_elf = dir.path().join("text");
        fs::write(&not_elf, "hello").expect("write");
        assert!(matches!(
            initramfs_for(&not_elf, &cache),
            Err(AssetError::GuestNotX86_64 { .. })
        ));
    }
}

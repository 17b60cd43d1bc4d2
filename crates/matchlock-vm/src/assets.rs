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
//! - The guest binary must be a static x86_64 ELF: the initramfs has no dynamic loader, so a
//!   dynamically linked `/init` makes the kernel panic with "Failed to execute /init (error
//!   -2)". The check reads the ELF header and the program header table (bounded: at most
//!   1024 entries) and refuses any binary with a `PT_INTERP` header. A plain
//!   `cargo build --release` leaves such a dynamic `matchlock-guest` next to `matchlock`, so
//!   the lookup skips dynamic candidates (with a warning) and also looks where
//!   `scripts/build-guest.sh` builds the static one.
//!
//! # Limitations
//! Old initramfs files are never removed.

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
    #[error("static guest binary matchlock-guest not found (looked at {tried}); build it with scripts/build-guest.sh or set $MATCHLOCK_GUEST_INIT")]
    GuestNotFound { tried: String },
    #[error("read guest binary {path}")]
    ReadGuest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest binary {path} is not an x86_64 ELF executable")]
    GuestNotX86_64 { path: PathBuf },
    #[error(
        "guest binary {path} is dynamically linked and cannot run as the VM's /init; \
         build the static guest with scripts/build-guest.sh"
    )]
    GuestDynamic { path: PathBuf },
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

/// Finds the static guest binary: `$MATCHLOCK_GUEST_INIT` (must be a static x86_64 ELF),
/// else the first static x86_64 ELF among `matchlock-guest` next to the running executable,
/// where `scripts/build-guest.sh` puts it relative to a cargo `target/<profile>/` directory
/// (`target/x86_64-unknown-linux-gnu/release/`), `~/.cache/matchlock/guest/matchlock-guest`
/// and, as root under sudo, the same path in `$SUDO_USER`'s home. Other candidates (another
/// architecture, dynamically linked) are skipped with a warning.
pub fn find_guest_binary() -> Result<PathBuf, AssetError> {
    if let Some(p) = std::env::var_os("MATCHLOCK_GUEST_INIT").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            return Err(AssetError::GuestFromEnvMissing { path });
        }
        check_static_x86_64_elf(&path)?;
        return Ok(path);
    }
    let mut tried = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        tried.push(dir.join(GUEST_BINARY));
        if let Some(target) = dir.parent() {
            tried.push(
                target
                    .join("x86_64-unknown-linux-gnu/release")
                    .join(GUEST_BINARY),
            );
        }
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
    let mut described = Vec::new();
    for path in &tried {
        if !path.is_file() {
            described.push(format!("{} (missing)", path.display()));
            continue;
        }
        match check_static_x86_64_elf(path) {
            Ok(()) => return Ok(path.clone()),
            // As the reference does: an unusable candidate is skipped, not fatal.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping guest binary candidate");
                let why = match e {
                    AssetError::GuestDynamic { .. } => "dynamically linked",
                    AssetError::GuestNotX86_64 { .. } => "not an x86_64 ELF",
                    _ => "unreadable",
                };
                described.push(format!("{} ({why})", path.display()));
            }
        }
    }
    Err(AssetError::GuestNotFound {
        tried: described.join(", "),
    })
}

/// Checks `path` is an x86_64 ELF executable without an ELF interpreter.
pub fn check_static_x86_64_elf(path: &Path) -> Result<(), AssetError> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).map_err(|source| AssetError::ReadGuest {
        path: path.to_owned(),
        source,
    })?;
    elf_verdict(path, |off, buf| f.read_exact_at(buf, off).is_ok())
}

/// What an ELF image is, read through `read_at(offset, buf) -> filled completely`.
fn elf_verdict(path: &Path, read_at: impl Fn(u64, &mut [u8]) -> bool) -> Result<(), AssetError> {
    const EM_X86_64: u16 = 62;
    const PT_INTERP: u32 = 3;
    const PHENT_SIZE: u16 = 56;
    const MAX_PHNUM: u16 = 1024;
    let not_x86 = || AssetError::GuestNotX86_64 {
        path: path.to_owned(),
    };
    let mut eh = [0u8; 64];
    let ok = read_at(0, &mut eh)
        && eh[..4] == *b"\x7fELF"
        && eh[4] == 2 // ELFCLASS64
        && eh[5] == 1 // little-endian
        && u16::from_le_bytes([eh[18], eh[19]]) == EM_X86_64;
    if !ok {
        return Err(not_x86());
    }
    let le16 = |i: usize| u16::from_le_bytes([eh[i], eh[i + 1]]);
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&eh[32..40]);
    let phoff = u64::from_le_bytes(phoff);
    let (phentsize, phnum) = (le16(54), le16(56));
    if phnum == 0 || phnum > MAX_PHNUM || phentsize != PHENT_SIZE {
        return Err(not_x86());
    }
    let mut table = vec![0u8; usize::from(phnum) * usize::from(PHENT_SIZE)];
    if !read_at(phoff, &mut table) {
        return Err(not_x86());
    }
    let interp = table
        .chunks_exact(usize::from(PHENT_SIZE))
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    if interp {
        return Err(AssetError::GuestDynamic {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// [`elf_verdict`] over bytes in memory.
fn bytes_verdict(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    elf_verdict(path, |off, buf| {
        let start = usize::try_from(off).ok();
        let slice = start
            .and_then(|s| Some(s..s.checked_add(buf.len())?))
            .and_then(|r| bytes.get(r));
        match slice {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    })
}

/// Returns `<cache_root>/initramfs-<hash16>.cpio` for `guest_binary`, building it if missing:
/// `dev/` (0755), `dev/console` (char 5:1, 0600) and `init` (0755, the binary).
///
/// Hashing the binary (several MiB) cost ~15 ms of every boot (measured on the restored
/// path, `matchlock-bench snapshot`), so the result is also remembered under the binary's
/// file identity (device, inode, size, mtime and ctime: ctime cannot be set by a user, so
/// any rewrite of the file changes it) in `initramfs-by-id-<hash>` naming the cpio; a
/// memo whose content is not such a name, or whose cpio is gone, is ignored.
pub fn initramfs_for(guest_binary: &Path, cache_root: &Path) -> Result<PathBuf, AssetError> {
    let memo = binary_identity(guest_binary)
        .map(|id| cache_root.join(format!("initramfs-by-id-{}", short_hash(id.as_bytes()))));
    if let Some(hit) = memo.as_deref().and_then(|m| remembered(m, cache_root)) {
        return Ok(hit);
    }
    let path = build_initramfs(guest_binary, cache_root)?;
    if let (Some(m), Some(name)) = (memo, path.file_name()) {
        let tmp = m.with_extension(format!("{}.tmp", std::process::id()));
        if fs::write(&tmp, name.as_encoded_bytes())
            .and_then(|()| fs::rename(&tmp, &m))
            .is_err()
        {
            let _ = fs::remove_file(&tmp);
        }
    }
    Ok(path)
}

/// `path dev ino size mtime ctime` of `p`, `None` if it cannot be stat'ed.
fn binary_identity(p: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).ok()?;
    Some(format!(
        "{} {} {} {} {}.{} {}.{}",
        p.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// The cpio a memo names, if the name is well-formed and the file exists.
fn remembered(memo: &Path, cache_root: &Path) -> Option<PathBuf> {
    let name = fs::read_to_string(memo).ok()?;
    let hash = name.strip_prefix("initramfs-")?.strip_suffix(".cpio")?;
    if hash.len() != 16 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = cache_root.join(name);
    path.is_file().then_some(path)
}

fn build_initramfs(guest_binary: &Path, cache_root: &Path) -> Result<PathBuf, AssetError> {
    let binary = fs::read(guest_binary).map_err(|source| AssetError::ReadGuest {
        path: guest_binary.to_owned(),
        source,
    })?;
    bytes_verdict(guest_binary, &binary)?;
    let path = cache_root.join(format!("initramfs-{}.cpio", short_hash(&binary)));
    if path.is_file() {
        return Ok(path);
    }
    private_dir(cache_root).map_err(|source| AssetError::CreateCacheDir {
        path: cache_root.to_owned(),
        source,
    })?;
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

/// Creates `dir` (and missing parents) 0700, or sets an existing one to 0700 if it grants
/// group or other users anything. A symlinked directory is left alone.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn write_atomically(entries: &[Entry], dir: &Path, path: &Path) -> Result<(), AssetError> {
    private_dir(dir).map_err(|source| AssetError::CreateCacheDir {
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
        // busybox-static is static; /bin/true is a dynamically linked distribution binary.
        assert!(check_static_x86_64_elf(Path::new("/bin/busybox")).is_ok());
        let dynamic = check_static_x86_64_elf(Path::new("/bin/true"));
        assert!(
            matches!(dynamic, Err(AssetError::GuestDynamic { .. })),
            "{dynamic:?}"
        );
        assert!(dynamic
            .expect_err("dynamic")
            .to_string()
            .contains("scripts/build-guest.sh"));
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("script");
        fs::write(&f, "#!/bin/sh\necho not an elf at all\n").expect("write");
        assert!(matches!(
            check_static_x86_64_elf(&f),
            Err(AssetError::GuestNotX86_64 { .. })
        ));
        // A truncated ELF (header only, program headers cut off) is refused, not read past.
        let bytes = fs::read("/bin/busybox").expect("read busybox");
        let cut = dir.path().join("cut");
        fs::write(&cut, &bytes[..64]).expect("write");
        assert!(matches!(
            check_static_x86_64_elf(&cut),
            Err(AssetError::GuestNotX86_64 { .. })
        ));
        assert!(bytes_verdict(&cut, &bytes[..64]).is_err());
        assert!(bytes_verdict(&cut, &bytes).is_ok());
    }

    #[test]
    fn built_guests_static_and_dynamic() {
        // The real guest as scripts/build-guest.sh builds it is static; a plain workspace
        // build of the same crate (when present) is dynamic and refused.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new("bash")
            .arg(root.join("scripts/build-guest.sh"))
            .output()
            .expect("run build-guest.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let guest = PathBuf::from(stdout.lines().last().expect("path line").trim());
        check_static_x86_64_elf(&guest).expect("the built guest is static");
        let initramfs_dir = tempfile::tempdir().expect("tempdir");
        initramfs_for(&guest, initramfs_dir.path()).expect("initramfs of the static guest");
        assert!(matches!(
            initramfs_for(Path::new("/bin/true"), initramfs_dir.path()),
            Err(AssetError::GuestDynamic { .. })
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
        // Only the archive and its identity memo are left in the cache (no temporary
        // files), in a private directory.
        let mut names: Vec<String> = fs::read_dir(&cache)
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("initramfs-by-id-")),
            "{names:?}"
        );
        // A rewritten binary (new content, so a new ctime) gets its own archive even though
        // its path is the same.
        let other = dir.path().join("other");
        fs::copy("/bin/busybox", &other).expect("copy");
        fs::OpenOptions::new()
            .append(true)
            .open(&other)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
            .expect("append");
        fs::rename(&other, &bin).expect("replace");
        let c = initramfs_for(&bin, &cache).expect("rebuilt for new content");
        assert_ne!(c, a);
        fs::remove_file(&c).expect("rm");
        fs::copy("/bin/busybox", &other).expect("copy");
        fs::rename(&other, &bin).expect("restore");
        assert_eq!(initramfs_for(&bin, &cache).expect("same content"), a);
        use std::os::unix::fs::PermissionsExt;
        let mode = || fs::metadata(&cache).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(), 0o700);
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::remove_file(&a).expect("rm");
        initramfs_for(&bin, &cache).expect("rebuild");
        assert_eq!(mode(), 0o700, "a loose cache directory is tightened");

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

//! `matchlock volume`: named ext4 disk images that outlive sandboxes (spec §1.18).
//!
//! # Design
//! A volume is one sparse file `<name>.ext4` in [`Paths::volumes`], formatted by `mke2fs`
//! (no root needed). `run --disk @NAME:/mnt[:ro]` attaches it through [`resolve`]. Names are
//! validated before they touch a path (`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`), so no name escapes the
//! directory. Volumes take the sandbox's disk locks ([`matchlock_sandbox::disklock`]): `rm`
//! needs the exclusive lock (refused while any sandbox has the volume attached), `cp` holds a
//! shared lock on the source (refused while a sandbox writes it; read-only attachments may
//! stay) and an exclusive one on the new copy until it is complete, so no sandbox attaches a
//! half-written copy.
//!
//! `cp` copies only the source's data extents (`SEEK_DATA`/`SEEK_HOLE`, each extent with
//! `copy_file_range`, which also reflinks on filesystems that can): a 10 GiB volume holding
//! 50 MiB of data costs 50 MiB. Without `copy_file_range` it reads and writes, skipping
//! all-zero blocks. Owner (uid:gid), permission bits (setuid/setgid/sticky included), mtime
//! and atime are then copied, in that order (chown clears setuid bits). If the owner cannot be
//! kept (a non-root user copying another user's volume), the copy fails and is removed rather
//! than silently changing owner: `cp` promises an identical volume.
//!
//! # Limitations
//! Sizes print in MiB with the reference's `MB` label. A volume must be stopped in every
//! sandbox to be removed. Locks are advisory: a tool writing the image file directly is not
//! stopped.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use matchlock_sandbox::disklock::{self, DiskLock, DiskLockError, Mode};
use matchlock_sandbox::paths::Paths;
use serde::Serialize;

use super::common;
use crate::output::table;

const MIB: u64 = 1 << 20;
/// Bytes per `copy_file_range` call (progress granularity).
const COPY_CHUNK: u64 = 64 * MIB;
/// Buffer for the read/write fallback.
const FALLBACK_BUF: usize = 1 << 20;

/// Manage named ext4 volumes: disks that keep their data across sandboxes.
///
/// Examples:
///   matchlock volume create data --size 1024          # 1 GiB ext4 image (sparse)
///   matchlock run --image busybox:local --disk @data:/data -- sh -c 'echo hi > /data/f'
///   matchlock run --image busybox:local --disk @data:/data:ro -- cat /data/f
///   matchlock volume cp data data-backup; matchlock volume ls; matchlock volume rm data
///
/// A volume attached read-write to a running sandbox cannot be attached anywhere else at the
/// same time; read-only attachments can be shared.
#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a named volume (an ext4 image).
    ///
    /// Example: matchlock volume create cache --size 2048
    Create {
        /// Volume name: letters, digits, '_', '.', '-', starting with a letter or digit.
        name: String,
        /// Size in MB (MiB); the file is sparse, so only written blocks use host space.
        #[arg(long, default_value_t = 10240)]
        size: u64,
        /// Print JSON ({"name","size","path"}).
        #[arg(long)]
        json: bool,
    },
    /// List named volumes.
    #[command(alias = "list")]
    Ls {
        /// Print a JSON array of {"name","size","path"}.
        #[arg(long)]
        json: bool,
    },
    /// Remove a named volume (refused while a running sandbox has it attached).
    #[command(alias = "remove")]
    Rm {
        /// Volume name.
        name: String,
    },
    /// Copy a named volume to a new one (owner, mode and mtime kept; holes stay holes).
    ///
    /// Example: matchlock volume cp data data-backup
    #[command(alias = "copy")]
    Cp {
        /// Source volume.
        src: String,
        /// Destination volume (must not exist).
        dest: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name: name cannot be empty")]
    EmptyName,
    #[error("invalid volume name: {0:?} (allowed: alphanumeric, '_', '.', '-', must start with alphanumeric)")]
    InvalidName(String),
    #[error("--size must be > 0")]
    ZeroSize,
    #[error("--size {0} MB is too large")]
    TooLarge(u64),
    #[error("named volume already exists: {0}")]
    Exists(String),
    #[error("named volume not found: {0}")]
    NotFound(String),
    #[error("copy named volume: source and destination must be different")]
    SameVolume,
    #[error("create volume directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create volume file {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("size volume file {path}")]
    SetSize {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4/mke2fs not found (looked in PATH, /usr/sbin, /sbin); install e2fsprogs")]
    MkfsNotFound,
    #[error(transparent)]
    Format(matchlock_sandbox::disk::DiskError),
    #[error("read volume directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stat volume {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("named volume {name:?} is attached to running sandbox {holders}; stop it before removing the volume")]
    RemoveInUse { name: String, holders: String },
    #[error("remove named volume {name:?}")]
    RemoveLocked {
        name: String,
        #[source]
        source: DiskLockError,
    },
    #[error("remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copy named volume {name:?}")]
    CopyLocked {
        name: String,
        #[source]
        source: DiskLockError,
    },
    #[error("copy data from {src} to {dest}")]
    CopyData {
        src: PathBuf,
        dest: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keep owner {uid}:{gid} on {path} (copying another user's volume needs root)")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("keep mode {mode:o} on {path}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("keep modification time on {path}")]
    Times {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("flush {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One volume as `ls`/`create --json` print it.
#[derive(Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size: String,
    pub path: String,
}

/// The trimmed name if it passes the §1.18 rule.
pub fn validate_name(name: &str) -> Result<String, VolumeError> {
    let n = name.trim();
    let mut chars = n.chars();
    let Some(first) = chars.next() else {
        return Err(VolumeError::EmptyName);
    };
    let ok = first.is_ascii_alphanumeric()
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return Err(VolumeError::InvalidName(n.to_string()));
    }
    Ok(n.to_string())
}

/// The image file of volume `name` (validated; need not exist).
pub fn volume_path(paths: &Paths, name: &str) -> Result<PathBuf, VolumeError> {
    let name = validate_name(name)?;
    Ok(paths.volumes().join(format!("{name}.ext4")))
}

/// The image file of an existing volume, for `--disk @NAME`.
pub fn resolve(paths: &Paths, name: &str) -> Result<PathBuf, VolumeError> {
    let path = volume_path(paths, name)?;
    if !is_volume_file(&path) {
        return Err(VolumeError::NotFound(name.trim().to_string()));
    }
    Ok(path)
}

/// A regular file (not a symlink, directory or device).
fn is_volume_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// `16.0 MB` (MiB, as the reference prints volume sizes).
fn size_label(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / MIB as f64;
    format!("{mb:.1} MB")
}

fn info(name: &str, path: &Path, bytes: u64) -> VolumeInfo {
    VolumeInfo {
        name: name.to_string(),
        size: size_label(bytes),
        path: path.display().to_string(),
    }
}

fn ensure_dir(paths: &Paths) -> Result<PathBuf, VolumeError> {
    let dir = paths.volumes();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(|source| VolumeError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// Creates volume `name` of `size_mb` MiB; nothing is left behind on failure.
pub fn create(paths: &Paths, name: &str, size_mb: u64) -> Result<VolumeInfo, VolumeError> {
    let name = validate_name(name)?;
    if size_mb == 0 {
        return Err(VolumeError::ZeroSize);
    }
    let bytes = size_mb
        .checked_mul(MIB)
        .filter(|b| i64::try_from(*b).is_ok())
        .ok_or(VolumeError::TooLarge(size_mb))?;
    let mkfs = matchlock_sandbox::disk::find_mkfs().ok_or(VolumeError::MkfsNotFound)?;
    let path = ensure_dir(paths)?.join(format!("{name}.ext4"));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => VolumeError::Exists(name.clone()),
            _ => VolumeError::CreateFile {
                path: path.clone(),
                source,
            },
        })?;
    // Nobody may attach it before it is formatted.
    let _ = file.try_lock();
    let made = file
        .set_len(bytes)
        .map_err(|source| VolumeError::SetSize {
            path: path.clone(),
            source,
        })
        .and_then(|()| format_ext4(&mkfs, &path));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    tracing::debug!(path = %path.display(), size_mb, "volume created");
    Ok(info(&name, &path, bytes))
}

/// `mke2fs -t ext4 -F -q` with lazy init (formatting a 10 GiB sparse file stays fast and
/// sparse). A journal is kept: a volume's data should survive a killed VM.
fn format_ext4(mkfs: &Path, path: &Path) -> Result<(), VolumeError> {
    matchlock_sandbox::disk::format_ext4(
        mkfs,
        path,
        &["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"],
    )
    .map_err(VolumeError::Format)
}

/// Every volume, sorted by name.
pub fn list(paths: &Paths) -> Result<Vec<VolumeInfo>, VolumeError> {
    let dir = paths.volumes();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(VolumeError::ReadDir { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_suffix(".ext4"))
        else {
            continue;
        };
        if validate_name(name).ok().as_deref() != Some(name) {
            continue;
        }
        match entry.metadata() {
            Ok(m) if m.file_type().is_file() => out.push(info(name, &path, m.len())),
            _ => continue,
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes volume `name`, unless a running sandbox has it attached.
pub fn remove(paths: &Paths, name: &str) -> Result<(), VolumeError> {
    let path = resolve(paths, name)?;
    let name = validate_name(name)?;
    let label = disklock::describe(&path, &paths.volumes());
    let state = common::state(paths).ok();
    let held = disklock::acquire(&path, Mode::ReadWrite, &label, state.as_deref(), "").map_err(
        |source| match &source {
            DiskLockError::HeldReadWrite { holder, .. }
            | DiskLockError::HeldReadOnly { holder, .. }
                if !holder.is_empty() =>
            {
                VolumeError::RemoveInUse {
                    name: name.clone(),
                    holders: holder.trim().trim_matches(['(', ')']).to_string(),
                }
            }
            _ => VolumeError::RemoveLocked {
                name: name.clone(),
                source,
            },
        },
    )?;
    std::fs::remove_file(&path).map_err(|source| VolumeError::Remove {
        path: path.clone(),
        source,
    })?;
    drop(held);
    Ok(())
}

/// Copies volume `src` to the new volume `dest` (see the module docs for what is kept).
pub fn copy(paths: &Paths, src: &str, dest: &str) -> Result<(), VolumeError> {
    let (src, dest) = (validate_name(src)?, validate_name(dest)?);
    if src == dest {
        return Err(VolumeError::SameVolume);
    }
    let src_path = resolve(paths, &src)?;
    let dest_path = volume_path(paths, &dest)?;
    if std::fs::symlink_metadata(&dest_path).is_ok() {
        return Err(VolumeError::Exists(dest));
    }
    let state = common::state(paths).ok();
    let label = disklock::describe(&src_path, &paths.volumes());
    // Shared: read-only attachments may stay; a read-write one (or a removal) is refused.
    let src_lock = disklock::acquire(&src_path, Mode::ReadOnly, &label, state.as_deref(), "")
        .map_err(|source| VolumeError::CopyLocked {
            name: src.clone(),
            source,
        })?;
    let (dest_file, dest_lock) = create_dest(&dest_path, &dest)?;
    let copied = copy_into(&src_lock, &dest_file, &dest_path);
    if copied.is_err() {
        let _ = std::fs::remove_file(&dest_path);
    }
    drop(dest_lock);
    copied
}

/// Creates the destination image (O_EXCL) and locks it exclusively until the copy is done.
fn create_dest(path: &Path, name: &str) -> Result<(File, DiskLock), VolumeError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => VolumeError::Exists(name.to_string()),
            _ => VolumeError::CreateFile {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let lock = disklock::acquire(path, Mode::ReadWrite, name, None, "").map_err(|source| {
        let _ = std::fs::remove_file(path);
        VolumeError::CopyLocked {
            name: name.to_string(),
            source,
        }
    });
    Ok((file, lock?))
}

/// The data, then owner, mode and times, then a flush.
fn copy_into(src: &DiskLock, dest: &File, dest_path: &Path) -> Result<(), VolumeError> {
    let src_file = src.file();
    let meta = src_file.metadata().map_err(|source| VolumeError::Stat {
        path: src.path.clone(),
        source,
    })?;
    let progress = Progress::new(meta.len());
    sparse_copy(src_file, dest, meta.len(), &progress).map_err(|source| VolumeError::CopyData {
        src: src.path.clone(),
        dest: dest_path.to_path_buf(),
        source,
    })?;
    progress.finish();
    keep_metadata(dest, dest_path, &meta)?;
    dest.sync_all().map_err(|source| VolumeError::Sync {
        path: dest_path.to_path_buf(),
        source,
    })
}

/// Owner first (chown clears setuid/setgid), then the mode bits, then the times.
fn keep_metadata(dest: &File, path: &Path, meta: &std::fs::Metadata) -> Result<(), VolumeError> {
    let (uid, gid) = (meta.uid(), meta.gid());
    std::os::unix::fs::fchown(dest, Some(uid), Some(gid)).map_err(|source| VolumeError::Chown {
        path: path.to_path_buf(),
        uid,
        gid,
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    dest.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|source| VolumeError::Chmod {
            path: path.to_path_buf(),
            mode,
            source,
        })?;
    let times = std::fs::FileTimes::new()
        .set_modified(meta.modified().unwrap_or(std::time::UNIX_EPOCH))
        .set_accessed(meta.accessed().unwrap_or(std::time::UNIX_EPOCH));
    dest.set_times(times).map_err(|source| VolumeError::Times {
        path: path.to_path_buf(),
        source,
    })
}

/// Copies the data extents of `src` (length `len`) into `dest`, leaving holes as holes.
fn sparse_copy(src: &File, dest: &File, len: u64, progress: &Progress) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    dest.set_len(len)?;
    let end = i64::try_from(len).map_err(|_| std::io::Error::other("volume too large"))?;
    let fd = src.as_raw_fd();
    let mut off = 0i64;
    while off < end {
        let data = match lseek(fd, off, Whence::SeekData) {
            Ok(d) => d,
            // No data after `off`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            // No SEEK_DATA support: treat the rest as data.
            Err(_) => off,
        };
        let hole = lseek(fd, data, Whence::SeekHole).unwrap_or(end).min(end);
        copy_range(src, dest, data, hole - data, progress)?;
        off = hole.max(data + 1);
    }
    Ok(())
}

/// Copies `[start, start+len)` with `copy_file_range`, falling back to read/write.
fn copy_range(
    src: &File,
    dest: &File,
    start: i64,
    len: i64,
    progress: &Progress,
) -> std::io::Result<()> {
    let mut done = 0i64;
    while done < len {
        let chunk = usize::try_from((len - done).min(COPY_CHUNK as i64)).unwrap_or(FALLBACK_BUF);
        let (mut i, mut o) = (start + done, start + done);
        match nix::fcntl::copy_file_range(src, Some(&mut i), dest, Some(&mut o), chunk) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += i64::try_from(n).unwrap_or(0),
            Err(
                nix::errno::Errno::EXDEV
                | nix::errno::Errno::ENOSYS
                | nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::EINVAL,
            ) => {
                return read_write(src, dest, start + done, len - done, progress);
            }
            Err(e) => return Err(e.into()),
        }
        progress.at(u64::try_from(start + done).unwrap_or(0));
    }
    Ok(())
}

/// The fallback copy: plain reads and writes, all-zero blocks skipped (they are holes in
/// the freshly sized destination already).
fn read_write(
    src: &File,
    dest: &File,
    start: i64,
    len: i64,
    progress: &Progress,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; FALLBACK_BUF];
    let start = u64::try_from(start).map_err(std::io::Error::other)?;
    let len = u64::try_from(len).map_err(std::io::Error::other)?;
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from((len - done).min(FALLBACK_BUF as u64)).unwrap_or(FALLBACK_BUF);
        let Some(block) = buf.get_mut(..want) else {
            break;
        };
        src.read_exact_at(block, start + done)?;
        if block.iter().any(|b| *b != 0) {
            dest.write_all_at(block, start + done)?;
        }
        done += want as u64;
        progress.at(start + done);
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new(len: u64) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new(len);
        let style = indicatif::ProgressStyle::with_template(
            "copying [{bar:30.cyan/blue}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Progress(Some(bar))
    }

    fn at(&self, pos: u64) {
        if let Some(b) = &self.0 {
            b.set_position(pos);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

pub fn volume(c: VolumeCmd) -> anyhow::Result<()> {
    let paths = common::paths()?;
    match c {
        VolumeCmd::Create { name, size, json } => {
            let v = create(&paths, &name, size)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("Created volume {} ({})", v.name, v.size);
            }
        }
        VolumeCmd::Ls { json } => {
            let all = list(&paths)?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                let rows: Vec<Vec<String>> =
                    all.into_iter().map(|v| vec![v.name, v.size]).collect();
                print!("{}", table(&["NAME", "SIZE"], &rows));
            }
        }
        VolumeCmd::Rm { name } => {
            remove(&paths, &name)?;
            println!("Removed volume {}", name.trim());
        }
        VolumeCmd::Cp { src, dest } => {
            copy(&paths, &src, &dest)?;
            println!("Copied volume {} to {}", src.trim(), dest.trim());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> Paths {
        Paths {
            state: dir.join("state"),
            cache: dir.join("cache"),
        }
    }

    #[test]
    fn names() {
        assert_eq!(validate_name(" data-1.x_y ").expect("ok"), "data-1.x_y");
        for bad in ["-x", ".x", "a/b", "..", "a b", "é", "a\tb"] {
            let e = validate_name(bad).expect_err(bad).to_string();
            assert!(e.starts_with("invalid volume name: \""), "{e}");
        }
        assert_eq!(
            validate_name("  ").expect_err("empty").to_string(),
            "invalid volume name: name cannot be empty"
        );
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().expect("tmp");
        let (s, d) = (dir.path().join("s"), dir.path().join("d"));
        let src = File::create(&s).expect("src");
        src.set_len(64 * MIB).expect("len");
        use std::os::unix::fs::FileExt;
        src.write_all_at(b"head", 0).expect("w");
        src.write_all_at(&[7u8; 4096], 40 * MIB).expect("w");
        src.write_all_at(b"tail", 64 * MIB - 4).expect("w");
        let src = File::open(&s).expect("src");
        let dest = File::create(&d).expect("dest");
        sparse_copy(&src, &dest, 64 * MIB, &Progress(None)).expect("copy");
        assert_eq!(std::fs::read(&s).expect("r"), std::fs::read(&d).expect("r"));
        let m = std::fs::metadata(&d).expect("meta");
        assert_eq!(m.len(), 64 * MIB);
        assert!(m.blocks() * 512 < 8 * MIB, "inflated: {}", m.blocks() * 512);
    }

    #[test]
    fn fallback_copy_skips_zero_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = File::create(dir.path().join("s")).expect("src");
        use std::os::unix::fs::FileExt;
        src.write_all_at(&[0u8; 3 * FALLBACK_BUF], 0).expect("w");
        src.write_all_at(b"x", 2 * FALLBACK_BUF as u64).expect("w");
        let src = File::open(dir.path().join("s")).expect("src");
        let dest = File::create(dir.path().join("d")).expect("dest");
        dest.set_len(3 * FALLBACK_BUF as u64).expect("len");
        read_write(&src, &dest, 0, 3 * FALLBACK_BUF as i64, &Progress(None)).expect("copy");
        let got = std::fs::read(dir.path().join("d")).expect("r");
        assert_eq!(got, std::fs::read(dir.path().join("s")).expect("r"));
        assert!(dest.metadata().expect("m").blocks() * 512 <= 2 * FALLBACK_BUF as u64);
    }

    #[test]
    fn resolve_needs_an_existing_regular_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = paths(dir.path());
        let e = resolve(&p, "nope").expect_err("missing").to_string();
        assert_eq!(e, "named volume not found: nope");
        std::fs::create_dir_all(p.volumes().join("dir.ext4")).expect("mkdir");
        assert!(resolve(&p, "dir").is_err());
        assert!(resolve(&p, "../x").is_err());
    }
}

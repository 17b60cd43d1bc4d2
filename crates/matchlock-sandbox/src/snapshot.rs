//! The snapshot cache: post-boot VM snapshots keyed by everything they depend on, so
//! `run` can restore one instead of cold booting (the default for eligible VMs; off with
//! `run --no-snapshot`, `MATCHLOCK_NO_SNAPSHOT=1` or `MATCHLOCK_DEV_SNAPSHOT=0`;
//! docs/snapshots.md).
//!
//! # Design
//! - **Snapshot point**: the guest has finished init, sent `Hello` and waits for
//!   `BootConfig`. Nothing per-sandbox has reached it: the kernel command line carries no
//!   sandbox data, disks are probed but not opened or mounted, no user code ran. The
//!   restored guest gets its identity in `BootConfig`: clock, hostname, and a 32-byte host
//!   seed it credits with `RNDADDENTROPY` before forcing `RNDRESEEDCRNG`.
//! - **Key** ([`key`]): SHA-256 of [`matchlock_vm::snapshot_key_material`]: QEMU's argument
//!   vector with per-VM paths normalised (kernel command line incl. `tsc_early_khz`,
//!   memory, vCPUs, accelerator, device layout), each disk's serial, mode and size (the
//!   guest reads capacities at probe, so the image's squashfs size is part of the key: the
//!   first run of each image makes its snapshot), and the identity of the QEMU binary, the
//!   kernel and the initramfs (which is named by the guest runtime's hash).
//! - **Eligibility** ([`ineligible`]): the virtio-serial channel, no vhost-user-fs
//!   (workspace) and no vhost-user-net (vhost-user devices cannot migrate); others cold
//!   boot. A network device on `-netdev stream` (the default transport) is fine: its MAC
//!   is the same for every sandbox and in the key with the device, the stack's socket is
//!   reconnected by the new QEMU, and `eth0` is configured only from `BootConfig`.
//! - **Cache layout**: `<cache>/snapshots/<key>/{ram,state}`, directories 0700, files 0600.
//!   A snapshot is written into `.tmp-<pid>-<nanos>/` and renamed into place.
//! - **One maker per key**: making a snapshot is a cold boot plus a save, so when many
//!   sandboxes start at once with no snapshot (a fleet's first start, a new image, a new
//!   memory size) each making its own would multiply the machine's load by the save's cost
//!   and push every boot past its deadline (measured: 48 concurrent first `run -d`, all 48
//!   failed). The maker holds an exclusive `flock` on `.lock-<key>` for the whole making
//!   ([`SnapshotCache::begin`] fails with [`SnapshotCacheError::Busy`] without waiting);
//!   the others cold boot at once and restore once the snapshot exists. Should two writers
//!   still race (a lock file removed as stale between open and lock), the first rename wins
//!   and the loser deletes its copy and uses the winner's.
//!   A snapshot is removed by renaming it to `.dead-*` first, so a concurrent restore that
//!   already opened its files is unaffected.
//! - **Bounds** ([`SnapshotCache::evict`]): after each commit only the [`keep`] most
//!   recently used snapshots remain (default [`DEFAULT_KEEP`], `MATCHLOCK_SNAPSHOT_KEEP`);
//!   a lookup hit refreshes its directory's mtime. Evicting a snapshot a running VM was
//!   restored from is safe (each restored VM maps its own copy, and a copy in progress
//!   holds the file open). To clear the cache: `rm -rf ~/.cache/matchlock/snapshots`.
//! - **Restore**: QEMU 7.2 opens a RAM file read-write even to map it private, so each
//!   restore maps a sparse copy in its VM directory (`crate::disk::copy_sparse`, unlinked
//!   once QEMU has it) and no restored QEMU can write the cache.
//! - **Validation** before a restore: the RAM file must be exactly the VM's memory size and
//!   the state file 1 byte..[`MAX_STATE`]; anything else is discarded. A restore that fails
//!   (QEMU refuses the stream, the guest does not answer within the bound) is discarded by
//!   the caller, which then cold boots with a warning.
//!
//! # Limitations
//! The identity of QEMU, kernel and initramfs is their file metadata (path, device, inode,
//! size, mtime), not a content hash (hashing the kernel would cost more than the restore
//! saves); a file rewritten in place with its mtime forged is not noticed.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use matchlock_vm::VmConfig;

/// The developer switch of the first version: `0` still turns snapshot boot off.
pub const SNAPSHOT_ENV: &str = "MATCHLOCK_DEV_SNAPSHOT";
/// `MATCHLOCK_NO_SNAPSHOT=1`: cold boot every sandbox of this process (the equivalent of
/// `run --no-snapshot` for RPC/SDK-created sandboxes, whose `create` has no such field).
pub const NO_SNAPSHOT_ENV: &str = "MATCHLOCK_NO_SNAPSHOT";
/// Version of the key material; bump when its meaning changes.
const KEY_VERSION: &str = "matchlock-snapshot v1";
/// Largest device-state file accepted (the measured one is ~200 KB).
pub const MAX_STATE: u64 = 64 * 1024 * 1024;
/// Bytes of host randomness sent to each guest.
pub const SEED_BYTES: usize = 32;
/// Snapshots kept by default: the most recently used; older ones are evicted when a new
/// one is committed (each holds a sparse RAM file of the guest's touched memory, ~50-100
/// MiB on disk for the default image).
pub const DEFAULT_KEEP: usize = 4;
/// Overrides [`DEFAULT_KEEP`] (at least 1).
pub const KEEP_ENV: &str = "MATCHLOCK_SNAPSHOT_KEEP";
/// Temporary and dead directories older than this are removed by the next writer.
const STALE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotCacheError {
    #[error("compute the snapshot key")]
    Key(#[source] matchlock_vm::VmError),
    #[error("create the snapshot directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create the RAM file {path}")]
    CreateRam {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("move the new snapshot into place at {path}")]
    Commit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read host randomness")]
    Seed(#[source] std::io::Error),
    #[error("open the snapshot's lock file {path}")]
    OpenLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lock the snapshot's lock file {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another sandbox holds the key's lock: it is making this snapshot right now.
    #[error("another sandbox is making this snapshot")]
    Busy,
}

/// Whether snapshot boot is wanted (the default): not when the caller opted out
/// (`run --no-snapshot`), nor with `MATCHLOCK_NO_SNAPSHOT=1` or `MATCHLOCK_DEV_SNAPSHOT=0`.
pub fn enabled(opted_out: bool) -> bool {
    let env = |k: &str| std::env::var(k).ok();
    wanted(
        opted_out,
        env(NO_SNAPSHOT_ENV).as_deref(),
        env(SNAPSHOT_ENV).as_deref(),
    )
}

fn wanted(opted_out: bool, no_snapshot: Option<&str>, dev: Option<&str>) -> bool {
    !opted_out && no_snapshot != Some("1") && dev != Some("0")
}

/// Why a VM cannot be snapshotted or restored (`None`: it can).
pub fn ineligible(vm: &VmConfig) -> Option<&'static str> {
    if vm.channel != matchlock_vm::Channel::Serial {
        return Some("the vsock channel cannot migrate");
    }
    match vm.owner_vhost_user()? {
        matchlock_vm::OwnerVhostUser::Fs => Some("vhost-user-fs (workspace) cannot migrate"),
        matchlock_vm::OwnerVhostUser::Net => Some("vhost-user-net cannot migrate"),
    }
}

/// The cache key of `vm`'s snapshot (hex SHA-256).
pub fn key(vm: &VmConfig) -> Result<String, SnapshotCacheError> {
    let material = matchlock_vm::snapshot_key_material(vm).map_err(SnapshotCacheError::Key)?;
    Ok(key_of(&material))
}

fn key_of(material: &str) -> String {
    let mut h = Sha256::new();
    h.update(KEY_VERSION.as_bytes());
    h.update(b"\n");
    h.update(material.as_bytes());
    hex::encode(h.finalize())
}

/// Fresh host randomness for one guest's `BootConfig`.
pub fn seed() -> Result<Vec<u8>, SnapshotCacheError> {
    let mut buf = vec![0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(SnapshotCacheError::Seed)?;
    Ok(buf)
}

/// A snapshot's files.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
}

impl Entry {
    pub fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
}

/// `<cache>/snapshots`.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    root: PathBuf,
}

impl SnapshotCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The valid snapshot for `key` of a VM with `memory_mb`, if any; an invalid one is
    /// discarded.
    pub fn lookup(&self, key: &str, memory_mb: u32) -> Option<Entry> {
        let entry = Entry {
            dir: self.root.join(key),
        };
        if !entry.dir.is_dir() {
            return None;
        }
        let ram_ok = std::fs::metadata(entry.ram())
            .is_ok_and(|m| m.is_file() && m.len() == u64::from(memory_mb) * 1024 * 1024);
        let state_ok = std::fs::metadata(entry.state())
            .is_ok_and(|m| m.is_file() && m.len() > 0 && m.len() <= MAX_STATE);
        if ram_ok && state_ok {
            touch(&entry.dir);
            return Some(entry);
        }
        tracing::warn!(dir = %entry.dir.display(), ram_ok, state_ok, "invalid snapshot discarded");
        self.discard(&entry);
        None
    }

    /// Removes a snapshot (renamed aside first, see the module docs).
    pub fn discard(&self, entry: &Entry) {
        let dead = self.root.join(format!(".dead-{}", unique()));
        if std::fs::rename(&entry.dir, &dead).is_ok() {
            let _ = std::fs::remove_dir_all(&dead);
        }
    }

    /// Starts writing a snapshot: takes the key's maker lock ([`SnapshotCacheError::Busy`]
    /// if another sandbox holds it) and creates a private temporary directory with an empty
    /// RAM file. The lock is held until the [`Pending`] is committed or dropped.
    pub fn begin(&self, key: &str) -> Result<Pending, SnapshotCacheError> {
        matchlock_vm::assets::private_dir(&self.root).map_err(|source| {
            SnapshotCacheError::CreateDir {
                path: self.root.clone(),
                source,
            }
        })?;
        let lock = self.lock(key)?;
        self.remove_stale();
        let tmp = self.root.join(format!(".tmp-{}", unique()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|source| SnapshotCacheError::CreateDir {
                path: tmp.clone(),
                source,
            })?;
        let pending = Pending {
            tmp: Some(tmp),
            target: self.root.join(key),
            _lock: lock,
        };
        let ram = pending.ram();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&ram)
            .map_err(|source| SnapshotCacheError::CreateRam { path: ram, source })?;
        Ok(pending)
    }

    /// Keeps the `keep` most recently used snapshots (by their directory's mtime, which
    /// [`SnapshotCache::lookup`] refreshes) and `current`, and discards the rest. Discarding
    /// one that a running VM was restored from is safe: QEMU has the RAM file open and
    /// mapped private, so on Linux the unlinked file lives on until that VM exits, and the
    /// state file was read to the end when the restore finished.
    pub fn evict(&self, keep: usize, current: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut keys: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| e.path() != current)
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.0));
        let old = keys.split_off(keep.saturating_sub(1).min(keys.len()));
        for (_, dir) in &old {
            tracing::info!(dir = %dir.display(), "evicting least recently used snapshot");
            self.discard(&Entry { dir: dir.clone() });
        }
        old.len()
    }

    /// The key's maker lock, taken without waiting.
    fn lock(&self, key: &str) -> Result<std::fs::File, SnapshotCacheError> {
        let path = self.root.join(format!(".lock-{key}"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| SnapshotCacheError::OpenLock {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(SnapshotCacheError::Busy),
            Err(std::fs::TryLockError::Error(source)) => {
                Err(SnapshotCacheError::Lock { path, source })
            }
        }
    }

    /// Removes temporary and dead directories left by crashed writers, and lock files
    /// nobody holds that are as old (one per key ever made).
    fn remove_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_AFTER);
            if old && (name.starts_with(".tmp-") || name.starts_with(".dead-")) {
                let _ = std::fs::remove_dir_all(e.path());
            } else if old && name.starts_with(".lock-") {
                // Unlinked while we hold it, so no maker holds it now; one that opened it
                // just before is the race the commit already resolves.
                if let Ok(f) = std::fs::File::open(e.path()) {
                    if f.try_lock().is_ok() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}

/// The number of snapshots to keep: [`KEEP_ENV`] or [`DEFAULT_KEEP`].
pub fn keep() -> usize {
    std::env::var(KEEP_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(DEFAULT_KEEP)
}

/// Marks a snapshot as just used (its directory's mtime).
fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// A snapshot being written; removed on drop unless committed. Holds the key's maker lock.
pub struct Pending {
    tmp: Option<PathBuf>,
    target: PathBuf,
    _lock: std::fs::File,
}

impl Pending {
    fn dir(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.target)
    }
    pub fn ram(&self) -> PathBuf {
        self.dir().join("ram")
    }
    pub fn state(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// Moves the snapshot into place; if another writer got there first, its snapshot is
    /// used and this one removed.
    pub fn commit(mut self) -> Result<Entry, SnapshotCacheError> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(Entry {
                dir: self.target.clone(),
            });
        };
        match std::fs::rename(&tmp, &self.target) {
            Ok(()) => Ok(Entry {
                dir: self.target.clone(),
            }),
            Err(_) if self.target.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(Entry {
                    dir: self.target.clone(),
                })
            }
            Err(source) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(SnapshotCacheError::Commit {
                    path: self.target.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

/// A name no other writer on this host uses at the same time.
fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn vm(channel: matchlock_vm::Channel) -> VmConfig {
        let mut v = VmConfig::new("t", "/nonexistent", "/k", "/i");
        v.memory_mb = 256;
        v.accel = matchlock_vm::Accel::Tcg;
        v.channel = channel;
        v
    }

    #[test]
    fn on_by_default_and_every_off_switch_works() {
        assert!(wanted(false, None, None));
        assert!(wanted(false, Some("0"), Some("1")));
        assert!(!wanted(true, None, None));
        assert!(!wanted(false, Some("1"), None));
        assert!(!wanted(false, None, Some("0")));
    }

    #[test]
    fn only_migratable_device_sets_are_eligible() {
        use matchlock_vm::{Channel, NetDevice, NetTransport};
        assert!(ineligible(&vm(Channel::Vsock)).is_some());
        let mut v = vm(Channel::Serial);
        assert_eq!(ineligible(&v), None);
        let mut net = NetDevice {
            socket: "/n".into(),
            mac: [2, 0, 0, 0, 0, 1],
            transport: NetTransport::Stream,
        };
        v.net = Some(net.clone());
        assert_eq!(ineligible(&v), None);
        net.transport = NetTransport::VhostUser;
        v.net = Some(net);
        assert_eq!(ineligible(&v), Some("vhost-user-net cannot migrate"));
    }

    #[test]
    fn key_depends_on_every_byte_of_the_material() {
        let a = key_of("-m 256M\ndisk ml-lower0 ro=true size=4096");
        assert_eq!(a.len(), 64);
        assert_eq!(a, key_of("-m 256M\ndisk ml-lower0 ro=true size=4096"));
        assert_ne!(a, key_of("-m 256M\ndisk ml-lower0 ro=true size=8192"));
        assert_ne!(a, key_of("-m 512M\ndisk ml-lower0 ro=true size=4096"));
    }

    fn write_snapshot(cache: &SnapshotCache, key: &str, ram_len: u64) -> Entry {
        let p = cache.begin(key).expect("begin");
        std::fs::OpenOptions::new()
            .write(true)
            .open(p.ram())
            .and_then(|f| f.set_len(ram_len))
            .expect("ram");
        std::fs::write(p.state(), b"state").expect("state");
        p.commit().expect("commit")
    }

    #[test]
    fn commit_lookup_race_and_discard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = SnapshotCache::new(dir.path().join("snapshots"));
        assert!(cache.lookup("k", 1).is_none());
        let e = write_snapshot(&cache, "k", 1024 * 1024);
        let mode = std::fs::metadata(&cache.root)
            .expect("root")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let ram_mode = std::fs::metadata(e.ram())
            .expect("ram")
            .permissions()
            .mode();
        assert_eq!(ram_mode & 0o777, 0o600);
        assert!(cache.lookup("k", 1).is_some());
        // A second writer for the same key loses the rename and uses the first snapshot.
        let again = write_snapshot(&cache, "k", 1024 * 1024);
        assert_eq!(again.dir, e.dir);
        assert_eq!(
            entries(&cache),
            vec!["k".to_string()],
            "no temporary left behind"
        );
        // Wrong memory size: discarded.
        assert!(cache.lookup("k", 2).is_none());
        assert!(!e.dir.exists());
        // Truncated state: discarded.
        let e = write_snapshot(&cache, "t", 1024 * 1024);
        std::fs::write(e.state(), b"").expect("truncate");
        assert!(cache.lookup("t", 1).is_none());
        // An abandoned writer leaves nothing but its (released) lock file.
        drop(cache.begin("z").expect("begin"));
        assert!(entries(&cache).is_empty());
    }

    /// Names in the cache other than lock files.
    fn entries(cache: &SnapshotCache) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&cache.root)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".lock-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn one_maker_per_key_and_stale_locks_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = SnapshotCache::new(dir.path().join("snapshots"));
        let held = cache.begin("k").expect("first maker");
        assert!(matches!(cache.begin("k"), Err(SnapshotCacheError::Busy)));
        // Other keys are not held up.
        drop(cache.begin("other").expect("other key"));
        drop(held);
        let again = cache.begin("k").expect("free again once dropped");
        // Old lock files nobody holds are removed by the next writer; a held one stays.
        let old = SystemTime::now() - STALE_AFTER - Duration::from_secs(60);
        for key in ["k", "other"] {
            std::fs::File::open(cache.root.join(format!(".lock-{key}")))
                .and_then(|f| f.set_modified(old))
                .expect("age lock");
        }
        drop(cache.begin("new").expect("writer"));
        assert!(cache.root.join(".lock-k").exists(), "held lock kept");
        assert!(
            !cache.root.join(".lock-other").exists(),
            "stale lock removed"
        );
        drop(again);
    }

    #[test]
    fn evicts_least_recently_used_beyond_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = SnapshotCache::new(dir.path().join("snapshots"));
        let mut made = Vec::new();
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            let e = write_snapshot(&cache, k, 1024 * 1024);
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64);
            std::fs::File::open(&e.dir)
                .and_then(|f| f.set_modified(t))
                .expect("mtime");
            made.push(e);
        }
        // "a" is the oldest by creation, but a lookup makes it the most recently used.
        assert!(cache.lookup("a", 1).is_some());
        // A restore running from "b" keeps its open RAM file after the eviction.
        let open_ram = std::fs::File::open(made[1].ram()).expect("open ram");
        let current = cache.root.join("d");
        assert_eq!(cache.evict(2, &current), 2);
        assert_eq!(entries(&cache), ["a", "d"]);
        assert_eq!(open_ram.metadata().expect("fstat").len(), 1024 * 1024);
        assert_eq!(cache.evict(2, &current), 0);
    }
}

//! `matchlock-bench vfs`: workspace file I/O through our in-process virtio-fs server vs.
//! upstream `virtiofsd` (passthrough) vs. the guest's own root disk, on one host directory.
//!
//! # Design
//! Two sandboxes of the same image (`nettest`, which has git) run side by side, both with
//! `-v DIR:/workspace:host_fs --workspace /workspace` on the same host directory `DIR`:
//! - "ours": the sandbox's own in-process vhost-user-fs server;
//! - "virtiofsd": the owner started with `MATCHLOCK_DEV_VHOST_USER_FS_SOCKET` (see
//!   `matchlock_sandbox::services`), so QEMU's `vhost-user-fs-device` connects to a
//!   `virtiofsd` this bench started on `DIR` instead. Same kernel, image, QEMU command line,
//!   tag and guest mount: only the server differs. The bench checks that the knob took
//!   (that sandbox has no `vfs.sock` of its own) so it never compares ours with ours;
//! - "root disk": the same commands in a directory on `/` of the first sandbox (its ext4
//!   upper disk on virtio-blk);
//! - "memory": the same commands in a `memory` mount (`/workspace/floor`) of a third sandbox,
//!   which the bench starts through `matchlock rpc` because the CLI has no memory mounts. The
//!   provider keeps everything in the owner's memory, so this side pays the virtio-fs round
//!   trips and no host I/O: the floor any server reaches on this machine. The metadata rows'
//!   root-disk target is read against it (a row whose floor is already past 2x the root disk
//!   cannot meet the target with any server here).
//!
//! Each side works in its own subdirectory of `DIR` (`ours/`, `virtiofsd/`), so the two
//! guests never see each other's files. One guest script per side and run measures every
//! row inside the guest (`date +%s%N` around each command, so exec and CLI overhead are not
//! in the figures); the sides take turns run by run, in a rotating order. Rows:
//! - sequential write: `dd` of 64 MiB from `/dev/zero` in 1 MiB blocks with `conv=fsync`;
//! - sequential read: the same file after `sync` and `drop_caches` in the guest (the host's
//!   page cache stays warm for every side, the root disk's image file included);
//! - create / stat / unlink of 2,000 empty files: one `touch`, one `stat` and one `rm` each
//!   with the 2,000 names on the command line (no per-file process);
//! - `git status` in a committed tree of 10,000 files (100 directories of 100), warm (the
//!   guest's caches as a developer has them). The host's git builds and commits the tree in
//!   each share side's directory before any guest looks into it, and `tar` packs one copy that the
//!   root-disk side unpacks onto `/`: the same tree everywhere. Building it in the guest ran
//!   the server past this host's hard `RLIMIT_NOFILE` (20,000, no `CAP_SYS_RESOURCE` to
//!   raise it): every file and object the guest creates stays looked up, and a passthrough
//!   server holds one `O_PATH` descriptor per looked-up inode. The guest's first
//!   `git status` warms the caches (it refreshes the index only where the guest sees other
//!   stat data than the host's git recorded: on the root disk's copy, and for an
//!   unprivileged owner, whose uid/gid the workspace swaps with root); the second too.
//!
//! virtiofsd: `$VIRTIOFSD`, else `virtiofsd` on `PATH` or in `~/.cargo/bin` (the Rust
//! daemon, `scripts/install-deps.sh --bench`), else Debian's QEMU 7.2 C daemon at
//! `/usr/lib/qemu/virtiofsd`; both with their default `cache=auto` (1 s entry and attr
//! timeouts). Without any, the virtiofsd column says so and the other two are measured.
//!
//! Cleanup: every sandbox runs in the bench's private `HOME`, and a [`Sandboxes`] guard made
//! before the first one starts runs `kill --all`, `rm --stopped` and `gc` there when it
//! drops, on success, on every error return and on a panic; the virtiofsd child is a
//! [`Daemon`] killed and reaped on drop, after the sandboxes (see [`Started`]). A sandbox a
//! failed `run -d` left without an ID is stopped too.
//!
//! # Limitations
//! Needs root (virtiofsd's sandboxing). A signal that kills the bench (SIGKILL, or SIGINT
//! and SIGTERM, which it does not catch) skips the guards: `matchlock gc` with the bench's
//! `HOME` (`/tmp/ml-bench-*`) reclaims what it left. The sandboxes run `--privileged` (all
//! alike) so the guest may write `drop_caches`. All three VMs are up during every run, so the
//! idle ones cost a little host CPU. The in-guest loop of `date` forks adds a few
//! milliseconds to every row on every side. The memory side's sandbox also has the share at
//! `/workspace` (for the tree's archive) and so a two-mount tree; its rows stay in the memory
//! mount. Its unlink row has come out slower than ours on the host directory (one run), with
//! the same requests per file: it is a floor for the transport, not a tight one per row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::Bench;

/// The image (with git) every side runs.
const IMAGE: &str = "nettest:bench";
/// The knob the sandbox reads (`matchlock_sandbox::services::DEV_VHOST_USER_FS_SOCKET_ENV`).
const KNOB: &str = matchlock_sandbox::services::DEV_VHOST_USER_FS_SOCKET_ENV;
/// Debian's QEMU 7.2 virtiofsd (the C daemon).
const DEBIAN_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// The rows in print order: name, whether it is a metadata row (root-disk target applies).
const ROWS: &[(&str, &str, bool)] = &[
    ("write", "sequential write 64 MiB (fsync)", false),
    (
        "read",
        "sequential read 64 MiB (guest caches dropped)",
        false,
    ),
    ("create", "create 2,000 files", true),
    ("stat", "stat 2,000 files", true),
    ("unlink", "unlink 2,000 files", true),
    ("git", "git status, 10,000-file tree", true),
];

/// Directories and files per directory of the `git status` tree (10,000 files).
const TREE_DIRS: usize = 100;
const TREE_FILES: usize = 100;
/// The tree's archive in the share, for the root-disk and memory sides.
const TREE_TAR: &str = "repo.tar";
/// The memory side's mount (and working directory) in its guest.
const FLOOR_DIR: &str = "/workspace/floor";

/// Readies the host-built tree in `$1/repo` (unpacked from the archive `$2` first when
/// given) and warms it: the first `git status` fills the caches (and refreshes the index where the
/// guest's stat data differ from what the host's git recorded), the second is a measured
/// one's twin.
const SETUP: &str = r#"set -e
mkdir -p "$1"; cd "$1"
if [ -n "$2" ]; then rm -rf repo; busybox tar -xf "$2"; fi
cd repo
git status --porcelain > /dev/null
git status --porcelain > /dev/null
echo setup-ok
"#;

/// One run of every row in `$1`; prints `<row> <nanoseconds>` lines.
const RUN: &str = r#"set -e
cd "$1"; rm -rf scratch; mkdir scratch; cd scratch
t() { date +%s%N; }
names=$(seq -f m/f%g 0 1999)
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(t); dd if=/dev/zero of=big bs=1M count=64 conv=fsync 2>/dev/null; e=$(t); echo "write $((e-s))"
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(t); dd if=big of=/dev/null bs=1M 2>/dev/null; e=$(t); echo "read $((e-s))"
rm big; mkdir m
s=$(t); touch $names; e=$(t); echo "create $((e-s))"
s=$(t); stat -c %i $names > /dev/null; e=$(t); echo "stat $((e-s))"
s=$(t); rm -f $names; e=$(t); echo "unlink $((e-s))"
rmdir m
cd ../repo
s=$(t); git status --porcelain > /dev/null; e=$(t); echo "git $((e-s))"
"#;

/// A detached sandbox of one side and the directory it works in.
struct Side {
    id: String,
    dir: String,
}

/// Every sandbox the bench starts lives in its private `HOME`: on drop (every return,
/// error or panic unwinding), stop them all and remove their state, whatever was recorded
/// of them (a `run -d` that failed after booting left no ID to kill by).
struct Sandboxes {
    bin: PathBuf,
    home: PathBuf,
}

impl Sandboxes {
    fn run(&self, args: &[&str]) {
        let r = Command::new(&self.bin)
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output();
        if let Ok(o) = r {
            if !o.status.success() {
                eprintln!(
                    "vfs: cleanup: matchlock {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
    }
}

impl Drop for Sandboxes {
    fn drop(&mut self) {
        self.run(&["kill", "--all"]);
        self.run(&["rm", "--stopped"]);
        self.run(&["gc"]);
    }
}

/// A helper process this bench started (virtiofsd, the memory side's `matchlock rpc`):
/// killed and reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What [`Bench::vfs`] started. Fields drop in order: the sandboxes stop before the
/// daemon serving one of them goes away (QEMU would otherwise lose its back-end mid-run).
struct Started {
    _sandboxes: Sandboxes,
    daemon: Option<Daemon>,
    /// The `matchlock rpc` holding the memory side's sandbox (its stdin stays open: EOF
    /// would close the sandbox); the guard above has stopped that sandbox when this drops.
    rpc: Option<Daemon>,
}

/// The virtiofsd to compare with and whether it takes the Rust daemon's options.
fn find_virtiofsd() -> Option<(PathBuf, bool)> {
    let rust_style = |p: &Path| -> bool {
        Command::new(p)
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--shared-dir"))
            .unwrap_or(false)
    };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("virtiofsd")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/virtiofsd"));
    }
    candidates.push(PathBuf::from(DEBIAN_VIRTIOFSD));
    let found = candidates.into_iter().find(|p| p.is_file())?;
    let rust = rust_style(&found);
    Some((found, rust))
}

/// Starts `virtiofsd` serving `share` on `socket` (passthrough, default cache policy).
fn start_virtiofsd(bin: &Path, rust: bool, share: &Path, socket: &Path) -> anyhow::Result<Daemon> {
    let mut c = Command::new(bin);
    if rust {
        c.arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(share)
            .args([
                "--cache",
                "auto",
                "--sandbox",
                "chroot",
                "--log-level",
                "error",
            ]);
    } else {
        c.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", share.display()))
            .args([
                "-o",
                "cache=auto",
                "-o",
                "sandbox=chroot",
                "-o",
                "log_level=err",
            ]);
    }
    let mut daemon = Daemon(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?,
    );
    let t = Instant::now();
    while !socket.exists() {
        if let Some(st) = daemon.0.try_wait()? {
            bail!("{} exited before listening: {st}", bin.display());
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{} did not create {}", bin.display(), socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(daemon)
}

/// Runs `git` on the host in `repo` (no system or user configuration).
fn host_git(repo: &Path, args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=bench", "-c", "user.email=bench@invalid"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .context("spawn the host's git (scripts/install-deps.sh --test installs it)")?;
    if !o.status.success() {
        bail!(
            "host git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Builds and commits the `git status` tree in `dir/repo` with the host's git: no guest
/// looks up (and so pins a server descriptor for) the files and objects of the build.
fn host_tree(dir: &Path) -> anyhow::Result<()> {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).with_context(|| format!("create {}", repo.display()))?;
    for d in 0..TREE_DIRS {
        let sub = repo.join(format!("d{d}"));
        std::fs::create_dir(&sub).with_context(|| format!("create {}", sub.display()))?;
        for f in 0..TREE_FILES {
            std::fs::write(sub.join(format!("f{f}")), format!("file {d} {f}\n"))
                .with_context(|| format!("write a file in {}", sub.display()))?;
        }
    }
    host_git(&repo, &["init", "-q", "."])?;
    host_git(&repo, &["add", "."])?;
    host_git(&repo, &["commit", "-q", "-m", "tree"])
}

/// The host tree in `share/<side>/repo` for every share side, and `share/repo.tar` (a copy
/// the root-disk side unpacks onto `/`).
fn host_trees(share: &Path, sides: &[&str]) -> anyhow::Result<()> {
    for side in sides {
        host_tree(&share.join(side))?;
    }
    let first = sides.first().context("no share side")?;
    let o = Command::new("tar")
        .arg("-C")
        .arg(share.join(first))
        .arg("-cf")
        .arg(share.join(TREE_TAR))
        .arg("repo")
        .stdin(Stdio::null())
        .output()
        .context("spawn tar")?;
    if !o.status.success() {
        bail!(
            "tar of the tree: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Whether a sandbox directory named `id` under `root` (3 levels deep) holds `vfs.sock`.
fn has_own_server(root: &Path, id: &str) -> bool {
    fn walk(dir: &Path, id: &str, depth: u32) -> Option<bool> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if e.file_name() == id {
                return Some(p.join(matchlock_sandbox::services::VFS_SOCKET).exists());
            }
            if depth > 0 {
                if let Some(found) = walk(&p, id, depth - 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    walk(root, id, 3).unwrap_or(false)
}

/// A check run once every side is up: the sides and the pids of the helper processes the
/// bench started (virtiofsd, the memory side's `matchlock rpc`).
type AfterStart<'a> = dyn Fn(&[(&'static str, Side)], &[u32]) -> anyhow::Result<()> + 'a;

/// Per-side, per-row durations.
type Times = BTreeMap<&'static str, BTreeMap<&'static str, Vec<Duration>>>;

impl Bench {
    fn import_nettest(&self) -> anyhow::Result<()> {
        let path = matchlock_test_support::nettest_image().context("build the nettest image")?;
        let archive = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        self.import(IMAGE, &archive)
    }

    /// `matchlock run -d` with the share at `/workspace`; `socket` = the external server.
    /// Call with a [`Sandboxes`] guard alive: a failure here may leave a sandbox behind.
    fn start_side(
        &self,
        name: &'static str,
        share: &Path,
        socket: Option<&Path>,
    ) -> anyhow::Result<Side> {
        let mut c = self.matchlock();
        // --privileged: the guest's `/proc/sys` is read-only otherwise (`drop_caches`).
        c.args([
            "run",
            "-d",
            "--privileged",
            "--image",
            IMAGE,
            "--disk-size",
            "2048",
        ])
        .args(["--workspace", "/workspace", "-v"])
        .arg(format!("{}:/workspace:host_fs", share.display()));
        match socket {
            Some(socket) => c.env(KNOB, socket),
            None => c.env_remove(KNOB),
        };
        let o = c.output().context("matchlock run -d")?;
        let side = Side {
            id: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            dir: format!("/workspace/{name}"),
        };
        if !o.status.success() || side.id.is_empty() {
            bail!(
                "matchlock run -d ({name}) failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        let own = has_own_server(&self.paths().state, &side.id);
        if own == socket.is_some() {
            bail!("side {name}: the sandbox's own virtio-fs server is running = {own}, expected the opposite");
        }
        Ok(side)
    }

    /// The memory side: a sandbox created through `matchlock rpc` (the CLI has no memory
    /// mounts) with the share at `/workspace`, for the tree's archive, and the `memory`
    /// provider at [`FLOOR_DIR`]. The `matchlock rpc` process stays open in `started` for as
    /// long as the sandbox is measured. Call with a [`Sandboxes`] guard alive.
    fn start_floor(&self, share: &Path, started: &mut Started) -> anyhow::Result<Side> {
        use std::io::{BufRead, Write};
        let child = self
            .matchlock()
            .arg("rpc")
            .env_remove(KNOB)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn matchlock rpc")?;
        let rpc = &mut started.rpc.insert(Daemon(child)).0;
        let stdout = rpc.stdout.take();
        let params = serde_json::json!({
            "image": IMAGE,
            "privileged": true,
            "resources": {"disk_size_mb": 2048},
            "vfs": {"workspace": "/workspace", "mounts": {
                "/workspace": {"type": "host_fs", "host_path": share},
                FLOOR_DIR: {"type": "memory"},
            }},
        });
        let request =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "create", "params": params});
        let input = rpc.stdin.as_mut().context("rpc stdin")?;
        writeln!(input, "{request}").context("write to matchlock rpc")?;
        input.flush().context("write to matchlock rpc")?;
        let mut output = std::io::BufReader::new(stdout.context("rpc stdout")?);
        // The create response is the first line with our id (events carry none).
        let mut line = String::new();
        let response = loop {
            line.clear();
            if output.read_line(&mut line).context("read matchlock rpc")? == 0 {
                bail!("matchlock rpc exited before answering create");
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("rpc line {line:?}"))?;
            if v["id"] == 1 {
                break v;
            }
        };
        let id = response["result"]["id"]
            .as_str()
            .with_context(|| format!("rpc create (memory side) failed: {response}"))?;
        Ok(Side {
            id: id.to_string(),
            dir: FLOOR_DIR.into(),
        })
    }

    /// Runs `script` with `args` as `$1...` in sandbox `id`; returns its stdout.
    fn guest_script(&self, id: &str, script: &str, args: &[&str]) -> anyhow::Result<String> {
        let o = self
            .matchlock()
            .args(["exec", id, "sh", "-c", script, "bench"])
            .args(args)
            .output()
            .context("spawn matchlock exec")?;
        if !o.status.success() {
            bail!(
                "guest script {args:?} failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// One run on `(id, dir)`, recorded under `side`.
    fn vfs_run(
        &self,
        side: &'static str,
        id: &str,
        dir: &str,
        t: &mut Times,
    ) -> anyhow::Result<()> {
        let out = self.guest_script(id, RUN, &[dir])?;
        for (row, _, _) in ROWS {
            let ns: u64 = out
                .lines()
                .find_map(|l| l.strip_prefix(row).and_then(|v| v.trim().parse().ok()))
                .with_context(|| format!("{side}: no {row} figure in {out:?}"))?;
            t.entry(side)
                .or_default()
                .entry(row)
                .or_default()
                .push(Duration::from_nanos(ns));
        }
        Ok(())
    }

    /// A guard that stops every sandbox of this bench's `HOME` when dropped.
    fn sandboxes(&self) -> Sandboxes {
        Sandboxes {
            bin: self.bin.clone(),
            home: self.home.path().to_path_buf(),
        }
    }

    /// Starts ours, (when found) the virtiofsd side on `share` and the memory side; `started`
    /// owns what ran.
    fn start_sides(
        &self,
        share: &Path,
        sockdir: &Path,
        virtiofsd: Option<&(PathBuf, bool)>,
        started: &mut Started,
    ) -> anyhow::Result<Vec<(&'static str, Side)>> {
        let mut sides = vec![("ours", self.start_side("ours", share, None)?)];
        if let Some((bin, rust)) = virtiofsd {
            let socket = sockdir.join("virtiofsd.sock");
            started.daemon = Some(start_virtiofsd(bin, *rust, share, &socket)?);
            sides.push((
                "virtiofsd",
                self.start_side("virtiofsd", share, Some(&socket))?,
            ));
        }
        sides.push(("memory", self.start_floor(share, started)?));
        Ok(sides)
    }

    pub(crate) fn vfs(&self) -> anyhow::Result<()> {
        self.vfs_with(&|_, _| Ok(()))
    }

    /// The vfs bench; `after_start` sees the sides and the helpers' pids once all are up (the
    /// cleanup test fails there).
    fn vfs_with(&self, after_start: &AfterStart<'_>) -> anyhow::Result<()> {
        self.import_nettest()?;
        let share = tempfile::Builder::new()
            .prefix("ml-vbench-share-")
            .tempdir_in("/tmp")?;
        let sockdir = tempfile::Builder::new()
            .prefix("ml-vbench-sock-")
            .tempdir_in("/tmp")?;
        let daemon = find_virtiofsd();
        let names: Vec<&str> = match daemon {
            Some(_) => vec!["ours", "virtiofsd"],
            None => vec!["ours"],
        };
        let mut started = Started {
            _sandboxes: self.sandboxes(),
            daemon: None,
            rpc: None,
        };
        let on_share =
            self.start_sides(share.path(), sockdir.path(), daemon.as_ref(), &mut started)?;
        let helpers: Vec<u32> = (started.daemon.iter().map(|d| d.0.id()))
            .chain(started.rpc.iter().map(|r| r.0.id()))
            .collect();
        after_start(&on_share, &helpers)?;
        // Before any guest looks into its directory.
        let t = Instant::now();
        host_trees(share.path(), &names)?;
        eprintln!("vfs: host trees committed in {:.1?}", t.elapsed());
        // (side, sandbox, directory, archive to unpack): the root disk is a directory on
        // `/` of ours.
        let tar = format!("/workspace/{TREE_TAR}");
        // The memory side unpacks the tree from the share into its memory mount.
        let mut sides: Vec<(&'static str, &str, String, &str)> = on_share
            .iter()
            .map(|(n, s)| {
                let unpack = if *n == "memory" { tar.as_str() } else { "" };
                (*n, s.id.as_str(), s.dir.clone(), unpack)
            })
            .collect();
        sides.push((
            "root disk",
            &on_share[0].1.id,
            "/var/tmp/vbench".into(),
            &tar,
        ));
        for (name, id, dir, tar) in &sides {
            let t = Instant::now();
            self.guest_script(id, SETUP, &[dir, tar])
                .with_context(|| format!("set up {name}"))?;
            eprintln!(
                "vfs: {name}: 10,000-file tree warmed in {:.1?}",
                t.elapsed()
            );
        }
        // One warm-up run each, then the measured runs in a rotating order.
        let mut times = Times::new();
        for (name, id, dir, _) in &sides {
            self.vfs_run(name, id, dir, &mut Times::new())?;
        }
        for r in 0..self.runs {
            for k in 0..sides.len() {
                let (name, id, dir, _) = &sides[(r + k) % sides.len()];
                self.vfs_run(name, id, dir, &mut times)?;
            }
        }
        let label = daemon.map(|(b, rust)| {
            format!(
                "{} ({})",
                b.display(),
                if rust {
                    "Rust virtiofsd"
                } else {
                    "QEMU 7.2 C virtiofsd"
                }
            )
        });
        drop(started);
        print_vfs(self.runs, &times, label.as_deref());
        Ok(())
    }
}

fn median(v: &[Duration]) -> Duration {
    crate::median(v.to_vec())
}

/// MiB/s of a 64 MiB transfer.
fn rate(d: Duration) -> f64 {
    64.0 / d.as_secs_f64().max(1e-9)
}

fn print_vfs(runs: usize, t: &Times, virtiofsd: Option<&str>) {
    let row_of = |side: &str, row: &str| -> Option<Duration> {
        t.get(side).and_then(|s| s.get(row)).map(|v| median(v))
    };
    println!(
        "workspace file I/O ({runs} runs, medians, timed in the guest; ours = in-process \
         virtio-fs, host_fs at /workspace):"
    );
    match virtiofsd {
        Some(v) => println!("  virtiofsd: {v}, cache=auto, passthrough"),
        None => println!("  virtiofsd not found: scripts/install-deps.sh --bench"),
    }
    for (row, label, metadata) in ROWS {
        let (Some(o), Some(r)) = (row_of("ours", row), row_of("root disk", row)) else {
            continue;
        };
        let v = row_of("virtiofsd", row);
        let floor = row_of("memory", row);
        let show = |d: Duration| -> String {
            if *metadata {
                crate::ms(d)
            } else {
                format!("{:.1} MiB/s", rate(d))
            }
        };
        println!("  {label}:");
        println!(
            "    ours {} | virtiofsd {} | memory {} | root disk {}",
            show(o),
            v.map(show).unwrap_or_else(|| "not measured".into()),
            floor.map(show).unwrap_or_else(|| "not measured".into()),
            show(r)
        );
        let vs = match v {
            Some(v) => {
                let x = v.as_secs_f64() / o.as_secs_f64();
                format!(
                    "{x:.2}x virtiofsd (target >= 0.8x: {})",
                    crate::met(x >= 0.8)
                )
            }
            None => "virtiofsd not found: scripts/install-deps.sh --bench".into(),
        };
        let slow = o.as_secs_f64() / r.as_secs_f64();
        let root = if *metadata {
            // The memory provider does no host I/O: what virtio-fs itself costs here.
            let floor = floor
                .map(|f| {
                    format!(
                        "; no host I/O (memory) {:.2}x",
                        f.as_secs_f64() / r.as_secs_f64()
                    )
                })
                .unwrap_or_default();
            format!(
                "{slow:.2}x the root disk's time (target <= 2x: {}{floor})",
                crate::met(slow <= 2.0)
            )
        } else {
            format!("{slow:.2}x the root disk's time (no target)")
        };
        println!("    speed {vs}; {root}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PIDs `matchlock list` shows for the bench's sandboxes (QEMU's or the owner's).
    fn listed_pids(bench: &Bench) -> Vec<u32> {
        let o = bench
            .matchlock()
            .arg("list")
            .output()
            .expect("matchlock list");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last()?.parse().ok())
            .collect()
    }

    /// Whether `pid` still runs 15 s from now (`kill` returns once the VM is down; the
    /// owner process exits, and init reaps it, a moment later).
    fn still_alive(pid: u32) -> bool {
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            if t.elapsed() > Duration::from_secs(15) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// A bench that fails once its sandboxes, virtiofsd and the memory side's `matchlock rpc`
    /// are up stops all of them and removes the sandboxes (run as root, like the bench, with
    /// the VM assets the e2e tests use).
    #[test]
    fn a_failure_after_start_stops_every_sandbox_and_helper() {
        let exe = std::env::current_exe().expect("current exe");
        let bin = std::env::var_os("MATCHLOCK_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                exe.parent()
                    .and_then(Path::parent)
                    .expect("target dir")
                    .join("matchlock")
            });
        assert!(bin.is_file(), "build matchlock first: {}", bin.display());
        // In the suite's test directory when there is one (scripts/test.sh sweeps it).
        let tmp = std::env::var_os("MATCHLOCK_TEST_TMP")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let bench = Bench {
            home: tempfile::Builder::new()
                .prefix("ml-bench-test-")
                .tempdir_in(tmp)
                .expect("home"),
            bin,
            runs: 1,
        };
        let seen = std::sync::Mutex::new((Vec::new(), Vec::new()));
        let err = bench
            .vfs_with(&|sides, helpers| {
                let pids = listed_pids(&bench);
                assert_eq!(pids.len(), sides.len(), "every side is listed with a pid");
                *seen.lock().expect("lock") = (pids, helpers.to_vec());
                bail!("forced failure after start")
            })
            .expect_err("the forced failure");
        assert!(format!("{err:#}").contains("forced failure"), "{err:#}");
        let (pids, helpers) = seen.into_inner().expect("lock");
        assert!(!pids.is_empty(), "the check ran");
        assert_eq!(helpers.len(), 2, "virtiofsd and matchlock rpc: {helpers:?}");
        for pid in pids.iter().chain(helpers.iter()) {
            assert!(
                !still_alive(*pid),
                "process {pid} still running after the failure"
            );
        }
        let o = bench
            .matchlock()
            .arg("list")
            .output()
            .expect("matchlock list");
        let left: Vec<_> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect();
        assert!(left.is_empty(), "sandboxes left: {left:?}");
    }
}

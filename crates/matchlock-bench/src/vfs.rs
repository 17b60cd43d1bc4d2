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
//!   upper disk on virtio-blk).
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
//! - `git status` in a committed tree of 5,000 files (50 directories of 100), created by
//!   the guest's own git before the runs, warm (the guest's caches as a developer has them).
//!   5,000, not the 10,000 issue 10 asks for: building a 10,000-file tree and its objects
//!   in the guest ran the server past this host's hard `RLIMIT_NOFILE` (20,000, and no
//!   `CAP_SYS_RESOURCE` to raise it) even with the guest's caches dropped between chunks.
//!
//! virtiofsd: `$VIRTIOFSD`, else `virtiofsd` on `PATH` or in `~/.cargo/bin` (the Rust
//! daemon, `scripts/install-deps.sh --bench`), else Debian's QEMU 7.2 C daemon at
//! `/usr/lib/qemu/virtiofsd`; both with their default `cache=auto` (1 s entry and attr
//! timeouts). Without any, the virtiofsd column says so and the other two are measured.
//!
//! # Limitations
//! Needs root (virtiofsd's sandboxing). The sandboxes run `--privileged` (both alike) so the
//! guest may write `drop_caches`. Both VMs are up during
//! every run, so the idle one costs a little host CPU. The in-guest loop of `date` forks adds
//! a few milliseconds to every row on every side.

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
    ("git", "git status, 5,000-file tree", true),
];

/// Creates the 5,000-file committed tree in `$1/repo` and warms it with one `git status`.
const SETUP: &str = r#"set -e
mkdir -p "$1"; cd "$1"; rm -rf repo scratch; mkdir repo; cd repo
for d in $(seq 0 49); do mkdir d$d; for f in $(seq 0 99); do echo "file $d $f" > d$d/f$f; done; done
sync; echo 2 > /proc/sys/vm/drop_caches
git init -q .
# In chunks with the guest's caches dropped in between: the guest would otherwise keep
# every file and object it touched (20,000+ inodes), and each pins one host descriptor in
# the server (the owner's hard RLIMIT_NOFILE on this host is 20,000, and neither server may
# raise it without CAP_SYS_RESOURCE).
for d in $(seq 0 49); do git add d$d; sync; echo 2 > /proc/sys/vm/drop_caches; done
git -c user.name=bench -c user.email=bench@invalid commit -q -m tree
sync; echo 2 > /proc/sys/vm/drop_caches
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

/// A detached sandbox and, for the virtiofsd side, its daemon; both ended on drop.
struct Side {
    id: String,
    dir: String,
    daemon: Option<Child>,
    bin: PathBuf,
    home: PathBuf,
}

impl Drop for Side {
    fn drop(&mut self) {
        for verb in ["kill", "rm"] {
            let _ = Command::new(&self.bin)
                .env("HOME", &self.home)
                .env("XDG_CACHE_HOME", self.home.join(".cache"))
                .args([verb, &self.id])
                .stdin(Stdio::null())
                .output();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
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
fn start_virtiofsd(bin: &Path, rust: bool, share: &Path, socket: &Path) -> anyhow::Result<Child> {
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
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let t = Instant::now();
    while !socket.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("{} exited before listening: {st}", bin.display());
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not create {}", bin.display(), socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
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

/// Per-side, per-row durations.
type Times = BTreeMap<&'static str, BTreeMap<&'static str, Vec<Duration>>>;

impl Bench {
    fn import_nettest(&self) -> anyhow::Result<()> {
        let path = matchlock_test_support::nettest_image().context("build the nettest image")?;
        let archive = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        self.import(IMAGE, &archive)
    }

    /// `matchlock run -d` with the share at `/workspace`; `knob` = the external server.
    fn start_side(
        &self,
        name: &'static str,
        share: &Path,
        knob: Option<(&Path, Child)>,
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
        let daemon = match knob {
            Some((socket, child)) => {
                c.env(KNOB, socket);
                Some(child)
            }
            None => {
                c.env_remove(KNOB);
                None
            }
        };
        let o = c.output().context("matchlock run -d")?;
        let side = Side {
            id: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            dir: format!("/workspace/{name}"),
            daemon,
            bin: self.bin.clone(),
            home: self.home.path().to_path_buf(),
        };
        if !o.status.success() || side.id.is_empty() {
            bail!(
                "matchlock run -d ({name}) failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        let own = has_own_server(&self.paths().state, &side.id);
        if own == side.daemon.is_some() {
            bail!("side {name}: the sandbox's own virtio-fs server is running = {own}, expected the opposite");
        }
        Ok(side)
    }

    /// Runs `script` with `dir` as `$1` in sandbox `id`; returns its stdout.
    fn guest_script(&self, id: &str, script: &str, dir: &str) -> anyhow::Result<String> {
        let o = self
            .matchlock()
            .args(["exec", id, "sh", "-c", script, "bench", dir])
            .output()
            .context("spawn matchlock exec")?;
        if !o.status.success() {
            bail!(
                "guest script in {dir} failed ({}): {}{}",
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
        let out = self.guest_script(id, RUN, dir)?;
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

    pub(crate) fn vfs(&self) -> anyhow::Result<()> {
        self.import_nettest()?;
        let share = tempfile::Builder::new()
            .prefix("ml-vbench-share-")
            .tempdir_in("/tmp")?;
        let sockdir = tempfile::Builder::new()
            .prefix("ml-vbench-sock-")
            .tempdir_in("/tmp")?;
        let ours = self.start_side("ours", share.path(), None)?;
        let daemon = find_virtiofsd();
        let theirs = match &daemon {
            Some((bin, rust)) => {
                let socket = sockdir.path().join("virtiofsd.sock");
                let child = start_virtiofsd(bin, *rust, share.path(), &socket)?;
                Some(self.start_side("virtiofsd", share.path(), Some((&socket, child)))?)
            }
            None => None,
        };
        // (side, sandbox, directory): the root disk is a directory on `/` of ours.
        let mut sides: Vec<(&'static str, &str, String)> =
            vec![("ours", &ours.id, ours.dir.clone())];
        if let Some(t) = &theirs {
            sides.push(("virtiofsd", &t.id, t.dir.clone()));
        }
        sides.push(("root disk", &ours.id, "/var/tmp/vbench".to_string()));
        for (name, id, dir) in &sides {
            let t = Instant::now();
            self.guest_script(id, SETUP, dir)
                .with_context(|| format!("set up {name}"))?;
            eprintln!(
                "vfs: {name}: 5,000-file tree committed in {:.1?}",
                t.elapsed()
            );
        }
        // One warm-up run each, then the measured runs in a rotating order.
        let mut times = Times::new();
        for (name, id, dir) in &sides {
            self.vfs_run(name, id, dir, &mut Times::new())?;
        }
        for r in 0..self.runs {
            for k in 0..sides.len() {
                let (name, id, dir) = &sides[(r + k) % sides.len()];
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
        drop(theirs);
        drop(ours);
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
        let show = |d: Duration| -> String {
            if *metadata {
                crate::ms(d)
            } else {
                format!("{:.1} MiB/s", rate(d))
            }
        };
        println!("  {label}:");
        println!(
            "    ours {} | virtiofsd {} | root disk {}",
            show(o),
            v.map(show).unwrap_or_else(|| "not measured".into()),
            show(r)
        );
        let vs = match v {
            Some(v) => {
                let x = v.as_secs_f64() / o.as_secs_f64();
                format!(
                    "{x:.2}x virtiofsd (target >= 0.8x: {})",
                    if x >= 0.8 { "met" } else { "NOT met" }
                )
            }
            None => "virtiofsd not found: scripts/install-deps.sh --bench".into(),
        };
        let slow = o.as_secs_f64() / r.as_secs_f64();
        let root = if *metadata {
            format!(
                "{slow:.2}x the root disk's time (target <= 2x: {})",
                if slow <= 2.0 { "met" } else { "NOT met" }
            )
        } else {
            format!("{slow:.2}x the root disk's time (no target)")
        };
        println!("    speed {vs}; {root}");
    }
}

//! `git` in workspaces, end to end (issue 10, "Semantics a real toolchain needs"): a real
//! Debian `git` in the `nettest` image works in a `host_fs` share of an unprivileged owner
//! (the way users run matchlock), the host's own `git` agrees with what the guest did, the
//! files belong to the invoking user, a stale `HEAD.lock` stops a commit the way git expects
//! (O_EXCL create), and the same work in an `overlay` share leaves the host tree untouched.
//!
//! The owner runs as uid 65534 through `setpriv` (like `e2e_workspace.rs`'s unprivileged test),
//! with its own HOME holding copies of the kernel, guest runtime and vsock helper (the
//! defaults live under /root). One VM serves both shares.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{ok, stderr, stdout};

/// The unprivileged user the sandbox owner runs as.
const UID: u32 = 65534;
const IMAGE: &str = "nettest:git";

/// A HOME for an owner running as [`UID`], with the assets it needs copied in.
struct Owner {
    home: tempfile::TempDir,
    path: String,
    kernel: PathBuf,
    guest: PathBuf,
}

fn harness_var(k: &str) -> PathBuf {
    // A bare environment: only its command template is used (no image import).
    let bare = common::TestEnv {
        home: tempfile::tempdir().expect("tmp"),
    };
    let template = bare.cmd();
    template
        .get_envs()
        .find(|(n, _)| *n == k)
        .and_then(|(_, v)| v)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("harness sets {k}"))
}

fn which(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let home = std::env::var("HOME").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain([Path::new(&home).join(".cargo/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found in PATH or ~/.cargo/bin"))
}

impl Owner {
    fn new() -> Owner {
        // Directly in /tmp: the suite's MATCHLOCK_TEST_TMP is a 0700 root directory the
        // owner's user cannot enter.
        let home = tempfile::Builder::new()
            .prefix("ml-git-owner-")
            .tempdir_in("/tmp")
            .expect("owner home");
        let h = home.path();
        std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let kernel = h.join("vmlinux");
        let guest = h.join("matchlock-guest");
        std::fs::copy(harness_var("MATCHLOCK_KERNEL"), &kernel).expect("kernel");
        std::fs::copy(harness_var("MATCHLOCK_GUEST_INIT"), &guest).expect("guest");
        let bin = h.join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::copy(which("vhost-device-vsock"), bin.join("vhost-device-vsock")).expect("vsock");
        let owner = Owner {
            path: format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
            home,
            kernel,
            guest,
        };
        owner.chown(owner.home.path());
        owner
    }

    /// Gives `p` (recursively) to [`UID`].
    fn chown(&self, p: &Path) {
        ok(&Command::new("chown")
            .args(["-R", &format!("{UID}:{UID}")])
            .arg(p)
            .output()
            .expect("chown"));
    }

    /// `program args` run as [`UID`] with this owner's environment only.
    fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let h = self.home.path();
        let mut c = Command::new("setpriv");
        c.args([
            format!("--reuid={UID}"),
            format!("--regid={UID}"),
            "--clear-groups".to_string(),
            "--".to_string(),
            program.to_string(),
        ])
        .args(args)
        .env_clear()
        .env("HOME", h)
        .env("XDG_CACHE_HOME", h.join(".cache"))
        .env("PATH", &self.path)
        .env("MATCHLOCK_KERNEL", &self.kernel)
        .env("MATCHLOCK_GUEST_INIT", &self.guest)
        .env("MATCHLOCK_QUIET_ACCEL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null());
        c
    }

    fn ml(&self, args: &[&str]) -> Output {
        self.cmd(env!("CARGO_BIN_EXE_matchlock"), args)
            .output()
            .expect("spawn matchlock")
    }

    fn import_nettest(&self) {
        let archive = matchlock_test_support::nettest_image().expect("nettest image");
        let file = std::fs::File::open(&archive).expect("open the nettest archive");
        let out = self
            .cmd(env!("CARGO_BIN_EXE_matchlock"), &["image", "import", IMAGE])
            .stdin(file)
            .output()
            .expect("import");
        ok(&out);
    }

    /// `sh -c script` in sandbox `id`; asserts success, returns stdout.
    #[track_caller]
    fn sh(&self, id: &str, script: &str) -> String {
        ok(&self.ml(&["exec", id, "--", "sh", "-c", script]))
    }

    /// The host's git, as the owner, in `dir`.
    #[track_caller]
    fn host_git(&self, dir: &Path, args: &[&str]) -> String {
        let d = dir.to_str().expect("utf8");
        let mut full = vec!["-C", d];
        full.extend_from_slice(args);
        ok(&self.cmd("git", &full).output().expect("host git"))
    }
}

/// Stops the sandbox when dropped (also when an assertion fails).
struct Running<'a> {
    owner: &'a Owner,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self.owner.ml(&["kill", &self.id]);
        let _ = matchlock_test_support::wait_until(
            std::time::Duration::from_secs(30),
            "sandbox stopped",
            || !stdout(&self.owner.ml(&["list", "--running"])).contains(&self.id),
        );
        let _ = self.owner.ml(&["rm", &self.id]);
    }
}

/// Every entry under `root` (not following symlinks): path -> (mode, size, mtime, content).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let data = if m.is_file() {
                std::fs::read(&p).expect("read")
            } else {
                Vec::new()
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.insert(p, (m.mode(), m.size(), m.mtime(), data));
        }
    }
    out
}

/// The git work the guest does in `dir` (a fresh directory or an existing repository): two
/// commits, the second renaming and deleting files, then a repack; prints the log.
fn git_sequence(dir: &str) -> String {
    format!(
        "set -e; cd {dir}; git init -q -b main; \
         git config user.email guest@example.test; git config user.name guest; \
         mkdir -p src/nested; printf 'one\\n' > README; printf 'fn main() {{}}\\n' > src/main.rs; \
         printf 'deep\\n' > src/nested/deep.txt; printf 'gone\\n' > old.txt; \
         git add -A; git commit -q -m first; \
         test -z \"$(git status --porcelain)\"; \
         git mv README README.md; git rm -q old.txt; printf 'more\\n' >> src/main.rs; \
         git commit -q -a -m second; \
         test -z \"$(git status --porcelain)\"; \
         git gc -q; git fsck --full; \
         echo LOG; git log --format=%H:%s; echo FILES; git ls-files"
    )
}

/// `(log lines, tracked files)` from [`git_sequence`]'s output.
fn log_and_files(out: &str) -> (Vec<String>, Vec<String>) {
    let after_log = out.split("LOG\n").nth(1).expect("LOG marker");
    let mut parts = after_log.split("FILES\n");
    let log = parts
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let files = parts
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    (log, files)
}

#[test]
fn git_in_host_fs_and_overlay_workspaces_of_an_unprivileged_owner() {
    let owner = Owner::new();
    owner.import_nettest();
    let tmp = tempfile::tempdir_in(owner.home.path()).expect("tmp");
    let repo = tmp.path().join("repo");
    let ov = tmp.path().join("ov");
    std::fs::create_dir_all(&repo).expect("repo");
    std::fs::create_dir_all(&ov).expect("ov");
    owner.chown(tmp.path());
    // The overlay's lower directory: a repository the host made, with one commit.
    owner.host_git(&ov, &["init", "-q", "-b", "main"]);
    std::fs::write(ov.join("host.txt"), "from the host\n").expect("host.txt");
    owner.chown(&ov);
    owner.host_git(&ov, &["add", "-A"]);
    owner.host_git(
        &ov,
        &[
            "-c",
            "user.email=h@example.test",
            "-c",
            "user.name=host",
            "commit",
            "-q",
            "-m",
            "host",
        ],
    );
    let host_log = owner.host_git(&ov, &["log", "--format=%H:%s"]);
    let before = snapshot(&ov);

    let v_repo = format!("{}:/workspace/repo:host_fs", repo.display());
    let v_ov = format!("{}:/workspace/ov", ov.display());
    let started = owner.ml(&[
        "run",
        "--image",
        IMAGE,
        "-d",
        "--no-network",
        "--workspace",
        "/workspace",
        "-v",
        &v_repo,
        "-v",
        &v_ov,
    ]);
    let id = ok(&started).trim().to_string();
    assert!(id.starts_with("vm-"), "{id:?}: {}", stderr(&started));
    let _running = Running {
        owner: &owner,
        id: id.clone(),
    };

    // host_fs: the guest's root works in the owner's files as its own.
    let t = std::time::Instant::now();
    let out = owner.sh(&id, &git_sequence("/workspace/repo"));
    eprintln!("git sequence in host_fs: {:?}", t.elapsed());
    let (guest_log, guest_files) = log_and_files(&out);
    assert_eq!(guest_log.len(), 2, "{out}");
    assert!(
        guest_log[0].ends_with(":second") && guest_log[1].ends_with(":first"),
        "{out}"
    );
    assert_eq!(
        guest_files,
        ["README.md", "src/main.rs", "src/nested/deep.txt"],
        "{out}"
    );

    // The host's git sees the same repository, intact and clean.
    let fsck = owner
        .cmd(
            "git",
            &[
                "-C",
                repo.to_str().expect("utf8"),
                "fsck",
                "--full",
                "--strict",
            ],
        )
        .output()
        .expect("fsck");
    assert!(
        fsck.status.success(),
        "host fsck: {}{}",
        stdout(&fsck),
        stderr(&fsck)
    );
    let host = owner.host_git(&repo, &["log", "--format=%H:%s"]);
    assert_eq!(
        host.lines().collect::<Vec<_>>(),
        guest_log,
        "host and guest logs differ"
    );
    assert_eq!(owner.host_git(&repo, &["status", "--porcelain"]), "");
    assert_eq!(
        owner.host_git(&repo, &["show", "HEAD:src/main.rs"]),
        "fn main() {}\nmore\n"
    );
    assert!(!repo.join("old.txt").exists() && repo.join("README.md").is_file());
    assert!(
        std::fs::read_dir(repo.join(".git/objects/pack"))
            .expect("pack dir")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".pack")),
        "git gc wrote no pack"
    );
    // Every file git made belongs to the invoking user, none to root.
    for (p, _) in snapshot(&repo) {
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        assert_eq!((m.uid(), m.gid()), (UID, UID), "{} owner", p.display());
    }

    // A stale HEAD.lock (a "crashed" git) stops the next commit with git's message; once it
    // is removed the commit succeeds. Reference scenario 91: a lock renamed over HEAD.
    let locked = owner.ml(&[
        "exec", &id, "--", "sh", "-c",
        "cd /workspace/repo && : > .git/HEAD.lock && echo 3 >> README.md && git commit -q -a -m third",
    ]);
    assert!(
        !locked.status.success(),
        "commit succeeded over a stale HEAD.lock"
    );
    let err = stderr(&locked);
    assert!(
        err.contains("Unable to create '/workspace/repo/.git/HEAD.lock': File exists"),
        "{err}"
    );
    let out = owner.sh(
        &id,
        "cd /workspace/repo && rm .git/HEAD.lock && git commit -q -a -m third && \
         git log -1 --format=%s && printf 'ref: refs/heads/main\\n' > .git/HEAD.lock && \
         mv .git/HEAD.lock .git/HEAD && cat .git/HEAD && git status --porcelain",
    );
    assert_eq!(out, "third\nref: refs/heads/main\n");
    assert_eq!(
        owner.host_git(&repo, &["log", "-1", "--format=%s"]),
        "third\n"
    );

    // overlay: the same work on top of the host's repository; the host tree is untouched.
    let out = owner.sh(
        &id,
        // The overlay swaps the owner's ids with root like host_fs, so the guest's git
        // accepts the owner's repository without safe.directory.
        &git_sequence("/workspace/ov"),
    );
    let (ov_log, ov_files) = log_and_files(&out);
    assert_eq!(ov_log.len(), 3, "{out}");
    assert_eq!(ov_log[2], host_log.trim(), "{out}");
    assert!(ov_files.contains(&"host.txt".to_string()), "{out}");
    assert_eq!(
        snapshot(&ov),
        before,
        "the overlay changed the host directory"
    );
    assert_eq!(owner.host_git(&ov, &["log", "--format=%H:%s"]), host_log);
}

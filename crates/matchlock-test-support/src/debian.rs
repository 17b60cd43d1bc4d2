//! The network test image (`nettest`): a minimal Debian root with real clients (curl with
//! OpenSSL, python3 with `ssl`/`socket`/`http.client`/`urllib`, a system CA bundle, `getent`,
//! dash as `/bin/sh`, busybox for `ip`/`ping`/`nslookup`, git for the workspace tests, python3-h2 for
//! WebSocket over HTTP/2), built offline from the host's
//! configured Debian mirror and cached as a `docker save` archive.
//!
//! # Design
//! - The package set is resolved by apt itself: `apt-get install --simulate` against an empty
//!   dpkg status gives the dependency closure a fresh system would install (alternatives and
//!   virtual packages decided by apt, not by us). The exact `name=version` list, minus
//!   [`EXCLUDED`] (package tools no test runs), keys the cache, so a security update on the
//!   mirror builds a new image and an unchanged one is built once per machine.
//! - The `.deb`s come from `apt-get download` (no root, no chroot) and are unpacked with
//!   `dpkg-deb --fsys-tarfile` into one in-memory layer: faster and more predictable than
//!   `debootstrap`, which configures every package in a chroot. Paths are merged-`/usr` like a
//!   bookworm install (`bin/x` becomes `usr/bin/x`; `/bin` is a symlink).
//! - Maintainer scripts are not run; what they would have produced and the tests need is
//!   written here: `/etc/passwd`/`group`, `/etc/nsswitch.conf`, and the system bundle
//!   `/etc/ssl/certs/ca-certificates.crt` (the Mozilla certificates concatenated, as
//!   `update-ca-certificates` does). No `ld.so.cache` is needed: Debian's loader searches the
//!   multiarch directories by default.
//! - The standard library is byte-compiled at build time by the image's own python (run with
//!   the image's own loader and libraries from a scratch copy of the tree), as
//!   `unchecked-hash` `.pyc` files: otherwise every sandbox would compile what it imports on
//!   first use, which costs seconds under TCG.
//! - Documentation, man pages, locales, lintian data, glibc's iconv modules (nothing in the
//!   image uses `iconv`) and python's `help()` texts are dropped to keep the image small.
//!
//! # Limitations
//! - Needs a Debian-family host with `apt-get` and `dpkg-deb` and a reachable mirror for the
//!   first build; the image has the host's architecture and release.
//! - The whole image is held in memory while it is built (about 60 MB).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::archive::{ConfigSpec, Entry, ImageSpec, Kind};

/// What the image is asked to hold (apt adds the dependencies).
pub const NETTEST_PACKAGES: &[&str] = &[
    "dash",
    "coreutils",
    "libc-bin",
    "curl",
    "python3",
    "ca-certificates",
    "busybox",
    "git",
    // HTTP/2 client for the WebSocket-over-h2 tests (pure Python: h2, hpack, hyperframe).
    "python3-h2",
];

/// Packages apt pulls in that nothing in a test sandbox runs (package management).
/// Perl is only used by git's scripted porcelain (`add -i`, `send-email`); the commands the
/// workspace tests run (`init`, `add`, `commit`, `status`, `log`, `fsck`) are C.
const EXCLUDED: &[&str] = &[
    "dpkg",
    "debconf",
    "tar",
    "perl-base",
    "perl",
    "perl-modules-5.36",
    "libperl5.36",
    "liberror-perl",
    "git-man",
];

/// Path prefixes (after the `/usr` merge) dropped from the image.
const STRIPPED: &[&str] = &[
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/locale/",
    "usr/share/lintian/",
    "usr/share/bug/",
    "usr/share/doc-base/",
    "usr/share/bash-completion/",
    "usr/lib/x86_64-linux-gnu/gconv/",
    "usr/lib/python3.11/pydoc_data/",
];

/// Bumped whenever the way the image is put together changes (invalidates the cache).
const RECIPE: &str = "nettest-recipe-4";

/// Byte-compiles the directory `argv[1]` as if it were at `argv[2]`.
const COMPILE_PY: &str = "import compileall, py_compile, sys\n\
compileall.compile_dir(sys.argv[1], ddir=sys.argv[2], quiet=2, workers=2, force=True,\n\
    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
app:x:1000:1000:app:/home/app:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:app\nnogroup:x:65534:\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
networks: files\nprotocols: files\nservices: files\n";
const OS_RELEASE: &str =
    "NAME=\"Matchlock network test image\"\nID=matchlock-nettest\nID_LIKE=debian\n";

/// Why the test image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DebianImageError {
    #[error("running {program} (a Debian host with apt-get and dpkg-deb is needed)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("apt could not resolve the test image's packages (empty package lists? run `apt-get update`): {stderr}")]
    Resolve { stderr: String },
    #[error("apt resolved no packages for {0:?}")]
    EmptyResolution(Vec<String>),
    #[error("apt-get download left no .deb for {0}")]
    MissingDeb(String),
    #[error("reading the data of {deb}")]
    ReadDeb {
        deb: String,
        #[source]
        source: io::Error,
    },
    #[error("the image has no {0} (a package changed its layout?)")]
    MissingPath(&'static str),
    #[error("creating the cache directory {0}")]
    CacheDir(PathBuf, #[source] io::Error),
    #[error("locking {0}")]
    Lock(PathBuf, #[source] io::Error),
    #[error("creating a download directory in {0}")]
    TempDir(PathBuf, #[source] io::Error),
    #[error("listing the downloaded packages in {0}")]
    ListDebs(PathBuf, #[source] io::Error),
    #[error("writing the scratch tree at {0}")]
    Scratch(PathBuf, #[source] io::Error),
    #[error("reading the compiled python files under {0}")]
    ReadPyc(PathBuf, #[source] io::Error),
    #[error("writing the image to {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// One resolved package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// Where built test images are cached: `$XDG_CACHE_HOME/matchlock/test-images` or
/// `~/.cache/matchlock/test-images`.
pub fn test_image_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("matchlock/test-images")
}

/// The cached `nettest` archive (`docker save`, tagged `nettest:latest`), built on first use.
/// Concurrent callers (parallel test binaries) wait for one build.
pub fn nettest_image() -> Result<PathBuf, DebianImageError> {
    nettest_image_in(&test_image_cache_dir())
}

/// As [`nettest_image`], caching in `dir`.
pub fn nettest_image_in(dir: &Path) -> Result<PathBuf, DebianImageError> {
    let packages = resolve(NETTEST_PACKAGES)?;
    let path = dir.join(format!("nettest-{}.tar", cache_key(&packages)));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| DebianImageError::CacheDir(dir.to_owned(), e))?;
    let lock_path = dir.join(".nettest.lock");
    let lock = std::fs::File::create(&lock_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|e| DebianImageError::Lock(lock_path.clone(), e))?;
    if !path.is_file() {
        let started = std::time::Instant::now();
        let spec = build_spec(dir, &packages)?;
        write_atomically(&path, &spec.docker_save())?;
        remove_stale(dir, &path);
        eprintln!(
            "built the nettest image ({} packages) in {:.1?}: {}",
            packages.len(),
            started.elapsed(),
            path.display()
        );
    }
    drop(lock);
    Ok(path)
}

/// Removes the archives of earlier package sets (best effort: a stale file only costs disk).
fn remove_stale(dir: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("nettest-") && name.ends_with(".tar") && e.path() != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DebianImageError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DebianImageError::Write(path.to_owned(), e)
    })
}

fn cache_key(packages: &[Package]) -> String {
    let mut h = Sha256::new();
    h.update(RECIPE);
    for p in packages {
        h.update(format!("\n{}={}", p.name, p.version));
    }
    hex::encode(&h.finalize()[..8])
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, DebianImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|source| DebianImageError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(DebianImageError::Failed {
            command: program,
            status: out.status,
            stderr: stderr.chars().take(2000).collect(),
        });
    }
    Ok(out.stdout)
}

/// The closure apt would install on an empty system for `wanted`, minus [`EXCLUDED`], sorted.
pub fn resolve(wanted: &[&str]) -> Result<Vec<Package>, DebianImageError> {
    let out = run(Command::new("apt-get")
        .args(["install", "--simulate", "--no-install-recommends", "-qq"])
        .args([
            "-o",
            "Dir::State::status=/dev/null",
            "-o",
            "Debug::NoLocking=1",
        ])
        .args(wanted)
        .env("LC_ALL", "C"))
    .map_err(|e| match e {
        DebianImageError::Failed { stderr, .. } => DebianImageError::Resolve { stderr },
        other => other,
    })?;
    let mut packages = parse_simulation(&String::from_utf8_lossy(&out));
    packages.retain(|p| !EXCLUDED.contains(&p.name.as_str()));
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    if packages.is_empty() {
        return Err(DebianImageError::EmptyResolution(
            wanted.iter().map(|s| s.to_string()).collect(),
        ));
    }
    Ok(packages)
}

/// `Inst <name>[:arch] (<version> <release> [<arch>])` lines of `apt-get --simulate`.
fn parse_simulation(text: &str) -> Vec<Package> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Inst ")?;
            let mut words = rest.split_whitespace();
            let name = words.next()?.split(':').next()?.to_owned();
            let version = words.next()?.strip_prefix('(')?.to_owned();
            Some(Package { name, version })
        })
        .collect()
}

fn build_spec(dir: &Path, packages: &[Package]) -> Result<ImageSpec, DebianImageError> {
    let work = tempfile::Builder::new()
        .prefix(".nettest-build-")
        .tempdir_in(dir)
        .map_err(|e| DebianImageError::TempDir(dir.to_owned(), e))?;
    run(Command::new("apt-get")
        .args(["download", "-qq"])
        .args(packages.iter().map(|p| format!("{}={}", p.name, p.version)))
        .current_dir(work.path()))?;
    let debs = list_debs(work.path())?;
    let mut tree: BTreeMap<String, Entry> = BTreeMap::new();
    for p in packages {
        let deb = debs
            .iter()
            .find(|d| deb_package_name(d) == Some(p.name.as_str()))
            .ok_or_else(|| DebianImageError::MissingDeb(p.name.clone()))?;
        let data = run(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb))?;
        add_deb(&mut tree, &data).map_err(|source| DebianImageError::ReadDeb {
            deb: p.name.clone(),
            source,
        })?;
    }
    for needed in [
        "usr/bin/sh",
        "usr/bin/curl",
        "usr/bin/python3",
        "usr/bin/getent",
        "usr/bin/git",
    ] {
        if !tree.contains_key(needed) {
            return Err(DebianImageError::MissingPath(needed));
        }
    }
    compile_python(&mut tree, work.path())?;
    let bundle = ca_bundle(&tree);
    if bundle.is_empty() {
        return Err(DebianImageError::MissingPath(
            "usr/share/ca-certificates/mozilla/*.crt",
        ));
    }
    Ok(ImageSpec {
        layers: vec![tree.into_values().collect(), etc_layer(bundle)],
        config: ConfigSpec {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: vec!["/bin/sh".to_owned()],
            ..Default::default()
        },
        repo_tag: Some("nettest:latest".to_owned()),
        ..Default::default()
    })
}

fn list_debs(dir: &Path) -> Result<Vec<PathBuf>, DebianImageError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DebianImageError::ListDebs(dir.to_owned(), e))?;
    Ok(rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect())
}

/// `name_version_arch.deb` -> `name`.
fn deb_package_name(path: &Path) -> Option<&str> {
    path.file_name()?.to_str()?.split('_').next()
}

/// `./bin/ls` -> `usr/bin/ls`; `None` for the root and for stripped paths.
fn merged_path(raw: &str) -> Option<String> {
    let p = raw.trim_start_matches("./").trim_start_matches('/');
    let p = p.trim_end_matches('/');
    if p.is_empty() || p == "." {
        return None;
    }
    let (first, rest) = p.split_once('/').unwrap_or((p, ""));
    let merged = if matches!(first, "bin" | "sbin" | "lib" | "lib64" | "lib32" | "libx32") {
        if rest.is_empty() {
            format!("usr/{first}")
        } else {
            format!("usr/{first}/{rest}")
        }
    } else {
        p.to_owned()
    };
    let probe = format!("{merged}/");
    (!STRIPPED.iter().any(|s| probe.starts_with(s))).then_some(merged)
}

/// Adds the entries of one package's data tar to `tree` (later packages win on conflicts).
fn add_deb(tree: &mut BTreeMap<String, Entry>, data: &[u8]) -> io::Result<()> {
    let mut archive = tar::Archive::new(data);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(path) = merged_path(&raw) else {
            continue;
        };
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let (uid, gid, mtime) = (header.uid()?, header.gid()?, header.mtime()?);
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let kind = match (header.entry_type(), link) {
            (tar::EntryType::Directory, _) => Kind::Dir,
            (tar::EntryType::Symlink, Some(target)) => Kind::Symlink(target),
            (tar::EntryType::Link, Some(target)) => match merged_path(&target) {
                Some(t) => Kind::HardLink(t),
                None => continue,
            },
            (tar::EntryType::Regular, _) => {
                let mut content = Vec::new();
                entry.read_to_end(&mut content)?;
                Kind::File(content)
            }
            _ => continue,
        };
        if matches!(kind, Kind::Dir) && tree.contains_key(&path) {
            continue;
        }
        let e = Entry {
            path: path.clone(),
            kind,
            mode,
            uid,
            gid,
            mtime,
            xattrs: Vec::new(),
        };
        tree.insert(path, e);
    }
    Ok(())
}

/// Writes the files, directories and symlinks of `tree` under `root` (hard links as copies),
/// skipping any entry below a symlink or with a `..` component, so nothing lands outside it.
fn write_tree(tree: &BTreeMap<String, Entry>, root: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (path, e) in tree {
        // Never write through a symlink of the tree (it could point outside `root`).
        let through_link = path.match_indices('/').any(|(i, _)| {
            matches!(
                tree.get(&path[..i]).map(|p| &p.kind),
                Some(Kind::Symlink(_))
            )
        });
        if through_link || path.split('/').any(|c| c == ".." || c == ".") {
            continue;
        }
        let dest = root.join(path);
        match &e.kind {
            Kind::Dir => std::fs::create_dir_all(&dest)?,
            Kind::File(content) => {
                std::fs::write(&dest, content)?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(e.mode))?;
            }
            Kind::Symlink(target) => std::os::unix::fs::symlink(target, &dest)?,
            Kind::HardLink(target) => {
                if let Some(Entry {
                    kind: Kind::File(content),
                    ..
                }) = tree.get(target)
                {
                    std::fs::write(&dest, content)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Adds `__pycache__` files for the python standard library to `tree`.
fn compile_python(tree: &mut BTreeMap<String, Entry>, work: &Path) -> Result<(), DebianImageError> {
    let python = match tree.get("usr/bin/python3").map(|e| &e.kind) {
        Some(Kind::Symlink(t)) => t.rsplit('/').next().unwrap_or(t).to_owned(),
        _ => {
            return Err(DebianImageError::MissingPath(
                "usr/bin/python3 -> python3.X",
            ))
        }
    };
    let loader = tree
        .iter()
        .find(|(p, e)| {
            p.starts_with("usr/lib/")
                && p.rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with("ld-linux"))
                && matches!(e.kind, Kind::File(_))
        })
        .map(|(p, _)| p.clone())
        .ok_or(DebianImageError::MissingPath("usr/lib/*/ld-linux*"))?;
    let libdir = loader
        .rsplit_once('/')
        .map_or("usr/lib", |(d, _)| d)
        .to_owned();
    let root = work.join("root");
    write_tree(tree, &root).map_err(|e| DebianImageError::Scratch(root.clone(), e))?;
    let stdlib = format!("usr/lib/{python}");
    run(Command::new(root.join(&loader))
        .arg("--library-path")
        .arg(root.join(&libdir))
        .arg(root.join("usr/bin").join(&python))
        .args(["-s", "-B", "-c", COMPILE_PY])
        .arg(root.join(&stdlib))
        .arg(format!("/{stdlib}"))
        .env_clear()
        .env("PYTHONHOME", root.join("usr"))
        .env("LC_ALL", "C"))?;
    add_pycache(tree, &root, &stdlib)
        .map_err(|e| DebianImageError::ReadPyc(root.join(&stdlib), e))?;
    // Only unchecked-hash files: a timestamp-based one (as python writes for what it
    // imports at start-up) would be stale in the image and recompiled in every guest.
    let unchecked =
        |e: &Entry| matches!(&e.kind, Kind::File(b) if b.get(4..8) == Some(&[1, 0, 0, 0]));
    let pycs: Vec<&Entry> = tree.values().filter(|e| e.path.ends_with(".pyc")).collect();
    if !pycs.iter().all(|e| unchecked(e)) || !tree.keys().any(|p| p.contains("/__pycache__/ssl.")) {
        return Err(DebianImageError::MissingPath(
            "unchecked-hash .pyc files for ssl and the rest",
        ));
    }
    Ok(())
}

/// Adds every `__pycache__` directory under `root/dir` (and its files) to `tree`.
fn add_pycache(tree: &mut BTreeMap<String, Entry>, root: &Path, dir: &str) -> io::Result<()> {
    for entry in std::fs::read_dir(root.join(dir))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{dir}/{name}");
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if name == "__pycache__" {
            tree.insert(rel.clone(), Entry::dir(&rel));
            for pyc in std::fs::read_dir(entry.path())? {
                let pyc = pyc?;
                let file = format!("{rel}/{}", pyc.file_name().to_string_lossy());
                tree.insert(file.clone(), Entry::file(&file, std::fs::read(pyc.path())?));
            }
        } else {
            add_pycache(tree, root, &rel)?;
        }
    }
    Ok(())
}

/// The Mozilla certificates in path order, as `update-ca-certificates` concatenates them.
fn ca_bundle(tree: &BTreeMap<String, Entry>) -> Vec<u8> {
    let mut bundle = Vec::new();
    for (path, e) in tree.range("usr/share/ca-certificates/".to_owned()..) {
        if !path.starts_with("usr/share/ca-certificates/") {
            break;
        }
        if let (true, Kind::File(pem)) = (path.ends_with(".crt"), &e.kind) {
            bundle.extend_from_slice(pem);
            if !pem.ends_with(b"\n") {
                bundle.push(b'\n');
            }
        }
    }
    bundle
}

/// The merged-`/usr` symlinks and what maintainer scripts would have written.
fn etc_layer(bundle: Vec<u8>) -> Vec<Entry> {
    vec![
        Entry::symlink("bin", "usr/bin"),
        Entry::symlink("sbin", "usr/sbin"),
        Entry::symlink("lib", "usr/lib"),
        Entry::symlink("lib64", "usr/lib64"),
        Entry::dir("etc"),
        Entry::file("etc/passwd", PASSWD),
        Entry::file("etc/group", GROUP),
        Entry::file("etc/nsswitch.conf", NSSWITCH),
        Entry::file("etc/os-release", OS_RELEASE),
        Entry::file("etc/hostname", "matchlock\n"),
        Entry::dir("etc/ssl"),
        Entry::dir("etc/ssl/certs"),
        Entry::file("etc/ssl/certs/ca-certificates.crt", bundle),
        Entry::dir("tmp").mode(0o1777),
        Entry::dir("root").mode(0o700),
        Entry::dir("home"),
        Entry::dir("home/app").owner(1000, 1000),
        Entry::dir("var"),
        Entry::dir("var/tmp").mode(0o1777),
        Entry::dir("dev"),
        Entry::dir("proc"),
        Entry::dir("sys"),
        Entry::dir("run"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_merged_and_stripped() {
        assert_eq!(merged_path("./bin/ls").as_deref(), Some("usr/bin/ls"));
        assert_eq!(merged_path("./lib64/").as_deref(), Some("usr/lib64"));
        assert_eq!(
            merged_path("./usr/bin/curl").as_deref(),
            Some("usr/bin/curl")
        );
        assert_eq!(merged_path("./etc/ssl/").as_deref(), Some("etc/ssl"));
        assert_eq!(merged_path("./"), None);
        assert_eq!(merged_path("./usr/share/doc/curl/copyright"), None);
        assert_eq!(merged_path("./usr/share/doc"), None);
        assert_eq!(
            merged_path("./usr/share/docker").as_deref(),
            Some("usr/share/docker")
        );
    }

    #[test]
    fn scratch_tree_never_writes_through_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let mut tree = BTreeMap::new();
        for e in [
            Entry::dir("usr"),
            Entry::file("usr/ok", "fine"),
            Entry::symlink("usr/escape", &outside.path().to_string_lossy()),
            Entry::file("usr/escape/planted", "bad"),
            Entry::file("usr/../planted", "bad"),
        ] {
            tree.insert(e.path.clone(), e);
        }
        write_tree(&tree, dir.path()).expect("write tree");
        assert!(dir.path().join("usr/ok").is_file());
        assert!(!outside.path().join("planted").exists());
        assert!(!dir.path().join("planted").exists());
    }

    #[test]
    fn simulation_output_is_parsed() {
        let text = "Inst libc6 (2.36-9+deb12u14 Debian:12.12/stable [amd64])\n\
                    Conf libc6 (2.36-9+deb12u14 Debian:12.12/stable [amd64])\n\
                    Inst curl:amd64 (7.88.1-10+deb12u15 Debian:12.12/stable [amd64])\n";
        assert_eq!(
            parse_simulation(text),
            vec![
                Package {
                    name: "libc6".into(),
                    version: "2.36-9+deb12u14".into()
                },
                Package {
                    name: "curl".into(),
                    version: "7.88.1-10+deb12u15".into()
                }
            ]
        );
    }

    #[test]
    fn apt_resolves_the_closure_without_package_tools() {
        let packages = resolve(NETTEST_PACKAGES).expect("apt-get --simulate on a Debian host");
        let names: Vec<&str> = packages.iter().map(|p| p.name.as_str()).collect();
        for want in [
            "curl",
            "python3",
            "libc6",
            "ca-certificates",
            "dash",
            "libssl3",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for unwanted in EXCLUDED {
            assert!(!names.contains(unwanted), "{unwanted} in {names:?}");
        }
        let err = resolve(&["matchlock-no-such-package"]).expect_err("unknown package");
        assert!(matches!(err, DebianImageError::Resolve { .. }), "{err:?}");
    }

    #[test]
    fn cache_key_follows_versions() {
        let a = vec![Package {
            name: "curl".into(),
            version: "1".into(),
        }];
        let b = vec![Package {
            name: "curl".into(),
            version: "2".into(),
        }];
        assert_ne!(cache_key(&a), cache_key(&b));
        assert_eq!(cache_key(&a), cache_key(&a.clone()));
    }
}

//! `matchlock-bench pull`: registry pull + conversion to a squashfs rootfs of a 4-layer gzip
//! image from a local `docker-registry`, against a baseline built only from independent
//! tools: `skopeo copy` to an OCI layout, then every layer unpacked in order with GNU `tar`
//! (whiteouts and opaque directories applied by this file, not by matchlock's code), then
//! the tree packed into squashfs by `tar2sqfs`.
//!
//! # Design
//! - The two sides run back to back, interleaved, each from a cold store (fresh HOME and
//!   directories), and the medians are compared.
//! - Sizes are measured, not assumed: compressed bytes are the layer sizes in the manifest
//!   skopeo fetched, unpacked bytes are the regular files of the baseline's tree, and both
//!   squashfs files are measured after each run. Both squashfs files must hold the same
//!   paths (read back with `sqfs2tar`), so the two sides provably did the same work.
//! - The baseline's `tar2sqfs` uses the compressor and job count matchlock uses (zstd, one
//!   job per CPU), so the comparison is of the pipelines, not of compression settings.
//!
//! # Limitations
//! - Loopback registry only: measures the client and the conversion, not a WAN.
//! - The baseline trusts the image (it is generated here): its whiteout handling refuses
//!   `..` components but is not a hardened unpacker.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use matchlock_test_support::{Entry, ImageSpec, Registry};

use crate::{median, ms, Bench};

/// Text-like pseudo-random data (about 2:1 under gzip, like typical binaries/packages).
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 16) as u8
        })
        .collect()
}

/// Four layers of 25 files of 1 MB; the upper layers delete and replace a few files of the
/// lower ones (whiteouts) and one makes a directory opaque, so both unpackers have work.
fn big_image() -> ImageSpec {
    let layers = (0..4u64)
        .map(|l| {
            let mut entries = vec![Entry::dir(&format!("l{l}"))];
            for f in 0..25u64 {
                entries.push(Entry::file(
                    &format!("l{l}/f{f}"),
                    filler(l * 100 + f + 1, 1_000_000),
                ));
            }
            if l > 0 {
                entries.push(Entry::file(&format!("l{}/.wh.f0", l - 1), Vec::new()));
            }
            if l == 3 {
                entries.push(Entry::dir("l0"));
                entries.push(Entry::file("l0/.wh..wh..opq", Vec::new()));
                entries.push(Entry::file("l0/new", b"replaced\n".to_vec()));
            }
            entries
        })
        .collect();
    let mut spec = ImageSpec::new(layers);
    spec.gzip = true;
    spec
}

fn timed(c: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    run(c)?;
    Ok(start.elapsed())
}

fn run(c: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = c.stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed: {}",
            c.get_program(),
            c.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}

fn blob_path(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("bad digest {digest:?}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// The layer blobs of the single image in an OCI layout, bottom first, with their sizes.
fn layout_layers(layout: &Path) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let index = json(&layout.join("index.json"))?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?;
    let manifest = json(&blob_path(layout, digest)?)?;
    manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
        .iter()
        .map(|l| {
            let d = l["digest"].as_str().context("layer without digest")?;
            let size = l["size"].as_u64().context("layer without size")?;
            Ok((blob_path(layout, d)?, size))
        })
        .collect()
}

/// Applies the whiteouts of one layer (listed by `tar -t`) to `root`, before the layer is
/// extracted: `.wh.NAME` deletes NAME, `.wh..wh..opq` empties its directory.
fn apply_whiteouts(root: &Path, layer: &Path) -> anyhow::Result<()> {
    let listing = run(Command::new("tar").arg("-tf").arg(layer))?;
    for name in String::from_utf8_lossy(&listing).lines() {
        let name = name.trim_start_matches("./").trim_end_matches('/');
        let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
        let Some(target) = base.strip_prefix(".wh.") else {
            continue;
        };
        if name.split('/').any(|c| c == "..") {
            bail!("layer entry {name:?} leaves the root");
        }
        let dir = root.join(dir);
        if target == ".wh..opq" {
            for e in std::fs::read_dir(&dir).into_iter().flatten() {
                remove(&e?.path())?;
            }
        } else {
            remove(&dir.join(target))?;
        }
    }
    Ok(())
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    result.with_context(|| format!("remove {}", path.display()))
}

/// The independent conversion: unpack every layer of `layout` into `work/rootfs` with `tar`,
/// honouring whiteouts, then build `work/rootfs.sqfs` with `tar2sqfs`.
fn unpack_and_squash(layout: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let root = work.join("rootfs");
    std::fs::create_dir_all(&root)?;
    for (layer, _) in layout_layers(layout)? {
        apply_whiteouts(&root, &layer)?;
        run(Command::new("tar")
            .args(["-xf"])
            .arg(&layer)
            .arg("-C")
            .arg(&root)
            .args(["--numeric-owner", "--same-permissions", "--exclude=.wh.*"]))?;
    }
    let out = work.join("rootfs.sqfs");
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pack = Command::new("tar")
        .args(["--numeric-owner", "-cf", "-", "-C"])
        .arg(&root)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()
        .context("start tar -c")?;
    let tar_out = pack.stdout.take().context("tar stdout")?;
    run(Command::new("tar2sqfs")
        .args(["--quiet", "--force", "--compressor", "zstd"])
        .args(["--num-jobs", &jobs.to_string()])
        .arg(&out)
        .stdin(tar_out))?;
    if !pack.wait()?.success() {
        bail!("tar -c of the unpacked tree failed");
    }
    Ok(out)
}

/// Total bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            total += tree_bytes(&e.path())?;
        } else if t.is_file() {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

/// The one squashfs a fresh matchlock cache holds after a pull.
fn our_squashfs(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join("matchlock/images/rootfs");
    let mut found = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sqfs"));
    match (found.next(), found.next()) {
        (Some(path), None) => Ok(path),
        _ => bail!("expected exactly one squashfs in {}", dir.display()),
    }
}

/// The sorted paths a squashfs holds (read back with `sqfs2tar`), `./` and `/` trimmed.
fn squashfs_paths(sqfs: &Path) -> anyhow::Result<Vec<String>> {
    let mut dump = Command::new("sqfs2tar")
        .arg(sqfs)
        .stdout(Stdio::piped())
        .spawn()
        .context("start sqfs2tar")?;
    let out = dump.stdout.take().context("sqfs2tar stdout")?;
    let listing = run(Command::new("tar").arg("-t").stdin(out))?;
    if !dump.wait()?.success() {
        bail!("sqfs2tar {} failed", sqfs.display());
    }
    let mut paths: Vec<String> = String::from_utf8_lossy(&listing)
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_owned())
        .filter(|l| !l.is_empty() && l != ".")
        .collect();
    paths.sort();
    Ok(paths)
}

/// Measured sizes of one baseline run.
struct Sizes {
    compressed: u64,
    unpacked: u64,
    files: usize,
    ours_sqfs: u64,
    baseline_sqfs: u64,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

impl Bench {
    fn fresh_dir(&self) -> anyhow::Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new()
            .prefix("ml-bench-pull-")
            .tempdir_in("/tmp")?)
    }

    /// One interleaved round: our pull, then the baseline; returns (ours, skopeo, unpack).
    fn pull_round(&self, reference: &str) -> anyhow::Result<([Duration; 3], Sizes)> {
        let home = self.fresh_dir()?;
        let ours = timed(
            Command::new(&self.bin)
                .env("HOME", home.path())
                .env("XDG_CACHE_HOME", home.path().join(".cache"))
                .args(["pull", reference])
                .stdout(Stdio::null()),
        )?;
        let ours_sqfs = our_squashfs(&home.path().join(".cache"))?;

        let work = self.fresh_dir()?;
        let layout = work.path().join("layout");
        let skopeo = timed(
            Command::new("skopeo")
                .args(["copy", "--src-tls-verify=false", "--quiet"])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:v1", layout.display())),
        )?;
        let start = Instant::now();
        let sqfs = unpack_and_squash(&layout, work.path())?;
        let unpack = start.elapsed();
        // Both pipelines must have produced the same tree, or the timings compare nothing.
        let (a, b) = (squashfs_paths(&ours_sqfs)?, squashfs_paths(&sqfs)?);
        if a != b {
            bail!(
                "matchlock's rootfs and the baseline's differ:\n  ours: {a:?}\n  baseline: {b:?}"
            );
        }
        let sizes = Sizes {
            compressed: layout_layers(&layout)?.iter().map(|(_, s)| s).sum(),
            unpacked: tree_bytes(&work.path().join("rootfs"))?,
            files: a.len(),
            ours_sqfs: std::fs::metadata(&ours_sqfs)?.len(),
            baseline_sqfs: std::fs::metadata(&sqfs)?.len(),
        };
        Ok(([ours, skopeo, unpack], sizes))
    }

    pub(crate) fn pull(&self) -> anyhow::Result<()> {
        for tool in ["skopeo", "tar2sqfs", "sqfs2tar", "tar"] {
            if Command::new(tool).arg("--help").output().is_err() {
                bail!("{tool} not installed (scripts/install-deps.sh --test)");
            }
        }
        let spec = big_image();
        let reg = Registry::start().context("start docker-registry")?;
        reg.push("bench/big", "v1", &spec).context("push")?;
        let reference = format!("{}/bench/big:v1", reg.addr);
        let (mut ours, mut skopeo, mut unpack) = (Vec::new(), Vec::new(), Vec::new());
        let mut sizes = None;
        for _ in 0..self.runs.max(1) {
            let ([o, s, u], sz) = self.pull_round(&reference)?;
            ours.push(o);
            skopeo.push(s);
            unpack.push(u);
            sizes = Some(sz);
        }
        let sz = sizes.context("no run")?;
        let (o, s, u) = (median(ours), median(skopeo), median(unpack));
        println!(
            "pull: image of 4 gzip layers, {:.1} MB compressed, {:.1} MB unpacked, {} paths (measured)",
            mb(sz.compressed),
            mb(sz.unpacked),
            sz.files
        );
        println!(
            "  matchlock pull (fetch + verify + flatten + squashfs): {}",
            ms(o)
        );
        println!(
            "  skopeo copy to an OCI layout:                        {}",
            ms(s)
        );
        println!(
            "  tar unpack with whiteouts + tar2sqfs:                 {}",
            ms(u)
        );
        println!(
            "  ratio pull / (skopeo + unpack + tar2sqfs): {:.2}x (target <= 1.2x)",
            o.as_secs_f64() / (s + u).as_secs_f64()
        );
        println!(
            "  throughput: {:.1} MB/s compressed, {:.1} MB/s unpacked",
            mb(sz.compressed) / o.as_secs_f64(),
            mb(sz.unpacked) / o.as_secs_f64()
        );
        println!(
            "  squashfs (same paths in both): matchlock {:.1} MB, baseline {:.1} MB",
            mb(sz.ours_sqfs),
            mb(sz.baseline_sqfs)
        );
        Ok(())
    }
}

//! `matchlock-bench pull`: registry pull + conversion of a ~100 MB, 4-layer image from a
//! local `docker-registry`, against `skopeo copy` of the same image to a directory plus the
//! conversion step alone (`image import` of the same image as an OCI archive).
//!
//! # Design
//! - Both sides run back to back, interleaved, each from a cold store (fresh HOME), and the
//!   medians are compared; throughput is compressed blob bytes per second of our pull.
//!
//! # Limitations
//! - Loopback registry only: measures the client and conversion, not a WAN.

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
            entries
        })
        .collect();
    let mut spec = ImageSpec::new(layers);
    spec.gzip = true;
    spec
}

fn timed(mut c: Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = c.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            c.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(start.elapsed())
}

impl Bench {
    fn fresh_home(&self) -> anyhow::Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new()
            .prefix("ml-bench-pull-")
            .tempdir_in("/tmp")?)
    }

    pub(crate) fn pull(&self) -> anyhow::Result<()> {
        if Command::new("skopeo").arg("--version").output().is_err() {
            bail!("skopeo not installed (apt-get install skopeo)");
        }
        let spec = big_image();
        let parts = spec.registry_parts();
        let blob_bytes: u64 = parts.blobs.iter().map(|(_, b)| b.len() as u64).sum();
        let archive = spec.oci_layout();
        let reg = Registry::start().context("start docker-registry")?;
        reg.push("bench/big", "v1", &spec).context("push")?;
        drop(parts);
        let reference = format!("{}/bench/big:v1", reg.addr);
        let archive_path = self.home.path().join("big-oci.tar");
        std::fs::write(&archive_path, &archive)?;
        drop(archive);
        println!(
            "pull: image of 4 layers, {:.1} MB uncompressed, {:.1} MB compressed blobs",
            100.0,
            blob_bytes as f64 / 1e6
        );
        let (mut ours, mut skopeo, mut convert) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs.max(1) {
            let home = self.fresh_home()?;
            let mut c = Command::new(&self.bin);
            c.env("HOME", home.path())
                .env("XDG_CACHE_HOME", home.path().join(".cache"))
                .args(["pull", &reference]);
            ours.push(timed(c)?);

            let dir = self.fresh_home()?;
            let mut c = Command::new("skopeo");
            c.args(["copy", "--src-tls-verify=false", "--quiet"])
                .arg(format!("docker://{reference}"))
                .arg(format!("dir:{}", dir.path().join("img").display()));
            skopeo.push(timed(c)?);

            let home = self.fresh_home()?;
            let mut c = Command::new(&self.bin);
            c.env("HOME", home.path())
                .env("XDG_CACHE_HOME", home.path().join(".cache"))
                .args(["image", "import", "big:v1"])
                .stdin(std::fs::File::open(&archive_path)?);
            convert.push(timed(c)?);
        }
        let (o, s, c) = (median(ours), median(skopeo), median(convert));
        let base = s + c;
        println!("  matchlock pull (fetch + verify + convert): {}", ms(o));
        println!("  skopeo copy to dir:                         {}", ms(s));
        println!("  conversion alone (image import):            {}", ms(c));
        println!(
            "  ratio pull / (skopeo + conversion): {:.2}x (target <= 1.2x)",
            o.as_secs_f64() / base.as_secs_f64()
        );
        println!(
            "  throughput: {:.1} MB/s compressed ({:.1} MB/s uncompressed)",
            blob_bytes as f64 / 1e6 / o.as_secs_f64(),
            100.0 / o.as_secs_f64()
        );
        Ok(())
    }
}

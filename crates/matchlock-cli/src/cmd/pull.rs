//! `matchlock pull`: fetch an image from its registry into the image store, and the
//! progress display shared with `run --pull`.
//!
//! # Design
//! - The pull is blocking (the image crate uses a few threads of its own); the command
//!   runs it on a worker thread so it can enforce the 10-minute limit of spec §1.15.
//! - Progress goes to stderr, stdout carries only the `Tagged:`/`Digest:`/`Size:` result
//!   lines. On a terminal: indicatif bars per layer plus a total (bytes and rate). Not on
//!   a terminal: one line per event (resolved, each layer done, converting), no redraws.
//!
//! # Limitations
//! - A restarted layer download rewinds its bar; the total is rewound by the same amount.
//! - On timeout the process exits; complete layers stay in the store for the next pull,
//!   partial temp files are reclaimed by `image gc`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use matchlock_image::{ImageStore, PullOptions, PullProgress, Resolved};

use super::common;
use crate::output::megabytes;

/// Spec §1.15: the whole pull must finish within this.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Pull an image from a registry.
///
/// Examples:
///   matchlock pull alpine:latest
///   matchlock pull -t mytool:stable localhost:5000/team/tool:1.2
///   matchlock pull --force ghcr.io/org/img@sha256:<digest>
///
/// Credentials come from ~/.docker/config.json (or $DOCKER_CONFIG): `auths` entries and
/// credential helpers. Registries on loopback addresses use plain HTTP; list others that
/// need it in MATCHLOCK_INSECURE_REGISTRIES (comma-separated host[:port]).
#[derive(Args)]
pub struct PullArgs {
    /// Image reference (Docker syntax: name[:tag][@digest]).
    pub image: String,
    /// Also save the image under this local tag.
    #[arg(short = 't', long = "tag")]
    pub tag: Option<String>,
    /// Ignore cached images and re-download every layer.
    #[arg(long)]
    pub force: bool,
}

fn short(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

/// indicatif bars on a terminal.
struct Bars {
    multi: MultiProgress,
    layers: Mutex<Vec<ProgressBar>>,
    total: Mutex<Option<ProgressBar>>,
}

impl PullProgress for Bars {
    fn resolved(&self, digest: &str, layers: &[(String, u64)]) {
        let layer_style = ProgressStyle::with_template(
            "{prefix:>14} [{bar:30.cyan/blue}] {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let total_style = ProgressStyle::with_template(
            "{prefix:>14} [{bar:30.green}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let _ = self.multi.println(format!("Digest: {digest}"));
        let bars: Vec<ProgressBar> = layers
            .iter()
            .map(|(d, size)| {
                let b = self.multi.add(ProgressBar::new(*size));
                b.set_style(layer_style.clone());
                b.set_prefix(short(d));
                b
            })
            .collect();
        let sum = layers.iter().map(|(_, s)| s).sum();
        let total = self.multi.add(ProgressBar::new(sum));
        total.set_style(total_style);
        total.set_prefix("total");
        if let Ok(mut g) = self.layers.lock() {
            *g = bars;
        }
        if let Ok(mut g) = self.total.lock() {
            *g = Some(total);
        }
    }

    fn layer_bytes(&self, index: usize, n: u64) {
        if let Some(b) = self.layers.lock().ok().and_then(|g| g.get(index).cloned()) {
            b.inc(n);
        }
        if let Some(t) = self.total.lock().ok().and_then(|g| g.clone()) {
            t.inc(n);
        }
    }

    fn layer_restart(&self, index: usize) {
        if let Some(b) = self.layers.lock().ok().and_then(|g| g.get(index).cloned()) {
            if let Some(t) = self.total.lock().ok().and_then(|g| g.clone()) {
                t.set_position(t.position().saturating_sub(b.position()));
            }
            b.set_position(0);
            b.set_message("retrying");
        }
    }

    fn layer_done(&self, index: usize, cached: bool) {
        if let Some(b) = self.layers.lock().ok().and_then(|g| g.get(index).cloned()) {
            if cached {
                if let Some(t) = self.total.lock().ok().and_then(|g| g.clone()) {
                    t.inc(b.length().unwrap_or(0).saturating_sub(b.position()));
                }
                b.set_position(b.length().unwrap_or(0));
            }
            b.finish_with_message(if cached { "already present" } else { "done" });
        }
    }

    fn converting(&self, reused: bool) {
        if let Some(t) = self.total.lock().ok().and_then(|g| g.clone()) {
            t.finish_with_message(if reused {
                "reusing rootfs"
            } else {
                "building rootfs..."
            });
        }
    }
}

/// Line-oriented progress when stderr is not a terminal.
struct Lines {
    sizes: Mutex<Vec<(String, u64)>>,
    done: AtomicUsize,
    bytes: AtomicU64,
}

impl PullProgress for Lines {
    fn resolved(&self, digest: &str, layers: &[(String, u64)]) {
        let total: u64 = layers.iter().map(|(_, s)| s).sum();
        eprintln!(
            "Resolved {digest}: {} layers, {} to download at most",
            layers.len(),
            megabytes(total)
        );
        if let Ok(mut g) = self.sizes.lock() {
            *g = layers.to_vec();
        }
    }

    fn layer_bytes(&self, _index: usize, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn layer_restart(&self, index: usize) {
        eprintln!("Layer {}: download interrupted, retrying", index + 1);
    }

    fn layer_done(&self, index: usize, cached: bool) {
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let (digest, size) = self
            .sizes
            .lock()
            .ok()
            .and_then(|g| g.get(index).cloned())
            .unwrap_or_default();
        let total = self.sizes.lock().map(|g| g.len()).unwrap_or(0);
        let what = if cached {
            "already present"
        } else {
            "downloaded"
        };
        eprintln!(
            "Layer {n}/{total} {}: {what} ({})",
            short(&digest),
            megabytes(size)
        );
    }

    fn converting(&self, reused: bool) {
        if reused {
            eprintln!("Reusing existing rootfs");
        } else {
            eprintln!("Building rootfs...");
        }
    }
}

/// Pull options from the environment with a progress display suited to stderr.
pub fn options(force: bool) -> PullOptions {
    let progress: Arc<dyn PullProgress> = if std::io::stderr().is_terminal() {
        Arc::new(Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            layers: Mutex::new(Vec::new()),
            total: Mutex::new(None),
        })
    } else {
        Arc::new(Lines {
            sizes: Mutex::new(Vec::new()),
            done: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        })
    };
    PullOptions {
        force,
        progress,
        ..PullOptions::from_env()
    }
}

/// Resolves `image` (local tags, registry cache, then the registry; spec §6.1) with a
/// time limit.
pub fn resolve(store: ImageStore, image: &str, force: bool) -> anyhow::Result<Resolved> {
    let opts = options(force);
    let image_owned = image.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(store.resolve(&image_owned, &opts));
    });
    match rx.recv_timeout(PULL_TIMEOUT) {
        Ok(r) => r.with_context(|| format!("pull {image}")),
        Err(_) => anyhow::bail!(
            "pull {image}: timed out after {} minutes",
            PULL_TIMEOUT.as_secs() / 60
        ),
    }
}

pub fn pull(a: PullArgs) -> anyhow::Result<()> {
    let paths = common::paths()?;
    let store = common::image_store(&paths)?;
    println!("Pulling {}...", a.image);
    let resolved = resolve(store, &a.image, a.force)?;
    let rec = resolved.record;
    if let Some(tag) = &a.tag {
        let store = common::image_store(&paths)?;
        store
            .tag(&rec, tag)
            .with_context(|| format!("tag {} as {tag}", a.image))?;
        println!("Tagged: {tag}");
    }
    println!("Digest: {}", rec.digest);
    println!("Size: {}", megabytes(rec.size_bytes));
    Ok(())
}

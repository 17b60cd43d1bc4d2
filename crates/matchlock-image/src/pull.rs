//! `ImageStore::pull` and `ImageStore::resolve`: registry image -> verified layers ->
//! flattened squashfs -> `registry`-scope DB row.
//!
//! # Design
//! - Same commit protocol as archive import: layer files are installed (temp + verify +
//!   fsync + rename) as each finishes, the rootfs next, the DB row last. A pull that dies
//!   part-way leaves only complete, verified layer files named by diff id; the next pull
//!   finds them and downloads only what is missing (that is the resume), and `gc` reclaims
//!   them if nobody pulls again. The shared store lock keeps pruning away meanwhile.
//! - Layers are stored by diff id (uncompressed), so a tag alias, a re-pull, or another
//!   image sharing a base layer never stores the bytes twice, and the rootfs is keyed by
//!   the diff ids as well. A layer whose file is already present is not downloaded (unless
//!   `force`, which re-downloads and replaces it).
//! - Layers download on a few threads that take the next layer from a shared counter; a
//!   failure stops the others at their next layer. Each blob is hashed while it streams
//!   (compressed digest and size, then uncompressed diff id) and nothing is installed
//!   unless all match. A network failure mid-blob restarts that blob (with backoff); a
//!   digest mismatch or local I/O error (disk full) fails the pull at once.
//! - The cache key is the reference exactly as typed (spec §6.1), the recorded digest is
//!   the platform manifest's.
//!
//! # Limitations
//! - Downloaded blobs are decompressed on the fly and only the uncompressed tar is kept, so
//!   a pull cannot be served back to another registry byte for byte.
//! - The platform is always linux/<host arch>.

use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::archive::{RawConfig, MAX_JSON, MAX_LAYERS};
use crate::auth::{AuthError, Credentials};
use crate::import::{image_config, squash_id, ImportError};
use crate::layers::{layer_path, store_stream, Caps, Expected, ImageBudget, LayerError};
use crate::manifest::{self, Descriptor, Manifest, ManifestError};
use crate::reference::{Reference, ReferenceError};
use crate::registry::{Client, RegistryError, RetryPolicy};
use crate::store::{ImageStore, NewImage, StoreError};
use crate::{ImageRecord, Scope};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("parse image reference")]
    Reference(#[from] ReferenceError),
    #[error("look up registry credentials")]
    Auth(#[source] AuthError),
    #[error("lock image store")]
    Lock(#[source] StoreError),
    #[error("look up cached image {reference:?}")]
    Cache {
        reference: String,
        #[source]
        source: StoreError,
    },
    #[error("fetch manifest {reference}")]
    FetchManifest {
        reference: String,
        #[source]
        source: RegistryError,
    },
    #[error("invalid manifest for {reference}")]
    Manifest {
        reference: String,
        #[source]
        source: ManifestError,
    },
    #[error("fetch image config {digest}")]
    FetchConfig {
        digest: String,
        #[source]
        source: RegistryError,
    },
    #[error("invalid image config {digest}")]
    Config {
        digest: String,
        #[source]
        source: ManifestError,
    },
    #[error("image config {digest} is not valid JSON")]
    ConfigJson {
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("image has no layers")]
    NoLayers,
    #[error("image has {count} layers (limit {MAX_LAYERS})")]
    TooManyLayers { count: usize },
    #[error("manifest lists {layers} layers but the config has {diff_ids} diff ids")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error("invalid diff id {diff_id:?} in image config")]
    DiffIdFormat { diff_id: String },
    #[error("fetch layer {digest}")]
    FetchLayer {
        digest: String,
        #[source]
        source: RegistryError,
    },
    #[error("layer {digest}: download kept failing after {attempts} attempts")]
    LayerStream {
        digest: String,
        attempts: u32,
        #[source]
        source: LayerError,
    },
    #[error("store layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: LayerError,
    },
    #[error("pull cancelled")]
    Cancelled,
    #[error("build rootfs")]
    Rootfs(#[source] ImportError),
    #[error("stat rootfs {path}")]
    Stat {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("record image {reference:?}")]
    Save {
        reference: String,
        #[source]
        source: StoreError,
    },
}

impl PullError {
    /// True when the image was refused for exceeding an [`crate::ImageLimits`] cap.
    pub fn is_limit(&self) -> bool {
        match self {
            PullError::Layer { source, .. } => source.is_limit(),
            PullError::Rootfs(e) => e.is_limit(),
            _ => false,
        }
    }
}

/// Reports pull progress (all methods default to no-ops). Called from download threads.
pub trait PullProgress: Send + Sync {
    /// The platform manifest is known: its digest and the layers' blob digests and sizes.
    fn resolved(&self, _digest: &str, _layers: &[(String, u64)]) {}
    /// `n` more blob bytes of layer `index` arrived (a restarted download reports again).
    fn layer_bytes(&self, _index: usize, _n: u64) {}
    /// A restarted download of layer `index` begins again from byte 0.
    fn layer_restart(&self, _index: usize) {}
    /// Layer `index` is stored (`cached`: it was already present, nothing downloaded).
    fn layer_done(&self, _index: usize, _cached: bool) {}
    /// Flattening into the rootfs begins (`reused`: an identical rootfs exists).
    fn converting(&self, _reused: bool) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl PullProgress for NoProgress {}

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    /// Skip the caches (spec §6.1) and re-download layers already present.
    pub force: bool,
    /// Registries (`host[:port]`) that may be spoken to over plain HTTP, besides loopback.
    pub insecure_registries: Vec<String>,
    /// Docker config file for credentials (default: `$DOCKER_CONFIG` / `~/.docker`).
    pub docker_config: Option<PathBuf>,
    /// Parallel layer downloads.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Socket read timeout.
    pub read_timeout: Duration,
    /// OCI architecture to select from indexes (default: the host's).
    pub arch: String,
    pub progress: Arc<dyn PullProgress>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            force: false,
            insecure_registries: Vec::new(),
            docker_config: None,
            concurrency: 3,
            retry: RetryPolicy::default(),
            read_timeout: Duration::from_secs(60),
            arch: manifest::host_arch().to_owned(),
            progress: Arc::new(NoProgress),
        }
    }
}

impl PullOptions {
    /// Defaults plus `MATCHLOCK_INSECURE_REGISTRIES` (comma-separated `host[:port]`).
    pub fn from_env() -> PullOptions {
        let insecure = std::env::var("MATCHLOCK_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        PullOptions {
            insecure_registries: insecure,
            ..Default::default()
        }
    }
}

/// The image `resolve` found or pulled.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub record: ImageRecord,
    /// True when served from the local store or registry cache without contacting a registry.
    pub cached: bool,
}

/// Counts bytes for progress, hashes them, and remembers whether the *network* side failed.
struct NetReader<'a, R> {
    inner: R,
    hasher: Sha256,
    failed: &'a AtomicBool,
    index: usize,
    progress: &'a dyn PullProgress,
}

impl<R: Read> Read for NetReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.progress.layer_bytes(self.index, n as u64);
                Ok(n)
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// A downloaded layer's path and uncompressed size, or why it failed.
type LayerResult = Result<(PathBuf, u64), PullError>;

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl ImageStore {
    /// Spec §6.1: unless `opts.force`, the local scope by exact tag, then the registry cache
    /// by the reference as typed (entries with missing files are misses), then a pull.
    pub fn resolve(&self, reference: &str, opts: &PullOptions) -> Result<Resolved, PullError> {
        if !opts.force {
            let hit = self.get(reference).map_err(|source| PullError::Cache {
                reference: reference.to_owned(),
                source,
            })?;
            if let Some(record) = hit {
                return Ok(Resolved {
                    record,
                    cached: true,
                });
            }
        }
        let record = self.pull(reference, opts)?;
        Ok(Resolved {
            record,
            cached: false,
        })
    }

    /// Pulls `reference` from its registry into the `registry` scope (key: `reference` as
    /// typed), replacing an earlier pull of the same reference. An image over
    /// [`crate::ImageLimits`] fails with an error naming the limit and its layers are pruned.
    pub fn pull(&self, reference: &str, opts: &PullOptions) -> Result<ImageRecord, PullError> {
        let res = self.pull_locked(reference, opts);
        match &res {
            Err(e) if e.is_limit() => self.prune_after_limit(),
            Ok(rec) => {
                tracing::info!(reference, digest = %rec.digest, layers = rec.layers.len(), size = rec.size_bytes, "pulled image");
                if let Err(e) = self.prune_if_idle() {
                    tracing::warn!(error = %e, "prune after pull failed; `image gc` will retry");
                }
            }
            Err(_) => {}
        }
        res
    }

    fn pull_locked(&self, reference: &str, opts: &PullOptions) -> Result<ImageRecord, PullError> {
        let r = Reference::parse(reference)?;
        let creds = self.credentials(&r, opts)?;
        let insecure = opts.insecure_registries.contains(&r.registry);
        let client = Client::new(&r, insecure, creds, opts.retry.clone(), opts.read_timeout);
        let lock = self.lock_shared().map_err(PullError::Lock)?;
        let (digest, config_desc, layers) = fetch_manifest(&client, &r, &opts.arch)?;
        let raw = fetch_config(&client, &config_desc)?;
        let diff_ids = check_layers(&raw, &layers)?;
        let blob_sizes: Vec<(String, u64)> =
            layers.iter().map(|l| (l.digest.clone(), l.size)).collect();
        opts.progress.resolved(&digest, &blob_sizes);
        let stored = self.download_layers(&client, &layers, &diff_ids, opts)?;
        let rootfs = self
            .rootfs_dir()
            .join(format!("{}.sqfs", squash_id(&diff_ids)));
        let reuse = !opts.force && std::fs::metadata(&rootfs).is_ok_and(|m| m.len() > 0);
        opts.progress.converting(reuse);
        if !reuse {
            let paths: Vec<&Path> = stored.iter().map(|(p, _)| p.as_path()).collect();
            self.build_rootfs(&paths, &rootfs)
                .map_err(PullError::Rootfs)?;
        }
        let meta = std::fs::metadata(&rootfs).map_err(|source| PullError::Stat {
            path: rootfs.display().to_string(),
            source,
        })?;
        let size = meta.blocks().saturating_mul(512);
        let config = image_config(raw);
        let layer_rows: Vec<(String, u64)> = diff_ids
            .iter()
            .zip(&stored)
            .map(|(d, (_, size))| (d.clone(), *size))
            .collect();
        let rec = self
            .save(&NewImage {
                tag: reference,
                scope: Scope::Registry,
                source: "registry",
                digest: &digest,
                size,
                rootfs: &rootfs,
                layers: &layer_rows,
                config: &config,
            })
            .map_err(|source| PullError::Save {
                reference: reference.to_owned(),
                source,
            })?;
        drop(lock);
        Ok(rec)
    }

    /// Stores a local-scope alias `tag` (source `tag`) for `image`, sharing its files.
    pub fn tag(&self, image: &ImageRecord, tag: &str) -> Result<ImageRecord, StoreError> {
        let layers: Vec<(String, u64)> = image
            .layers
            .iter()
            .map(|d| {
                let h = hex_of(d).to_owned();
                let size = std::fs::metadata(layer_path(&self.layers_dir(), &h))
                    .map(|m| m.len())
                    .unwrap_or(0);
                (h, size)
            })
            .collect();
        self.save(&NewImage {
            tag,
            scope: Scope::Local,
            source: "tag",
            digest: &image.digest,
            size: image.size_bytes,
            rootfs: &image.rootfs,
            layers: &layers,
            config: &image.config,
        })
    }

    fn credentials(
        &self,
        r: &Reference,
        opts: &PullOptions,
    ) -> Result<Option<Credentials>, PullError> {
        let path = opts
            .docker_config
            .clone()
            .or_else(crate::auth::docker_config_path);
        match path {
            Some(p) => crate::auth::lookup(&p, &r.registry).map_err(PullError::Auth),
            None => Ok(None),
        }
    }

    /// Downloads missing layers on a few threads; returns (path, uncompressed size) per layer.
    fn download_layers(
        &self,
        client: &Client,
        layers: &[Descriptor],
        diff_ids: &[String],
        opts: &PullOptions,
    ) -> Result<Vec<(PathBuf, u64)>, PullError> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let results: Mutex<Vec<Option<LayerResult>>> =
            Mutex::new((0..layers.len()).map(|_| None).collect());
        let workers = opts.concurrency.clamp(1, 8).min(layers.len());
        let limits = self.limits();
        let budget = ImageBudget::new(limits.max_image_bytes);
        let caps = Caps {
            layer: limits.max_layer_bytes,
            image: &budget,
        };
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= layers.len() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let res = self.fetch_layer(client, i, &layers[i], &diff_ids[i], opts, &caps);
                    if res.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if let Ok(mut g) = results.lock() {
                        g[i] = Some(res);
                    }
                });
            }
        });
        let results = results.into_inner().unwrap_or_default();
        let mut out = Vec::with_capacity(layers.len());
        let mut first_err = None;
        for r in results {
            match r {
                Some(Ok(v)) => out.push(v),
                Some(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                None => {
                    first_err.get_or_insert(PullError::Cancelled);
                }
            }
        }
        // Report a real failure rather than the cancellations it caused.
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn fetch_layer(
        &self,
        client: &Client,
        index: usize,
        desc: &Descriptor,
        diff_id: &str,
        opts: &PullOptions,
        caps: &Caps<'_>,
    ) -> Result<(PathBuf, u64), PullError> {
        let layers_dir = self.layers_dir();
        let path = layer_path(&layers_dir, diff_id);
        if !opts.force {
            if let Ok(m) = std::fs::metadata(&path) {
                if m.len() > 0 {
                    charge_cached(&desc.digest, m.len(), caps)?;
                    opts.progress.layer_done(index, true);
                    return Ok((path, m.len()));
                }
            }
        }
        let expected = Expected {
            name: &desc.digest,
            blob_digest: Some(hex_of(&desc.digest)),
            blob_size: Some(desc.size),
            diff_id,
        };
        let attempts = opts.retry.attempts.max(1);
        let mut delay = opts.retry.backoff;
        for attempt in 1..=attempts {
            let resp = client
                .get(&format!("blobs/{}", desc.digest), "")
                .map_err(|source| PullError::FetchLayer {
                    digest: desc.digest.clone(),
                    source,
                })?;
            let failed = AtomicBool::new(false);
            let mut reader = NetReader {
                // One byte more than promised, so an oversized blob fails the size check.
                inner: resp.into_reader().take(desc.size.saturating_add(1)),
                hasher: Sha256::new(),
                failed: &failed,
                index,
                progress: opts.progress.as_ref(),
            };
            match store_stream(
                &mut reader,
                &expected,
                &self.tmp_dir(),
                &layers_dir,
                opts.force,
                caps,
            ) {
                Ok(l) => {
                    opts.progress.layer_done(index, false);
                    return Ok((l.path, l.size));
                }
                Err(source) if failed.load(Ordering::Relaxed) => {
                    if attempt == attempts {
                        return Err(PullError::LayerStream {
                            digest: desc.digest.clone(),
                            attempts,
                            source,
                        });
                    }
                    tracing::debug!(digest = %desc.digest, attempt, error = %source, "layer download interrupted; retrying");
                    opts.progress.layer_restart(index);
                    std::thread::sleep(delay);
                    delay = delay.saturating_mul(2);
                }
                Err(source) => {
                    // A corrupt blob usually fails decompression before its digest can be
                    // checked; finish hashing it so the error names the real cause.
                    let source = match source {
                        LayerError::Decompress { .. }
                            if io::copy(&mut reader, &mut io::sink()).is_ok()
                                && !failed.load(Ordering::Relaxed) =>
                        {
                            let actual = hex::encode(reader.hasher.finalize_reset());
                            if actual == hex_of(&desc.digest) {
                                source
                            } else {
                                LayerError::BlobDigest {
                                    path: desc.digest.clone(),
                                    expected: hex_of(&desc.digest).to_owned(),
                                    actual,
                                }
                            }
                        }
                        other => other,
                    };
                    return Err(PullError::Layer {
                        digest: desc.digest.clone(),
                        source,
                    });
                }
            }
        }
        Err(PullError::Cancelled)
    }
}

/// Counts an already-stored layer against the caps (it may predate lower limits).
fn charge_cached(digest: &str, size: u64, caps: &Caps<'_>) -> Result<(), PullError> {
    let err = |source| PullError::Layer {
        digest: digest.to_owned(),
        source,
    };
    if size > caps.layer {
        return Err(err(LayerError::LayerTooLarge {
            path: digest.to_owned(),
            limit: caps.layer,
        }));
    }
    if !caps.image.charge(size) {
        return Err(err(LayerError::ImageTooLarge {
            path: digest.to_owned(),
            limit: caps.image.max(),
        }));
    }
    Ok(())
}

/// Fetches the manifest (and the platform manifest, for an index); returns the image
/// manifest's digest, config descriptor and layer descriptors.
fn fetch_manifest(
    client: &Client,
    r: &Reference,
    arch: &str,
) -> Result<(String, Descriptor, Vec<Descriptor>), PullError> {
    let shown = r.to_string();
    let fetch = |reference: &str, expected: Option<(&str, Option<u64>)>| {
        let resp = client
            .get(&format!("manifests/{reference}"), manifest::ACCEPT)
            .map_err(|source| PullError::FetchManifest {
                reference: shown.clone(),
                source,
            })?;
        let content_type = resp.header("Content-Type").map(str::to_owned);
        let bad = |source| PullError::Manifest {
            reference: shown.clone(),
            source,
        };
        let (body, digest) =
            manifest::read_bounded(resp.into_reader(), "manifest", MAX_JSON).map_err(bad)?;
        if let Some((want, size)) = expected {
            manifest::verify("manifest", &body, &digest, want, size).map_err(bad)?;
        }
        let m = manifest::parse(&body, content_type.as_deref()).map_err(bad)?;
        Ok::<_, PullError>((digest, m))
    };
    let (digest, m) = fetch(r.manifest_ref(), r.digest.as_deref().map(|d| (d, None)))?;
    let (digest, m) = match m {
        Manifest::Index(list) => {
            let pick =
                manifest::select_platform(&list, arch).map_err(|source| PullError::Manifest {
                    reference: shown.clone(),
                    source,
                })?;
            tracing::debug!(index = %digest, manifest = %pick.digest, arch, "selected platform manifest");
            let (d, m) = fetch(&pick.digest, Some((&pick.digest, Some(pick.size))))?;
            if matches!(m, Manifest::Index(_)) {
                return Err(PullError::Manifest {
                    reference: shown,
                    source: ManifestError::NotImage,
                });
            }
            (d, m)
        }
        m => (digest, m),
    };
    match m {
        Manifest::Image { config, layers } => Ok((digest, config, layers)),
        Manifest::Index(_) => Err(PullError::Manifest {
            reference: shown,
            source: ManifestError::NotImage,
        }),
    }
}

fn fetch_config(client: &Client, desc: &Descriptor) -> Result<RawConfig, PullError> {
    let digest = desc.digest.clone();
    let bad = |source| PullError::Config {
        digest: digest.clone(),
        source,
    };
    if desc.size > MAX_JSON {
        return Err(bad(ManifestError::TooLarge {
            what: "image config".to_owned(),
            limit: MAX_JSON,
        }));
    }
    let resp = client
        .get(&format!("blobs/{}", desc.digest), "")
        .map_err(|source| PullError::FetchConfig {
            digest: digest.clone(),
            source,
        })?;
    let (body, actual) =
        manifest::read_bounded(resp.into_reader(), "image config", MAX_JSON).map_err(bad)?;
    manifest::verify(
        "image config",
        &body,
        &actual,
        &desc.digest,
        Some(desc.size),
    )
    .map_err(bad)?;
    serde_json::from_slice(&body).map_err(|source| PullError::ConfigJson {
        digest: digest.clone(),
        source,
    })
}

/// Checks layer counts and diff ids; returns the diff ids as hex.
fn check_layers(raw: &RawConfig, layers: &[Descriptor]) -> Result<Vec<String>, PullError> {
    if layers.is_empty() {
        return Err(PullError::NoLayers);
    }
    if layers.len() > MAX_LAYERS {
        return Err(PullError::TooManyLayers {
            count: layers.len(),
        });
    }
    let diff_ids = raw
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(PullError::LayerCount {
            layers: layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    diff_ids
        .into_iter()
        .map(|d| {
            if crate::reference::valid_digest(&d) {
                Ok(hex_of(&d).to_owned())
            } else {
                Err(PullError::DiffIdFormat {
                    diff_id: d.chars().take(100).collect(),
                })
            }
        })
        .collect()
}

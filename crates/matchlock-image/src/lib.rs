//! Local image store: importing `docker save` / OCI-layout archives, content-addressed layer
//! blobs, the flattened read-only squashfs each VM boots from, and the image metadata DB.
//!
//! Layout under the store root (`~/.cache/matchlock/images`):
//! ```text
//! metadata.db                 images + image_layers (SQLite, WAL)
//! layers/sha256/<diff>.tar    uncompressed layer tars, named by diff id
//! rootfs/<squash-id>.sqfs     flattened squashfs, squash-id = sha256("matchlock-squash-v1\n" + diff ids)
//! tmp/                        spool and temp files (reclaimed by gc)
//! .lock                       shared by imports and pulls, exclusive for pruning
//! ```
//!
//! Registry pulls ([`ImageStore::pull`], [`ImageStore::resolve`]) use the same layer and
//! rootfs stores: `reference` parses Docker-style names, `auth` finds credentials,
//! `registry` speaks the distribution API, `manifest` picks the platform image, and
//! `pull` streams verified layers into the store and records a `registry`-scope row.
//!
//! # Design
//! - Import is a pipeline of small modules: [`archive`] spools and resolves the archive,
//!   [`layers`] stores verified layer tars, [`flatten`] merges them into one tar stream with
//!   whiteouts applied, [`squash`] turns that into squashfs with `tar2sqfs` (rootless), and
//!   [`store`] commits the DB row last. Every file is written as temp + fsync + rename, and
//!   the DB row is the commit point, so an interrupted import leaves only unreferenced files
//!   that `gc` reclaims.
//! - Imports hold a shared file lock for their whole run; pruning (gc, and the prune after
//!   remove/re-import) takes it exclusively, so it never deletes files an in-flight import is
//!   about to reference. The prune after remove/import is skipped if an import is running.
//! - The squashfs is keyed by the layer diff ids, so tags and re-imports of the same layers
//!   share one rootfs file. Registry pulls write `Scope::Registry` rows with the same
//!   layer and rootfs stores, so pulled and imported images share layers.
//!
//! - Archive and registry input is hostile: [`ImageLimits`] caps the uncompressed bytes of
//!   each layer and of the whole image (checked while decompressing, so a gzip bomb stops at
//!   the cap) and the number of tar entries the flattener indexes (its memory is proportional
//!   to entries). A layer over a cap is never installed, and files an aborted import left
//!   unreferenced are pruned at once.
//!
//! # Limitations
//! - Layers are kept uncompressed on disk next to the squashfs (about 2x the image size).
//! - The caps bound disk and memory per image; several concurrent pulls each get their own.

#![forbid(unsafe_code)]

mod archive;
mod auth;
mod flatten;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod import;
mod layers;
mod manifest;
mod pull;
mod reference;
mod registry;
mod squash;
mod store;

use std::path::PathBuf;

pub use archive::ArchiveError;
pub use auth::{docker_config_path, AuthError, Credentials};
pub use flatten::FlattenError;
pub use import::ImportError;
pub use layers::LayerError;
pub use manifest::{host_arch, ManifestError};
pub use pull::{NoProgress, PullError, PullOptions, PullProgress, Resolved};
pub use reference::{Reference, ReferenceError};
pub use registry::{is_loopback, RegistryError, RetryPolicy};
pub use squash::SquashError;
pub use store::{ImageStore, StoreError};

/// Environment variable overriding [`ImageLimits::max_layer_bytes`].
pub const ENV_MAX_LAYER_BYTES: &str = "MATCHLOCK_MAX_LAYER_BYTES";
/// Environment variable overriding [`ImageLimits::max_image_bytes`].
pub const ENV_MAX_IMAGE_BYTES: &str = "MATCHLOCK_MAX_IMAGE_BYTES";
/// Environment variable overriding [`ImageLimits::max_entries`].
pub const ENV_MAX_IMAGE_ENTRIES: &str = "MATCHLOCK_MAX_IMAGE_ENTRIES";

/// Caps on what one image import or pull may unpack. Defaults are generous for real images
/// (the largest common images are a few GiB and well under 1M files); each is overridable
/// with an environment variable read by [`ImageStore::open`] (plain decimal bytes/count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Uncompressed bytes of one layer tar (`MATCHLOCK_MAX_LAYER_BYTES`, default 10 GiB).
    pub max_layer_bytes: u64,
    /// Uncompressed bytes of all layers of one image (`MATCHLOCK_MAX_IMAGE_BYTES`,
    /// default 20 GiB).
    pub max_image_bytes: u64,
    /// Tar entries indexed over all layers of one image (`MATCHLOCK_MAX_IMAGE_ENTRIES`,
    /// default 1,000,000).
    pub max_entries: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_layer_bytes: 10 << 30,
            max_image_bytes: 20 << 30,
            max_entries: 1_000_000,
        }
    }
}

impl ImageLimits {
    /// Defaults overridden by the `MATCHLOCK_MAX_*` variables in the process environment.
    pub fn from_env() -> Result<ImageLimits, StoreError> {
        ImageLimits::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults overridden by whatever `lookup` returns for each variable name.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ImageLimits, StoreError> {
        let d = ImageLimits::default();
        let get = |var: &'static str, default: u64| -> Result<u64, StoreError> {
            match lookup(var) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(StoreError::BadLimit { var, value: v }),
                },
            }
        };
        Ok(ImageLimits {
            max_layer_bytes: get(ENV_MAX_LAYER_BYTES, d.max_layer_bytes)?,
            max_image_bytes: get(ENV_MAX_IMAGE_BYTES, d.max_image_bytes)?,
            max_entries: get(ENV_MAX_IMAGE_ENTRIES, d.max_entries)?,
        })
    }
}

/// Which namespace a tag lives in: local imports/tags, or the registry pull cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Local,
    Registry,
}

impl Scope {
    /// The DB spelling (`local` / `registry`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Registry => "registry",
        }
    }
}

/// The runtime defaults an image carries (from its OCI config): the one `ImageConfig` type,
/// shared with the sandbox config schema.
pub use matchlock_api::ImageConfig;

/// One stored image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRecord {
    pub tag: String,
    pub scope: Scope,
    /// `import`, `registry` or `tag`.
    pub source: String,
    /// `sha256:<hex>`: manifest digest (OCI, registry) or config digest (`docker save`).
    pub digest: String,
    /// Allocated bytes of the rootfs file.
    pub size_bytes: u64,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// The flattened read-only squashfs the VM boots as its lower layer.
    pub rootfs: PathBuf,
    /// Layer diff ids (`sha256:<hex>`), base first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_from_lookup_defaults_overrides_and_rejects_garbage() {
        assert_eq!(
            ImageLimits::from_lookup(|_| None).expect("defaults"),
            ImageLimits::default()
        );
        let l = ImageLimits::from_lookup(|k| (k == ENV_MAX_IMAGE_ENTRIES).then(|| "42".into()))
            .expect("override");
        assert_eq!(l.max_entries, 42);
        assert_eq!(l.max_layer_bytes, 10 << 30);
        for bad in ["", "0", "-1", "1GiB", "x"] {
            let err = ImageLimits::from_lookup(|k| (k == ENV_MAX_LAYER_BYTES).then(|| bad.into()))
                .expect_err(bad);
            assert!(err.to_string().contains(ENV_MAX_LAYER_BYTES), "{err}");
        }
    }
}

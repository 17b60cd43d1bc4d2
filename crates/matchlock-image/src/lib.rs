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
//! # Limitations
//! - Layers are kept uncompressed on disk next to the squashfs (about 2x the image size).

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

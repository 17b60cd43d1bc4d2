//! `ImageStore::import_archive`: archive -> verified layers -> flattened squashfs -> DB row.
//!
//! # Design
//! - Ordering gives atomicity: files first (temp + fsync + rename), DB row last. A failure
//!   before the row is written returns an error and leaves only unreferenced files (temp
//!   files are removed on drop; anything a crash leaves behind is reclaimed by `gc`).
//! - The squashfs is named by the layer diff ids, so an existing one is reused as-is.
//!
//! # Limitations
//! - The whole import runs on the calling thread; the CLI enforces the overall timeout.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::archive::{ArchiveError, OuterArchive, RawConfig};
use crate::flatten::{FlattenError, Tree};
use crate::layers::{store_layer, Caps, ImageBudget, LayerError};
use crate::squash::{build_squashfs, SquashError};
use crate::store::{ImageStore, NewImage, StoreError};
use crate::{ImageConfig, ImageRecord, Scope};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("image tag is empty")]
    EmptyTag,
    #[error("lock image store")]
    Lock(#[source] StoreError),
    #[error("invalid image archive")]
    Archive(#[from] ArchiveError),
    #[error("store layer {index}")]
    Layer {
        index: usize,
        #[source]
        source: LayerError,
    },
    #[error("flatten layers")]
    Flatten(#[source] FlattenError),
    #[error("create temp file in {dir}")]
    CreateTemp {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("build squashfs rootfs")]
    Squash(#[source] SquashError),
    #[error("install rootfs {path}")]
    Persist {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("stat rootfs {path}")]
    Stat {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("record image {tag:?}")]
    Save {
        tag: String,
        #[source]
        source: StoreError,
    },
}

impl ImportError {
    /// True when the input was refused for exceeding an [`crate::ImageLimits`] cap.
    pub fn is_limit(&self) -> bool {
        match self {
            ImportError::Layer { source, .. } => source.is_limit(),
            ImportError::Flatten(e) => matches!(e, FlattenError::TooManyEntries { .. }),
            _ => false,
        }
    }
}

/// `sha256("matchlock-squash-v1\n" + "sha256:<diff>\n"...)`, hex.
pub(crate) fn squash_id(diff_ids: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"matchlock-squash-v1\n");
    for d in diff_ids {
        h.update(format!("sha256:{d}\n").as_bytes());
    }
    hex::encode(h.finalize())
}

pub(crate) fn image_config(raw: RawConfig) -> ImageConfig {
    let c = raw.config.unwrap_or_default();
    ImageConfig {
        user: c.user.unwrap_or_default(),
        working_dir: c.working_dir.unwrap_or_default(),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect(),
    }
}

impl ImageStore {
    /// Imports a `docker save` or OCI-layout archive (optionally gzip'd) as local `tag`,
    /// replacing any existing local image with that tag.
    /// Input over [`crate::ImageLimits`] fails with an error naming the limit, and the
    /// layers stored for it are pruned (unless another import is running; `gc` then does).
    pub fn import_archive(&self, tag: &str, input: impl Read) -> Result<ImageRecord, ImportError> {
        if tag.is_empty() {
            return Err(ImportError::EmptyTag);
        }
        let res = self.import_locked(tag, input);
        match &res {
            Err(e) if e.is_limit() => self.prune_after_limit(),
            Ok(rec) => {
                tracing::info!(tag, digest = %rec.digest, layers = rec.layers.len(), size = rec.size_bytes, "imported image");
                // A replaced tag may have left its old rootfs unreferenced.
                if let Err(e) = self.prune_if_idle() {
                    tracing::warn!(error = %e, "prune after import failed; `image gc` will retry");
                }
            }
            Err(_) => {}
        }
        res
    }

    /// Removes what an import or pull refused for a limit left behind.
    pub(crate) fn prune_after_limit(&self) {
        if let Err(e) = self.prune_if_idle() {
            tracing::warn!(error = %e, "prune after a refused image failed; `image gc` will retry");
        }
    }

    fn import_locked(&self, tag: &str, input: impl Read) -> Result<ImageRecord, ImportError> {
        let lock = self.lock_shared().map_err(ImportError::Lock)?;
        let tmp_dir = self.tmp_dir();
        let layers_dir = self.layers_dir();
        let archive = OuterArchive::spool(&tmp_dir, input)?;
        let image = archive.resolve(tag)?;
        let limits = self.limits();
        let budget = ImageBudget::new(limits.max_image_bytes);
        let caps = Caps {
            layer: limits.max_layer_bytes,
            image: &budget,
        };
        let mut stored = Vec::with_capacity(image.layers.len());
        for (index, src) in image.layers.iter().enumerate() {
            let layer = store_layer(archive.file(), src, &tmp_dir, &layers_dir, &caps)
                .map_err(|source| ImportError::Layer { index, source })?;
            stored.push(layer);
        }
        drop(archive);
        let diff_ids: Vec<String> = stored.iter().map(|l| l.diff_id.clone()).collect();
        let rootfs = self
            .rootfs_dir()
            .join(format!("{}.sqfs", squash_id(&diff_ids)));
        if std::fs::metadata(&rootfs)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            tracing::debug!(rootfs = %rootfs.display(), "reusing existing rootfs");
        } else {
            let paths: Vec<&Path> = stored.iter().map(|l| l.path.as_path()).collect();
            self.build_rootfs(&paths, &rootfs)?;
        }
        let stat_err = |source| ImportError::Stat {
            path: rootfs.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(&rootfs).map_err(stat_err)?;
        let size = meta.blocks().saturating_mul(512);
        let config = image_config(image.config);
        let layers: Vec<(String, u64)> =
            stored.iter().map(|l| (l.diff_id.clone(), l.size)).collect();
        let rec = self
            .save(&NewImage {
                tag,
                scope: Scope::Local,
                source: "import",
                digest: &image.digest,
                size,
                rootfs: &rootfs,
                layers: &layers,
                config: &config,
            })
            .map_err(|source| ImportError::Save {
                tag: tag.to_owned(),
                source,
            })?;
        drop(lock);
        Ok(rec)
    }

    pub(crate) fn build_rootfs(&self, layers: &[&Path], rootfs: &Path) -> Result<(), ImportError> {
        let tree = Tree::build(layers, self.limits().max_entries).map_err(ImportError::Flatten)?;
        tracing::debug!(entries = tree.len(), "flattened layers");
        let tmp_dir = self.tmp_dir();
        let tmp = tempfile::Builder::new()
            .prefix("rootfs-")
            .suffix(".sqfs.tmp")
            .tempfile_in(&tmp_dir)
            .map_err(|source| ImportError::CreateTemp {
                dir: tmp_dir.display().to_string(),
                source,
            })?
            .into_temp_path();
        build_squashfs(&tmp, |w| tree.write_tar(layers, w)).map_err(ImportError::Squash)?;
        let persist_err = |source| ImportError::Persist {
            path: rootfs.display().to_string(),
            source,
        };
        std::fs::File::open(&tmp)
            .and_then(|f| {
                f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                f.sync_all()
            })
            .map_err(persist_err)?;
        tmp.persist(rootfs).map_err(|e| persist_err(e.error))?;
        std::fs::File::open(self.rootfs_dir())
            .and_then(|d| d.sync_all())
            .map_err(persist_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squash_id_matches_reference_formula() {
        let d = "ab".repeat(32);
        let mut h = Sha256::new();
        h.update(format!("matchlock-squash-v1\nsha256:{d}\n").as_bytes());
        assert_eq!(squash_id(&[d]), hex::encode(h.finalize()));
    }

    #[test]
    fn env_split_at_first_equals() {
        let raw: RawConfig = serde_json::from_str(
            r#"{"config":{"Env":["A=1","B=x=y","NOEQ","E="],"Cmd":["sh"],"User":"app"}}"#,
        )
        .expect("json");
        let c = image_config(raw);
        assert_eq!(
            c.env,
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "x=y".to_string()),
                ("E".to_string(), String::new())
            ]
            .into()
        );
        assert_eq!(c.cmd, vec!["sh".to_owned()]);
        assert_eq!(c.user, "app");
    }
}

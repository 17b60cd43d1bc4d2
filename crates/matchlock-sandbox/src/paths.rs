//! Where Matchlock keeps things on the host: state under `~/.matchlock`, caches (images,
//! kernels, initramfs) and named volumes under `${XDG_CACHE_HOME:-~/.cache}/matchlock`.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `~/.matchlock`: state.db and per-VM directories.
    pub state: PathBuf,
    /// `~/.cache/matchlock`: images, kernels, initramfs.
    pub cache: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("HOME is not set; Matchlock keeps its state under $HOME/.matchlock")]
    NoHome,
}

impl Paths {
    /// Paths derived from `HOME` and `XDG_CACHE_HOME`.
    pub fn from_env() -> Result<Paths, PathsError> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .ok_or(PathsError::NoHome)?;
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".cache"))
            .join("matchlock");
        Ok(Paths {
            state: home.join(".matchlock"),
            cache,
        })
    }

    pub fn images(&self) -> PathBuf {
        self.cache.join("images")
    }

    pub fn initramfs_cache(&self) -> PathBuf {
        self.cache.join("initramfs")
    }

    /// Pre-formatted upper-disk templates, one per size ([`crate::disk::create_upper`]).
    pub fn disk_templates(&self) -> PathBuf {
        self.cache.join("disk-templates")
    }

    /// Post-boot VM snapshots ([`crate::snapshot`]).
    pub fn snapshots(&self) -> PathBuf {
        self.cache.join("snapshots")
    }

    /// Named volumes: one `<name>.ext4` image each (the reference's
    /// `~/.cache/matchlock/volumes`). The one place this directory is computed.
    pub fn volumes(&self) -> PathBuf {
        self.cache.join("volumes")
    }
}

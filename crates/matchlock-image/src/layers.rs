//! Content-addressed storage of uncompressed layer tars (`layers/sha256/<diff-id>.tar`).
//!
//! # Design
//! - A layer blob is streamed once: positional reads from the spooled archive, sha256 of the
//!   blob bytes, decompression chosen by magic number (gzip, zstd, or plain tar; media types
//!   lie in the wild), sha256 of the uncompressed bytes, into a temp file in the store.
//!   Both digests are checked before the temp file is fsynced and renamed into place, so a
//!   layer file's name always matches its content.
//! - Uncompressed bytes are capped while they are written ([`Caps`]): per layer, and per
//!   image through a budget shared by all layers of one import or pull (pull downloads
//!   several layers at once). A layer that hits a cap fails with an error naming the limit
//!   and its environment variable; its temp file is dropped, so nothing is installed.
//! - Existing layer files are reused (dedup across images); a same-named file of a different
//!   size is treated as damaged and replaced.
//!
//! # Limitations
//! - Layers are stored uncompressed (they are the flattener's random-access input); disk use
//!   is roughly the uncompressed image size plus the squashfs.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::archive::{LayerSource, SliceReader};
use crate::{ENV_MAX_IMAGE_BYTES, ENV_MAX_LAYER_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("create temp file in {dir}")]
    CreateTemp {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("read or decompress layer {path:?}")]
    Decompress {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("write layer temp file")]
    WriteTemp(#[source] io::Error),
    #[error(
        "layer {path:?} blob digest mismatch: expected sha256:{expected}, got sha256:{actual}"
    )]
    BlobDigest {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("layer {path:?} blob size mismatch: descriptor says {expected}, blob is {actual}")]
    BlobSize {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("layer {path:?} diff id mismatch: config says sha256:{expected}, content is sha256:{actual}")]
    DiffId {
        path: String,
        expected: String,
        actual: String,
    },
    #[error(
        "layer {path:?} inflates past the per-layer limit of {limit} bytes; \
         raise {ENV_MAX_LAYER_BYTES} if the image is genuine"
    )]
    LayerTooLarge { path: String, limit: u64 },
    #[error(
        "image inflates past the per-image limit of {limit} bytes (at layer {path:?}); \
         raise {ENV_MAX_IMAGE_BYTES} if the image is genuine"
    )]
    ImageTooLarge { path: String, limit: u64 },
    #[error("install layer file {path}")]
    Persist {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    /// True when the layer was refused for exceeding a size cap.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            LayerError::LayerTooLarge { .. } | LayerError::ImageTooLarge { .. }
        )
    }
}

/// A layer stored in the blob store.
#[derive(Clone, Debug)]
pub(crate) struct StoredLayer {
    /// sha256 hex of the uncompressed tar.
    pub diff_id: String,
    pub path: PathBuf,
    pub size: u64,
}

/// Where a layer with this diff id lives.
pub(crate) fn layer_path(layers_dir: &Path, diff_hex: &str) -> PathBuf {
    layers_dir.join(format!("{diff_hex}.tar"))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Uncompressed bytes charged against one image's cap, shared by all its layers.
pub(crate) struct ImageBudget {
    used: AtomicU64,
    max: u64,
}

impl ImageBudget {
    pub(crate) fn new(max: u64) -> ImageBudget {
        ImageBudget {
            used: AtomicU64::new(0),
            max,
        }
    }

    /// Charges `n` bytes; on `false` (over the cap) nothing stays charged.
    pub(crate) fn charge(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.max {
            self.refund(n);
            return false;
        }
        true
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }

    pub(crate) fn refund(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The caps one layer write obeys.
pub(crate) struct Caps<'a> {
    /// Uncompressed bytes of this layer.
    pub layer: u64,
    pub image: &'a ImageBudget,
}

/// Which cap a write hit.
#[derive(Clone, Copy)]
enum Exceeded {
    Layer,
    Image,
}

struct HashingWriter<'a, W> {
    inner: W,
    hasher: Sha256,
    count: u64,
    caps: &'a Caps<'a>,
    exceeded: Option<Exceeded>,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let want = buf.len() as u64;
        if self.count.saturating_add(want) > self.caps.layer {
            self.exceeded = Some(Exceeded::Layer);
            return Err(io::Error::other("layer size limit reached"));
        }
        if !self.caps.image.charge(want) {
            self.exceeded = Some(Exceeded::Image);
            return Err(io::Error::other("image size limit reached"));
        }
        let n = match self.inner.write(buf) {
            Ok(n) => n,
            Err(e) => {
                self.caps.image.refund(want);
                return Err(e);
            }
        };
        self.caps.image.refund(want - n as u64);
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decompresses `src` into `out`; returns (blob sha256 hex, blob size).
fn decompress_into(src: impl Read, out: &mut impl Write) -> io::Result<(String, u64)> {
    let hashing = HashingReader {
        inner: src,
        hasher: Sha256::new(),
        count: 0,
    };
    let mut buf = BufReader::with_capacity(1 << 16, hashing);
    let head = buf.fill_buf()?;
    let mut buf = if head.starts_with(&[0x1f, 0x8b]) {
        let mut d = flate2::bufread::MultiGzDecoder::new(buf);
        io::copy(&mut d, out)?;
        d.into_inner()
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut d = zstd::stream::read::Decoder::with_buffer(buf)?;
        io::copy(&mut d, out)?;
        d.finish()
    } else {
        io::copy(&mut buf, out)?;
        buf
    };
    // Hash trailing bytes the decoder did not need (padding) so the blob digest is complete.
    io::copy(&mut buf, &mut io::sink())?;
    let h = buf.into_inner();
    Ok((hex::encode(h.hasher.finalize()), h.count))
}

/// What a layer blob must turn out to be.
pub(crate) struct Expected<'a> {
    /// Name for errors (archive member path or blob digest).
    pub name: &'a str,
    /// sha256 hex of the blob bytes, when known.
    pub blob_digest: Option<&'a str>,
    pub blob_size: Option<u64>,
    /// sha256 hex of the uncompressed tar.
    pub diff_id: &'a str,
}

/// Streams one layer out of the archive into the store, verifying its digests.
pub(crate) fn store_layer(
    archive: &File,
    src: &LayerSource,
    tmp_dir: &Path,
    layers_dir: &Path,
    caps: &Caps<'_>,
) -> Result<StoredLayer, LayerError> {
    let reader = SliceReader::new(archive, src.member.offset, src.member.size);
    let expected = Expected {
        name: &src.path,
        blob_digest: src.blob_digest.as_deref(),
        blob_size: src.blob_size,
        diff_id: &src.diff_id,
    };
    store_stream(reader, &expected, tmp_dir, layers_dir, false, caps)
}

/// Streams a (possibly compressed) layer blob into the store, verifying blob digest, blob
/// size and diff id before anything is installed. `replace` overwrites an existing file.
/// The layer's bytes stay charged to `caps.image` only if it is stored.
pub(crate) fn store_stream(
    reader: impl Read,
    exp: &Expected<'_>,
    tmp_dir: &Path,
    layers_dir: &Path,
    replace: bool,
    caps: &Caps<'_>,
) -> Result<StoredLayer, LayerError> {
    let mut charged = 0;
    let res = store_capped(
        reader,
        exp,
        tmp_dir,
        layers_dir,
        replace,
        caps,
        &mut charged,
    );
    if res.is_err() {
        caps.image.refund(charged);
    }
    res
}

fn store_capped(
    reader: impl Read,
    exp: &Expected<'_>,
    tmp_dir: &Path,
    layers_dir: &Path,
    replace: bool,
    caps: &Caps<'_>,
    charged: &mut u64,
) -> Result<StoredLayer, LayerError> {
    let mut tmp = tempfile::Builder::new()
        .prefix("layer-")
        .suffix(".tmp")
        .tempfile_in(tmp_dir)
        .map_err(|source| LayerError::CreateTemp {
            dir: tmp_dir.display().to_string(),
            source,
        })?;
    let mut w = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 16, tmp.as_file_mut()),
        hasher: Sha256::new(),
        count: 0,
        caps,
        exceeded: None,
    };
    let decompressed = decompress_into(reader, &mut w);
    *charged = w.count;
    let path = exp.name.to_owned();
    let (blob_hex, blob_size) = match (decompressed, w.exceeded) {
        (Ok(v), _) => v,
        (Err(_), Some(Exceeded::Layer)) => {
            return Err(LayerError::LayerTooLarge {
                path,
                limit: caps.layer,
            })
        }
        (Err(_), Some(Exceeded::Image)) => {
            return Err(LayerError::ImageTooLarge {
                path,
                limit: caps.image.max,
            })
        }
        (Err(source), None) => return Err(LayerError::Decompress { path, source }),
    };
    w.flush().map_err(LayerError::WriteTemp)?;
    let diff_hex = hex::encode(w.hasher.finalize_reset());
    let size = w.count;
    drop(w);
    if let Some(expected) = exp.blob_size {
        if expected != blob_size {
            return Err(LayerError::BlobSize {
                path: exp.name.to_owned(),
                expected,
                actual: blob_size,
            });
        }
    }
    if let Some(expected) = exp.blob_digest {
        if expected != blob_hex {
            return Err(LayerError::BlobDigest {
                path: exp.name.to_owned(),
                expected: expected.to_owned(),
                actual: blob_hex,
            });
        }
    }
    if exp.diff_id != diff_hex {
        return Err(LayerError::DiffId {
            path: exp.name.to_owned(),
            expected: exp.diff_id.to_owned(),
            actual: diff_hex,
        });
    }
    let dest = layer_path(layers_dir, &diff_hex);
    let persist_err = |source| LayerError::Persist {
        path: dest.display().to_string(),
        source,
    };
    match std::fs::metadata(&dest) {
        Ok(m) if m.len() == size && !replace => {
            tracing::debug!(diff_id = %diff_hex, "layer already stored");
        }
        _ => {
            // Temp files are 0600; stored blobs are world-readable like any cache.
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(persist_err)?;
            tmp.as_file().sync_all().map_err(persist_err)?;
            tmp.persist(&dest).map_err(|e| persist_err(e.error))?;
            File::open(layers_dir)
                .and_then(|d| d.sync_all())
                .map_err(persist_err)?;
        }
    }
    Ok(StoredLayer {
        diff_id: diff_hex,
        path: dest,
        size,
    })
}

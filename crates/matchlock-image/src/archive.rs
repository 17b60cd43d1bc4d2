//! The outer image archive: spooling, member index, and manifest/config resolution for
//! `docker save` archives (legacy `<id>/layer.tar` and Docker 25+ `blobs/sha256/...`) and
//! OCI image-layout archives.
//!
//! # Design
//! - The input is spooled once to an anonymous temp file inside the store (bounded memory,
//!   removed by the kernel even if we crash), optionally gunzipped on the way in.
//! - One pass over the outer tar records each member's data offset and size; members are then
//!   read in place with positional reads, never extracted. Symlinks and hard links between
//!   members (old `docker save` dedups layers this way) resolve lexically inside the archive.
//! - Every digest the format gives us is checked: OCI blobs and `blobs/sha256/<hex>` members
//!   by the sha256 of their bytes, `<hex>.json` configs likewise; layer diff ids are checked
//!   by the layer store.
//!
//! # Limitations
//! - One image per archive: `docker save` archives with several images must name the tag in
//!   `RepoTags`; OCI indexes resolve to linux/amd64 or their only manifest.
//! - Only sha256 digests are supported (all Docker/OCI tooling in practice).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// JSON documents larger than this are rejected.
pub(crate) const MAX_JSON: u64 = 4 << 20;
/// Manifests with more layers than this are rejected.
pub(crate) const MAX_LAYERS: usize = 256;
/// Members in the outer archive beyond this are rejected (bounds the index's memory).
const MAX_MEMBERS: usize = 100_000;
/// How many nested OCI indexes we follow.
const MAX_INDEX_DEPTH: usize = 4;
/// Symlink hops followed when resolving a member.
const MAX_LINK_HOPS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("create spool file in {dir}")]
    CreateSpool {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("spool archive")]
    Spool(#[source] io::Error),
    #[error("read archive entries")]
    ReadEntries(#[source] io::Error),
    #[error("archive member path {path:?} is absolute or contains '..'")]
    BadMemberPath { path: String },
    #[error("archive member path is not UTF-8")]
    NonUtf8Path,
    #[error("archive has more than {MAX_MEMBERS} members")]
    TooManyMembers,
    #[error("archive member not found: {path:?}")]
    MissingMember { path: String },
    #[error("archive member links loop or escape the archive: {path:?}")]
    BadMemberLink { path: String },
    #[error("{path:?} is {size} bytes (JSON limit {MAX_JSON})")]
    JsonTooLarge { path: String, size: u64 },
    #[error("read archive member {path:?}")]
    ReadMember {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("parse {path:?}")]
    ParseJson {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("not an image archive (no manifest.json or index.json)")]
    NotAnImage,
    #[error("manifest.json lists {count} images and none is tagged {tag:?}")]
    AmbiguousManifest { count: usize, tag: String },
    #[error("OCI index has {count} manifests and none for linux/amd64")]
    NoPlatform { count: usize },
    #[error("OCI indexes nested deeper than {MAX_INDEX_DEPTH}")]
    IndexTooDeep,
    #[error("unsupported digest {digest:?} (want sha256:<64 hex>)")]
    BadDigest { digest: String },
    #[error("digest mismatch for {path:?}: expected sha256:{expected}, got sha256:{actual}")]
    DigestMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch for {path:?}: descriptor says {expected}, blob is {actual}")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("image has {count} layers (limit {MAX_LAYERS})")]
    TooManyLayers { count: usize },
    #[error("image has no layers")]
    NoLayers,
    #[error("image has {layers} layers but its config lists {diff_ids} diff ids")]
    DiffIdCount { layers: usize, diff_ids: usize },
}

/// Where a member's bytes live in the spooled archive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member {
    pub offset: u64,
    pub size: u64,
}

enum Slot {
    Data(Member),
    Symlink(String),
    HardLink(String),
}

/// The spooled outer archive with its member index.
pub(crate) struct OuterArchive {
    file: File,
    members: HashMap<String, Slot>,
}

/// Reads `[pos, end)` of a file with positional reads; EOF before `end` is an error.
pub(crate) struct SliceReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl<'a> SliceReader<'a> {
    pub(crate) fn new(file: &'a File, offset: u64, size: u64) -> Self {
        SliceReader {
            file,
            pos: offset,
            end: offset.saturating_add(size),
        }
    }
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than recorded",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Normalises an archive path: strips leading `./`, drops `.` and empty components.
/// `None` for absolute paths or any `..` component.
pub(crate) fn normalize_member(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Resolves `target` relative to `base_dir` lexically; `None` if it escapes the root.
fn resolve_relative(base_dir: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        base_dir.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Parses `sha256:<64 lower hex>` into the hex part.
pub(crate) fn parse_digest(d: &str) -> Result<String, ArchiveError> {
    match d.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h.to_owned())
        }
        _ => Err(ArchiveError::BadDigest {
            digest: d.to_owned(),
        }),
    }
}

/// The hex digest a member's name promises (`blobs/sha256/<hex>` or `<hex>.json`), if any.
fn digest_from_name(path: &str) -> Option<String> {
    let name = path
        .strip_prefix("blobs/sha256/")
        .or_else(|| path.strip_suffix(".json"))?;
    parse_digest(&format!("sha256:{name}")).ok()
}

impl OuterArchive {
    /// Spools `input` into an anonymous temp file in `tmp_dir` and indexes it.
    pub(crate) fn spool(tmp_dir: &Path, input: impl Read) -> Result<Self, ArchiveError> {
        let mut file =
            tempfile::tempfile_in(tmp_dir).map_err(|source| ArchiveError::CreateSpool {
                dir: tmp_dir.display().to_string(),
                source,
            })?;
        let mut input = BufReader::with_capacity(1 << 16, input);
        let head = input.fill_buf().map_err(ArchiveError::Spool)?;
        let gz = head.starts_with(&[0x1f, 0x8b]);
        {
            let mut w = io::BufWriter::with_capacity(1 << 16, &mut file);
            if gz {
                io::copy(&mut flate2::bufread::MultiGzDecoder::new(input), &mut w)
                    .map_err(ArchiveError::Spool)?;
            } else {
                io::copy(&mut input, &mut w).map_err(ArchiveError::Spool)?;
            }
            w.flush().map_err(ArchiveError::Spool)?;
        }
        file.rewind().map_err(ArchiveError::Spool)?;
        let members = index_members(&file)?;
        Ok(OuterArchive { file, members })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Looks a member up by (normalised) path, following member links.
    pub(crate) fn member(&self, path: &str) -> Result<Member, ArchiveError> {
        let mut cur = normalize_member(path).ok_or_else(|| ArchiveError::BadMemberPath {
            path: path.to_owned(),
        })?;
        for _ in 0..MAX_LINK_HOPS {
            match self.members.get(&cur) {
                None => {
                    return Err(ArchiveError::MissingMember {
                        path: path.to_owned(),
                    })
                }
                Some(Slot::Data(m)) => return Ok(*m),
                Some(Slot::HardLink(t)) => cur = t.clone(),
                Some(Slot::Symlink(t)) => {
                    let dir = cur.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    cur = resolve_relative(dir, t).ok_or_else(|| ArchiveError::BadMemberLink {
                        path: path.to_owned(),
                    })?;
                }
            }
        }
        Err(ArchiveError::BadMemberLink {
            path: path.to_owned(),
        })
    }

    fn has(&self, path: &str) -> bool {
        self.members.contains_key(path)
    }

    /// Reads a member fully (only used for JSON, so bounded by [`MAX_JSON`]).
    fn read_json_bytes(&self, path: &str) -> Result<Vec<u8>, ArchiveError> {
        let m = self.member(path)?;
        if m.size > MAX_JSON {
            return Err(ArchiveError::JsonTooLarge {
                path: path.to_owned(),
                size: m.size,
            });
        }
        let mut buf = Vec::with_capacity(usize::try_from(m.size).unwrap_or(0));
        SliceReader::new(&self.file, m.offset, m.size)
            .read_to_end(&mut buf)
            .map_err(|source| ArchiveError::ReadMember {
                path: path.to_owned(),
                source,
            })?;
        if let Some(expected) = digest_from_name(&normalize_member(path).unwrap_or_default()) {
            check_digest(path, &expected, &buf)?;
        }
        Ok(buf)
    }

    fn read_json<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Vec<u8>), ArchiveError> {
        let bytes = self.read_json_bytes(path)?;
        let v = serde_json::from_slice(&bytes).map_err(|source| ArchiveError::ParseJson {
            path: path.to_owned(),
            source,
        })?;
        Ok((v, bytes))
    }
}

fn check_digest(path: &str, expected: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
    let actual = hex::encode(Sha256::digest(bytes));
    if actual != expected {
        return Err(ArchiveError::DigestMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn index_members(file: &File) -> Result<HashMap<String, Slot>, ArchiveError> {
    let mut members = HashMap::new();
    let mut ar = tar::Archive::new(BufReader::new(file));
    for entry in ar.entries_with_seek().map_err(ArchiveError::ReadEntries)? {
        let entry = entry.map_err(ArchiveError::ReadEntries)?;
        let raw = entry.path_bytes();
        let raw = std::str::from_utf8(&raw)
            .map_err(|_| ArchiveError::NonUtf8Path)?
            .to_owned();
        let path =
            normalize_member(&raw).ok_or(ArchiveError::BadMemberPath { path: raw.clone() })?;
        let link = || -> Result<String, ArchiveError> {
            let l = entry.link_name_bytes().unwrap_or_default();
            Ok(std::str::from_utf8(&l)
                .map_err(|_| ArchiveError::NonUtf8Path)?
                .to_owned())
        };
        let slot = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Slot::Data(Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }),
            tar::EntryType::Symlink => Slot::Symlink(link()?),
            tar::EntryType::Link => {
                let t = link()?;
                Slot::HardLink(normalize_member(&t).ok_or(ArchiveError::BadMemberPath { path: t })?)
            }
            _ => continue,
        };
        if members.len() >= MAX_MEMBERS {
            return Err(ArchiveError::TooManyMembers);
        }
        members.insert(path, slot);
    }
    Ok(members)
}

/// One layer blob to ingest.
#[derive(Clone, Debug)]
pub(crate) struct LayerSource {
    pub path: String,
    pub member: Member,
    /// sha256 hex the blob bytes must have, when the format tells us.
    pub blob_digest: Option<String>,
    /// Size the descriptor promises, when the format tells us.
    pub blob_size: Option<u64>,
    /// sha256 hex of the uncompressed tar (from the config's diff ids).
    pub diff_id: String,
}

/// The image an archive holds, resolved and with its JSON verified.
#[derive(Debug)]
pub(crate) struct ResolvedImage {
    /// `sha256:<hex>`: the manifest digest (OCI) or the config digest (docker save).
    pub digest: String,
    pub config: RawConfig,
    pub layers: Vec<LayerSource>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize, Clone)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize, Clone)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn diff_ids(config: &RawConfig, layers: usize) -> Result<Vec<String>, ArchiveError> {
    if layers == 0 {
        return Err(ArchiveError::NoLayers);
    }
    if layers > MAX_LAYERS {
        return Err(ArchiveError::TooManyLayers { count: layers });
    }
    let ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.as_slice())
        .unwrap_or_default();
    if ids.len() != layers {
        return Err(ArchiveError::DiffIdCount {
            layers,
            diff_ids: ids.len(),
        });
    }
    ids.iter().map(|d| parse_digest(d)).collect()
}

impl OuterArchive {
    /// Finds the image in the archive; `tag` disambiguates multi-image `docker save` files.
    pub(crate) fn resolve(&self, tag: &str) -> Result<ResolvedImage, ArchiveError> {
        if self.has("manifest.json") {
            self.resolve_docker(tag)
        } else if self.has("index.json") {
            self.resolve_oci()
        } else {
            Err(ArchiveError::NotAnImage)
        }
    }

    fn resolve_docker(&self, tag: &str) -> Result<ResolvedImage, ArchiveError> {
        let (manifests, _) = self.read_json::<Vec<DockerManifest>>("manifest.json")?;
        let count = manifests.len();
        let m = if count == 1 {
            manifests.into_iter().next()
        } else {
            manifests
                .into_iter()
                .find(|m| m.repo_tags.iter().flatten().any(|t| t == tag))
        };
        let m = m.ok_or_else(|| ArchiveError::AmbiguousManifest {
            count,
            tag: tag.to_owned(),
        })?;
        if m.layers.len() > MAX_LAYERS {
            return Err(ArchiveError::TooManyLayers {
                count: m.layers.len(),
            });
        }
        let (config, config_bytes) = self.read_json::<RawConfig>(&m.config)?;
        let ids = diff_ids(&config, m.layers.len())?;
        let layers = m
            .layers
            .iter()
            .zip(ids)
            .map(|(p, diff_id)| {
                Ok(LayerSource {
                    path: p.clone(),
                    member: self.member(p)?,
                    blob_digest: normalize_member(p).as_deref().and_then(digest_from_name),
                    blob_size: None,
                    diff_id,
                })
            })
            .collect::<Result<Vec<_>, ArchiveError>>()?;
        Ok(ResolvedImage {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
            config,
            layers,
        })
    }

    fn blob_json<T: DeserializeOwned>(&self, d: &Descriptor) -> Result<(T, Vec<u8>), ArchiveError> {
        let hex = parse_digest(&d.digest)?;
        let path = format!("blobs/sha256/{hex}");
        let (v, bytes) = self.read_json::<T>(&path)?;
        if let Some(size) = d.size {
            if size != bytes.len() as u64 {
                return Err(ArchiveError::SizeMismatch {
                    path,
                    expected: size,
                    actual: bytes.len() as u64,
                });
            }
        }
        Ok((v, bytes))
    }

    fn resolve_oci(&self) -> Result<ResolvedImage, ArchiveError> {
        let (mut index, _) = self.read_json::<OciIndex>("index.json")?;
        for _ in 0..MAX_INDEX_DEPTH {
            let desc = pick_manifest(&index.manifests)?;
            if desc.media_type.contains("index") || desc.media_type.contains("manifest.list") {
                index = self.blob_json::<OciIndex>(&desc)?.0;
                continue;
            }
            let (manifest, manifest_bytes) = self.blob_json::<OciManifest>(&desc)?;
            if manifest.layers.len() > MAX_LAYERS {
                return Err(ArchiveError::TooManyLayers {
                    count: manifest.layers.len(),
                });
            }
            let (config, _) = self.blob_json::<RawConfig>(&manifest.config)?;
            let ids = diff_ids(&config, manifest.layers.len())?;
            let layers = manifest
                .layers
                .iter()
                .zip(ids)
                .map(|(l, diff_id)| {
                    let hex = parse_digest(&l.digest)?;
                    let path = format!("blobs/sha256/{hex}");
                    Ok(LayerSource {
                        member: self.member(&path)?,
                        path,
                        blob_digest: Some(hex),
                        blob_size: l.size,
                        diff_id,
                    })
                })
                .collect::<Result<Vec<_>, ArchiveError>>()?;
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest_bytes)));
            return Ok(ResolvedImage {
                digest,
                config,
                layers,
            });
        }
        Err(ArchiveError::IndexTooDeep)
    }
}

fn pick_manifest(descs: &[Descriptor]) -> Result<Descriptor, ArchiveError> {
    if let [only] = descs {
        return Ok(only.clone());
    }
    descs
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .cloned()
        .ok_or(ArchiveError::NoPlatform { count: descs.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_member_paths() {
        assert_eq!(normalize_member("./a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(
            normalize_member("manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(normalize_member("/etc/passwd"), None);
        assert_eq!(normalize_member("a/../../b"), None);
        assert_eq!(
            resolve_relative("abc", "../def/layer.tar").as_deref(),
            Some("def/layer.tar")
        );
        assert_eq!(resolve_relative("abc", "../../x"), None);
    }

    #[test]
    fn digests_parse_strictly() {
        let h = "a".repeat(64);
        assert_eq!(parse_digest(&format!("sha256:{h}")).expect("valid"), h);
        assert!(parse_digest("sha512:abc").is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert_eq!(
            digest_from_name(&format!("blobs/sha256/{h}")),
            Some(h.clone())
        );
        assert_eq!(digest_from_name(&format!("{h}.json")), Some(h));
        assert_eq!(digest_from_name("manifest.json"), None);
    }
}

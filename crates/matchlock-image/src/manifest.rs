//! Registry manifests: Docker v2 schema 2 and OCI image manifests, manifest lists and OCI
//! indexes, and picking the host's platform out of an index.
//!
//! # Design
//! - Documents are read with a hard size cap and hashed as read; a manifest fetched by
//!   digest must hash to that digest, and the digest of what we got is what we record.
//! - The media type comes from the `Content-Type` header, else the document's `mediaType`,
//!   else the shape (`manifests` means an index). Schema 1 manifests are rejected.
//!
//! # Limitations
//! - Platform matching uses os/architecture (and `v8` or no variant on arm64); `os.version`
//!   and features are ignored.

use std::io::Read;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::reference::valid_digest;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Everything we can use, for the `Accept` header.
pub(crate) const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Layer media types we can unpack (compression is detected from the bytes).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("{what} is {actual} bytes, descriptor says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} is not valid JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported manifest media type {media_type:?} (schema 1 and non-image artifacts are not supported)")]
    MediaType { media_type: String },
    #[error("manifest has no config or layers")]
    NotImage,
    #[error("invalid digest {digest:?} in {what}")]
    BadDigest { what: String, digest: String },
    #[error("unsupported layer media type {media_type:?}")]
    LayerType { media_type: String },
    #[error("no image for platform {wanted} in the index (available: {available})")]
    NoPlatform { wanted: String, available: String },
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub(crate) enum Manifest {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Reads at most `limit` bytes; returns the body and its `sha256:<hex>` digest.
pub(crate) fn read_bounded(
    r: impl Read,
    what: &str,
    limit: u64,
) -> Result<(Vec<u8>, String), ManifestError> {
    let mut body = Vec::new();
    r.take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|source| ManifestError::Read {
            what: what.to_owned(),
            source,
        })?;
    if body.len() as u64 > limit {
        return Err(ManifestError::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    Ok((body, digest))
}

/// Checks a fetched document against its expected digest (and size, when known).
pub(crate) fn verify(
    what: &str,
    body: &[u8],
    actual: &str,
    expected: &str,
    size: Option<u64>,
) -> Result<(), ManifestError> {
    if let Some(size) = size {
        if body.len() as u64 != size {
            return Err(ManifestError::SizeMismatch {
                what: what.to_owned(),
                expected: size,
                actual: body.len() as u64,
            });
        }
    }
    if actual != expected {
        return Err(ManifestError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        });
    }
    Ok(())
}

fn check_digest(d: &Descriptor, what: &str) -> Result<(), ManifestError> {
    if valid_digest(&d.digest) {
        Ok(())
    } else {
        Err(ManifestError::BadDigest {
            what: what.to_owned(),
            digest: d.digest.chars().take(100).collect(),
        })
    }
}

/// Parses a manifest body; `content_type` is the response header, if any.
pub(crate) fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(body).map_err(|source| ManifestError::Json {
        what: "manifest".to_owned(),
        source,
    })?;
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_owned())
        .filter(|c| c.starts_with("application/vnd."));
    let media_type = header.or(raw.media_type.clone()).unwrap_or_default();
    let is_index = match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" if raw.schema_version == 2 => raw.manifests.is_some(),
        other => {
            return Err(ManifestError::MediaType {
                media_type: other.to_owned(),
            })
        }
    };
    if is_index {
        let manifests = raw.manifests.unwrap_or_default();
        for m in &manifests {
            check_digest(m, "index")?;
        }
        return Ok(Manifest::Index(manifests));
    }
    let (Some(config), Some(layers)) = (raw.config, raw.layers) else {
        return Err(ManifestError::NotImage);
    };
    check_digest(&config, "manifest config")?;
    for l in &layers {
        check_digest(l, "manifest layers")?;
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ManifestError::LayerType {
                media_type: l.media_type.chars().take(100).collect(),
            });
        }
    }
    Ok(Manifest::Image { config, layers })
}

/// The host's platform in OCI terms (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Picks the linux/`arch` entry of an index.
pub(crate) fn select_platform<'a>(
    manifests: &'a [Descriptor],
    arch: &str,
) -> Result<&'a Descriptor, ManifestError> {
    let matches = |d: &&Descriptor, strict_variant: bool| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == "linux"
                && p.architecture == arch
                && (!strict_variant
                    || arch != "arm64"
                    || matches!(p.variant.as_deref(), None | Some("") | Some("v8")))
        })
    };
    manifests
        .iter()
        .find(|d| matches(d, true))
        .or_else(|| manifests.iter().find(|d| matches(d, false)))
        .ok_or_else(|| ManifestError::NoPlatform {
            wanted: format!("linux/{arch}"),
            available: manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn index_platform_selection() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let Manifest::Index(ms) = parse(body.as_bytes(), None).expect("parse") else {
            panic!("not an index");
        };
        assert_eq!(select_platform(&ms, "amd64").expect("amd64").digest, d('b'));
        assert_eq!(select_platform(&ms, "arm64").expect("arm64").digest, d('a'));
        let e = select_platform(&ms, "s390x").expect_err("no s390x");
        assert!(e.to_string().contains("linux/amd64"), "{e}");
    }

    #[test]
    fn image_manifest_checks() {
        let ok = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{}","size":3}}]}}"#,
            d('a'),
            d('b')
        );
        assert!(matches!(
            parse(ok.as_bytes(), Some(DOCKER_MANIFEST)),
            Ok(Manifest::Image { .. })
        ));
        let helm = ok.replace(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/x-helm",
        );
        assert!(matches!(
            parse(helm.as_bytes(), Some(OCI_MANIFEST)),
            Err(ManifestError::LayerType { .. })
        ));
        assert!(matches!(
            parse(
                ok.as_bytes(),
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws")
            ),
            Err(ManifestError::MediaType { .. })
        ));
        let bad = ok.replace(&d('b'), "sha256:../../etc");
        assert!(matches!(
            parse(bad.as_bytes(), None),
            Err(ManifestError::BadDigest { .. })
        ));
        assert!(matches!(
            parse(b"<html>", None),
            Err(ManifestError::Json { .. })
        ));
    }

    #[test]
    fn bounded_read_and_verify() {
        let (body, digest) = read_bounded(&b"hello"[..], "x", 5).expect("fits");
        assert!(verify("x", &body, &digest, &digest, Some(5)).is_ok());
        assert!(verify("x", &body, &digest, &d('a'), None).is_err());
        assert!(verify("x", &body, &digest, &digest, Some(4)).is_err());
        assert!(matches!(
            read_bounded(&b"hello!"[..], "x", 5),
            Err(ManifestError::TooLarge { .. })
        ));
    }
}

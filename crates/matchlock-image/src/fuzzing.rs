//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the parsers of registry
//! responses and of the Docker client config, which are crate-private otherwise.
//!
//! # Design
//! Each function is a thin call into the real parser, so the fuzzer exercises exactly the
//! code a pull runs; nothing here is used outside fuzzing.

use crate::auth::{self, Source};
use crate::manifest::{self, Manifest, ManifestError};
use crate::AuthError;

/// Parses a manifest or index as a pull does (`content_type` is the response header) and,
/// for an index, picks the linux/amd64 and linux/arm64 entries.
pub fn manifest(body: &[u8], content_type: Option<&str>) -> Result<(), ManifestError> {
    match manifest::parse(body, content_type)? {
        Manifest::Index(entries) => {
            let amd64 = manifest::select_platform(&entries, "amd64");
            let arm64 = manifest::select_platform(&entries, "arm64");
            amd64.and(arm64).map(|_| ())
        }
        Manifest::Image { .. } => Ok(()),
    }
}

/// Parses a Docker config document and resolves `registry`'s credentials, running no helper;
/// returns the helper's name when one would be asked.
pub fn docker_config(bytes: &[u8], registry: &str) -> Result<Option<String>, AuthError> {
    Ok(match auth::resolve(bytes, registry, "fuzz")? {
        Source::Helper(h) => Some(h),
        Source::Config(_) => None,
    })
}

/// Parses a `WWW-Authenticate` header; true when it is a usable challenge.
pub fn challenge(header: &str) -> bool {
    auth::parse_challenge(header).is_some()
}

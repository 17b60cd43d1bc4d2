//! Registry manifests and indexes (Docker v2 / OCI) as a pull parses them, with each
//! `Content-Type` a registry may send, then platform selection: never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_image::fuzzing::manifest;

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
    Some("application/json"),
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the header, the rest is the body.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let _ = manifest(body, CONTENT_TYPES[usize::from(pick) % CONTENT_TYPES.len()]);
});

//! The Docker client config (`~/.docker/config.json`) resolved for a registry, and registry
//! `WWW-Authenticate` challenges, on arbitrary bytes: never panic, never run a helper.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_image::fuzzing::{challenge, docker_config};

const REGISTRIES: &[&str] = &["docker.io", "ghcr.io", "localhost:5000", "127.0.0.1:5000"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let _ = docker_config(rest, REGISTRIES[usize::from(pick) % REGISTRIES.len()]);
    if let Ok(header) = std::str::from_utf8(rest) {
        let _ = challenge(header);
    }
});

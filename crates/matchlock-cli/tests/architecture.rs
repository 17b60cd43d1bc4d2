//! The workspace's dependency rules (DESIGN §4): sibling subsystems never depend on each
//! other, leaf crates depend on no other matchlock crate, and only the composition layers
//! see the subsystems.

use std::collections::BTreeMap;
use std::path::Path;

fn deps_of(crate_dir: &Path) -> Vec<String> {
    let toml = std::fs::read_to_string(crate_dir.join("Cargo.toml")).expect("Cargo.toml");
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in toml.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            // Normal dependencies only: dev-dependencies may use test fixtures.
            in_deps = l == "[dependencies]";
            continue;
        }
        if in_deps {
            if let Some(name) = l
                .split(['=', '.', ' '])
                .next()
                .filter(|n| n.starts_with("matchlock-"))
            {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[test]
fn dependency_edges_point_down() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("matchlock-api", &[][..]),
        ("matchlock-guest-proto", &[][..]),
        // The SDK spawns `matchlock rpc` and speaks the shared JSON-RPC contract
        // (`matchlock_api::rpc`); it links no subsystem.
        ("matchlock-sdk", &["matchlock-api"][..]),
        ("matchlock-image", &["matchlock-api"][..]),
        (
            "matchlock-vm",
            &["matchlock-api", "matchlock-guest-proto"][..],
        ),
        ("matchlock-state", &["matchlock-api"][..]),
        ("matchlock-net", &["matchlock-api"][..]),
        ("matchlock-vfs", &["matchlock-api"][..]),
        ("matchlock-guest", &["matchlock-guest-proto"][..]),
        (
            "matchlock-sandbox",
            &[
                "matchlock-api",
                "matchlock-guest-proto",
                "matchlock-image",
                "matchlock-vm",
                "matchlock-state",
                "matchlock-net",
                "matchlock-vfs",
            ][..],
        ),
        (
            "matchlock-rpc",
            &[
                "matchlock-api",
                "matchlock-guest-proto",
                "matchlock-image",
                "matchlock-vm",
                "matchlock-state",
                "matchlock-sandbox",
            ][..],
        ),
        (
            "matchlock-cli",
            &[
                "matchlock-rpc",
                "matchlock-api",
                "matchlock-guest-proto",
                "matchlock-image",
                "matchlock-vm",
                "matchlock-state",
                "matchlock-sandbox",
            ][..],
        ),
        (
            "matchlock-test-support",
            &["matchlock-api", "matchlock-guest-proto", "matchlock-image"][..],
        ),
        (
            "matchlock-bench",
            &[
                "matchlock-api",
                "matchlock-guest-proto",
                "matchlock-image",
                "matchlock-vm",
                "matchlock-state",
                "matchlock-sandbox",
                "matchlock-test-support",
                "matchlock-net",
            ][..],
        ),
    ]);
    let mut seen = 0;
    for entry in std::fs::read_dir(&crates).expect("crates dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().join("Cargo.toml").is_file() {
            continue;
        }
        let allow = allowed
            .get(name.as_str())
            .unwrap_or_else(|| panic!("new crate {name}: add its allowed edges here"));
        for d in deps_of(&entry.path()) {
            assert!(allow.contains(&d.as_str()), "{name} must not depend on {d}");
        }
        seen += 1;
    }
    assert_eq!(seen, allowed.len());
}

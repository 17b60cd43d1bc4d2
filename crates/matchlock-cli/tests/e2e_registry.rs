//! Registry pulls end to end: a real `docker-registry` on 127.0.0.1 with the busybox test
//! image pushed to it, then `pull`, `run`, `run --pull`, `pull -t`, `pull --force`,
//! `image ls`, `image rm`, `image gc` through the CLI.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{env, ok, stderr, stdout};
use matchlock_test_support::{busybox_spec, Registry};

/// Allocated bytes of all layer and rootfs files in the test HOME's image store.
fn blob_usage(home: &Path) -> u64 {
    let root = home.join(".cache/matchlock/images");
    ["layers/sha256", "rootfs"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("read_dir"))
        .map(|e| e.expect("entry").metadata().expect("meta").blocks() * 512)
        .sum()
}

fn line_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        .trim()
        .to_owned()
}

#[test]
fn pull_run_tag_force_rm_gc() {
    let e = env();
    let reg = Registry::start().expect("start docker-registry");
    let mut spec = busybox_spec().expect("busybox");
    spec.gzip = true;
    let pushed = reg.push("tools/busybox", "1.0", &spec).expect("push");
    let reference = format!("{}/tools/busybox:1.0", reg.addr);

    let out = ok(&e.run(&["pull", &reference]));
    assert!(out.contains(&format!("Pulling {reference}...")), "{out}");
    assert_eq!(line_value(&out, "Digest:"), pushed);
    assert!(line_value(&out, "Size:").ends_with(" MB"), "{out}");

    // The cached image boots.
    let out = ok(&e.run(&["run", "--image", &reference, "--", "cat", "/etc/os-release"]));
    assert!(out.contains("Matchlock Busybox"), "{out}");

    // A tag alias adds no bytes; repeated forced pulls keep usage stable.
    let usage = blob_usage(e.home.path());
    let out = ok(&e.run(&["pull", "-t", "bb:alias", &reference]));
    assert!(out.contains("Tagged: bb:alias"), "{out}");
    assert_eq!(blob_usage(e.home.path()), usage);
    for _ in 0..2 {
        ok(&e.run(&["pull", "--force", &reference]));
        assert_eq!(blob_usage(e.home.path()), usage);
    }
    let ls = ok(&e.run(&["image", "ls"]));
    let row = |tag: &str| {
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(tag))
            .unwrap_or_else(|| panic!("{tag} not listed: {ls}"))
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
    };
    assert_eq!(row(&reference).as_deref(), Some("registry"));
    assert_eq!(row("bb:alias").as_deref(), Some("tag"));

    // By digest, with run --pull (always contacts the registry).
    let by_digest = format!("{}/tools/busybox@{pushed}", reg.addr);
    let out = e.run(&[
        "run", "--pull", "--image", &by_digest, "--", "echo", "pinned",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "pinned");

    // rm twice: second fails; gc then has nothing referenced by the removed rows.
    ok(&e.run(&["image", "rm", "bb:alias"]));
    let again = e.run(&["image", "rm", "bb:alias"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("image not found"),
        "{}",
        stderr(&again)
    );
    ok(&e.run(&["image", "rm", &reference]));
    ok(&e.run(&["image", "rm", &by_digest]));
    assert!(ok(&e.run(&["image", "gc"])).contains("Removed"));
    assert!(!ok(&e.run(&["image", "ls"])).contains(&reg.addr));
}

#[test]
fn pull_errors_are_clear() {
    let e = env();
    let bad = e.run(&["pull", "Not/Valid"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("parse image reference") && stderr(&bad).contains("lowercase"),
        "{}",
        stderr(&bad)
    );
    let reg = Registry::start().expect("start docker-registry");
    let missing = e.run(&["pull", &format!("{}/no/such:tag", reg.addr)]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not found") && stderr(&missing).contains("unknown"),
        "{}",
        stderr(&missing)
    );
    assert!(!e.run(&["pull"]).status.success());
}

/// RPC `create` of an image that is only in a registry pulls it, as `run` does (issue 8
/// item 15).
#[test]
fn rpc_create_pulls_like_run() {
    let e = env();
    let reg = Registry::start().expect("start docker-registry");
    let spec = busybox_spec().expect("busybox");
    reg.push("rpc/busybox", "2.0", &spec).expect("push");
    let reference = format!("{}/rpc/busybox:2.0", reg.addr);
    let mut rpc = common::rpc::Rpc::start();
    let r = rpc.call("create", serde_json::json!({"image": reference}), 1);
    assert!(r["id"].is_string(), "{r}");
    let r = rpc.call(
        "exec",
        serde_json::json!({"command": "cat /etc/os-release"}),
        2,
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let ls = ok(&e.run(&["image", "ls"]));
    assert!(ls.contains("rpc/busybox"), "{ls}");
    rpc.call("close", serde_json::json!({}), 3);
    assert!(rpc.finish().success());
}

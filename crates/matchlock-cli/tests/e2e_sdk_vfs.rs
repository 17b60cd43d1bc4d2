//! The published Python SDK 0.2.17's VFS interception and mount types, unchanged, against a
//! real VM whose workspace holds host_fs, memory and overlay mounts (spec §9.3-§9.5, §12.5;
//! reference scenarios 142-145): wire block rules
//! refuse guest and SDK file operations before they reach the host directory, file events
//! drive the SDK's after-hooks (safe hooks without recursion, dangerous hooks re-entrant), and
//! the SDK's local mutate hook rewrites a write; memory and overlay mounts behave as trees
//! whose changes never reach the host. tests/python/sdk_vfs.py prints what the SDK
//! and guest saw; this side also checks the host directory.

mod common;

use serde_json::Value;

#[test]
fn python_sdk_vfs_interception() {
    let e = common::env();
    let host = tempfile::tempdir().expect("tempdir");
    let lower = tempfile::tempdir().expect("tempdir");
    let l = lower.path();
    std::fs::write(l.join("seed.txt"), "seed\n").expect("seed");
    std::fs::write(l.join("gone.txt"), "gone\n").expect("seed");
    std::fs::create_dir(l.join("dir")).expect("seed");
    std::fs::write(l.join("dir/inner.txt"), "inner\n").expect("seed");
    let mut c = e.python_sdk("sdk_vfs.py");
    c.env("WORKDIR", host.path()).env("LOWER", l);
    let out = c.output().expect("run the SDK VFS scenario");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let h = host.path();

    // 142: the block rule refuses the create from the SDK and from a guest shell; nothing
    // reaches the host. A neighbouring name is unaffected.
    let sdk = v["sdk_blocked"].as_str().unwrap_or_default();
    assert!(sdk.starts_with("error"), "{v}");
    let shell = &v["shell_blocked"];
    assert!(
        shell["out"].as_str().unwrap_or_default().contains("rc=1"),
        "{v}"
    );
    assert!(
        shell["err"]
            .as_str()
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "{v}"
    );
    assert!(!h.join("blocked.txt").exists());
    assert_eq!(v["ok"]["out"], "ok", "{v}");
    assert_eq!(std::fs::read(h.join("ok.txt")).expect("ok.txt"), b"ok");
    // A write rule: the file may be created, but no byte is written.
    assert!(
        v["locked"]["out"]
            .as_str()
            .unwrap_or_default()
            .contains("rc=1"),
        "{v}"
    );
    let locked = std::fs::read(h.join("locked/f")).unwrap_or_default();
    assert!(locked.is_empty(), "{locked:?}");

    // 143: the SDK's mutate hook replaced the bytes before they were sent.
    assert_eq!(v["mutated"], "mutated-by-hook", "{v}");
    assert_eq!(
        std::fs::read(h.join("mutate.txt")).expect("mutate.txt"),
        b"mutated-by-hook"
    );

    // 145: the safe hook ran once for the trigger; the write it made itself was suppressed.
    let safe = v["safe_runs"].as_array().cloned().unwrap_or_default();
    assert_eq!(safe.len(), 1, "{v}");
    assert_eq!(safe[0]["path"], "/workspace/host/s/trigger.txt", "{v}");
    assert_eq!(safe[0]["op"], "write", "{v}");
    assert_eq!(safe[0]["size"], 3, "{v}");
    assert_eq!(v["callback_log"]["out"], "callback\n", "{v}");

    // 144: the dangerous hook re-entered for its own write, boundedly.
    let runs = v["dangerous_runs"].as_u64().unwrap_or_default();
    assert!((2..=4).contains(&runs), "{v}");
    assert_eq!(v["hook_log"]["out"], "hook\n", "{v}");

    // memory: a real tree in the owner (rename moves the file).
    assert_eq!(v["mem"]["out"], "m\nb\n", "{v}");
    // overlay: the guest sees the host tree and changes it freely; the host tree is unchanged.
    assert_eq!(
        v["ov"]["out"], "seed\nchanged\ninner\nmoved\nnew.txt\nseed.txt\n",
        "{v}"
    );
    assert_eq!(
        std::fs::read_to_string(l.join("seed.txt")).expect("seed"),
        "seed\n"
    );
    assert_eq!(
        std::fs::read_to_string(l.join("gone.txt")).expect("gone"),
        "gone\n"
    );
    assert_eq!(
        std::fs::read_to_string(l.join("dir/inner.txt")).expect("inner"),
        "inner\n"
    );
    assert!(!l.join("new.txt").exists() && !l.join("moved").exists());
    // The router synthesises the workspace root holding the three mounts.
    assert_eq!(v["ls_ws"]["out"], "host\nmem\nov\n", "{v}");
}

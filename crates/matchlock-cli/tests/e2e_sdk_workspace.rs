//! The published Python SDK 0.2.17's workspace builders, unchanged, against a real VM:
//! `with_workspace`, `mount_host_dir` and `mount_host_dir_readonly` (spec §12.3, §13.2
//! scenario 89). tests/python/sdk_workspace.py prints what the guest saw; this side checks
//! the host directories.

mod common;

use serde_json::Value;

#[test]
fn python_sdk_host_dir_mounts() {
    let e = common::env();
    let tmp = tempfile::tempdir().expect("tmp");
    let rw = tmp.path().join("rw");
    let ro = tmp.path().join("ro");
    std::fs::create_dir_all(&rw).expect("mkdir");
    std::fs::create_dir_all(&ro).expect("mkdir");
    std::fs::write(ro.join("host.txt"), "host-readonly").expect("write");
    let mut c = e.python_sdk("sdk_workspace.py");
    c.env("RW_DIR", &rw).env("RO_DIR", &ro);
    let out = c.output().expect("run the SDK workspace scenario");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["atomic"]["code"], 0, "{v}");
    assert_eq!(v["atomic"]["out"], "direct\natomic\n", "{v}");
    assert_eq!(
        std::fs::read_to_string(rw.join("renamed.txt")).expect("host"),
        "atomic\n"
    );
    assert_eq!(v["pwd"], "/workspace", "{v}");
    // owner_uid/owner_gid: what the guest sees on every file of that mount.
    assert_eq!(v["owned"], "4242:4343\n4242:4343\n", "{v}");
    assert_ne!(v["ro"]["code"], 0, "{v}");
    assert_eq!(v["ro"]["out"], "host-readonly", "{v}");
    assert!(
        v["ro"]["err"]
            .as_str()
            .unwrap_or_default()
            .contains("Read-only file system"),
        "{v}"
    );
    assert!(!ro.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(rw.join("from-sdk.txt")).expect("sdk write on host"),
        "written-by-sdk"
    );
    assert_eq!(v["read_back"], "host-readonly", "{v}");
    let listed: Vec<&str> = v["listed"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        listed.contains(&"from-sdk.txt") && listed.contains(&"renamed.txt"),
        "{v}"
    );
}

//! Guest file operations at scale, through `matchlock rpc` and a real VM: a directory whose
//! listing is many times larger than one protocol frame is listed completely.

mod common;

use std::time::Duration;

use common::rpc::{unb64, Rpc};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(300);

/// Entries created in the guest; with [`NAME_LEN`]-byte names their JSON is ~5 MiB, five
/// times the protocol's largest frame payload (1 MiB).
const ENTRIES: usize = 20_000;
/// Length of every created name (ext4 allows 255).
const NAME_LEN: usize = 200;

#[test]
fn list_files_returns_a_listing_larger_than_one_frame() {
    let mut r = Rpc::start().with_timeout(TIMEOUT);
    r.call("create", json!({"image": common::IMAGE}), 1);
    let prefix = "n".repeat(NAME_LEN - 5);
    // Shell built-ins only (`:` with a redirection): no fork per file, fast under TCG.
    let script = format!(
        "mkdir -p /tmp/many/sub && cd /tmp/many && i=10000; \
         while [ $i -lt {} ]; do : > {prefix}$i; i=$((i+1)); done; ls | wc -l",
        10_000 + ENTRIES - 1
    );
    let v = r.call("exec", json!({ "command": script }), 2);
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(unb64(&v["stdout"]).trim(), ENTRIES.to_string());

    let v = r.call("list_files", json!({"path": "/tmp/many"}), 3);
    let files = v["files"].as_array().expect("files array");
    assert_eq!(files.len(), ENTRIES, "every entry is listed");
    let names: Vec<&str> = files
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    let mut expected: Vec<String> = (10_000..10_000 + ENTRIES - 1)
        .map(|i| format!("{prefix}{i}"))
        .collect();
    expected.push("sub".into());
    expected.sort();
    assert_eq!(names, expected, "sorted by name, each once");
    let sub = files.iter().find(|f| f["name"] == "sub").expect("sub");
    assert_eq!(sub["is_dir"], true);
    let first = &files[0];
    assert_eq!(
        (first["is_dir"].clone(), first["size"].clone()),
        (json!(false), json!(0))
    );

    // Small listings are unchanged.
    let v = r.call("list_files", json!({"path": "/tmp/many/sub"}), 4);
    assert_eq!(v["files"], json!([]));
}

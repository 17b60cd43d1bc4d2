//! The published Python SDK 0.2.17's network features, unchanged, against a real VM whose
//! owner (`matchlock rpc`, started by the SDK) runs in a network namespace with only a veth
//! to the test host (`common/nethost.rs`): `allow_host`, `add_secret`, and
//! `with_network_interception` with static rules and SDK callbacks (the SDK's own callback
//! server). tests/python/sdk_network.py prints what the guest saw; this side checks what
//! arrived at the test host.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use nethost::NetHost;
use serde_json::Value;

#[test]
fn python_sdk_network_features() {
    let e = common::env();
    let image = nethost::nettest_image(e);
    let net = NetHost::new();
    let mut c = e.python_sdk("sdk_network.py");
    c.env("MATCHLOCK_TEST_IMAGE", image);
    let out = net.wrap(c).output().expect("run the SDK network scenario");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));

    // The guest holds only the placeholder; the real value reached api.test.
    let token = v["token"]["out"].as_str().unwrap_or_default();
    assert!(token.starts_with("SANDBOX_SECRET_"), "{v}");
    assert_eq!(v["secret"]["out"], "200", "{v}");
    let r = &net.requests("https", "/sdk-secret")[0];
    assert_eq!(r["headers"]["authorization"], "Bearer sdk-secret-value");
    assert_eq!(r["headers"]["x-rule"], "static", "static before-rule: {r}");
    // Toward another host: refused, never sent.
    assert!(
        v["leak"]["out"]
            .as_str()
            .unwrap_or_default()
            .ends_with("403"),
        "{v}"
    );
    assert!(net.requests("https", "/sdk-leak").is_empty());
    // SDK callbacks: the before-callback added a header, the after-callback rewrote the body.
    let r = &net.requests("https", "/cb/one")[0];
    assert_eq!(r["headers"]["x-from-callback"], "yes", "{r}");
    let body = v["callback"]["out"].as_str().unwrap_or_default();
    assert!(body.contains("/cb/one"), "{v}");
    let phases: Vec<&str> = v["calls"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["phase"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(phases, ["before", "after"], "{v}");
    // A block rule: 403 and nothing arrives.
    assert!(
        v["blocked"]["out"]
            .as_str()
            .unwrap_or_default()
            .ends_with("403"),
        "{v}"
    );
    assert!(net.requests("http", "/admin/x").is_empty());
    // A body replacement on the way back (the test host echoes "method":"GET").
    let rewritten = v["rewritten"]["out"].as_str().unwrap_or_default();
    assert!(rewritten.contains("\"method\":\"TEG\""), "{v}");
    assert_eq!(net.requests("http", "/plain/x")[0]["method"], "GET");
}

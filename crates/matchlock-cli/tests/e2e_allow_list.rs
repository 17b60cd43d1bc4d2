//! End to end: run-time allow-list changes of a sandbox with interception, through the
//! JSON-RPC methods and through `matchlock allow-list` (which reaches the owner through its
//! relay), on one RPC-created VM. The owner runs in a network namespace of its own with
//! only a loopback that is down, so nothing its guest does can leave the machine; only the
//! policy and its answers are exercised here (`e2e_net.rs` shows that changes steer real
//! connections).

mod common;

use std::time::Duration;

use common::rpc::{unb64, Rpc};
use common::{env, ok, stderr};
use serde_json::json;

#[test]
fn allow_list_changes_through_rpc_and_cli() {
    let mut r = Rpc::start_isolated().with_timeout(Duration::from_secs(120));
    let v = r.call(
        "create",
        json!({
            "image": common::IMAGE,
            "network": {
                "allowed_hosts": ["a.test"],
                "secrets": {"API_TOKEN": {"value": "real-secret-value", "hosts": ["api.test"]}}
            }
        }),
        1,
    );
    let id = v["id"].as_str().expect("id").to_string();

    // Secret hosts join the allow-list; additions skip known hosts, keep order.
    let v = r.call(
        "allow_list_add",
        json!({"hosts": ["b.test", " a.test ", ""]}),
        2,
    );
    assert_eq!(v["added"], json!(["b.test"]), "{v}");
    assert_eq!(
        v["allowed_hosts"],
        json!(["a.test", "api.test", "b.test"]),
        "{v}"
    );
    let v = r.call("allow_list_delete", json!({"hosts": ["a.test", "zzz"]}), 3);
    assert_eq!(v["removed"], json!(["a.test"]), "{v}");
    assert_eq!(v["allowed_hosts"], json!(["api.test", "b.test"]), "{v}");
    let (c, m) = r.call_err("allow_list_add", json!({"hosts": [" "]}), 4);
    assert_eq!((c, m.as_str()), (-32602, "hosts is required"));

    // The CLI reaches the same policy through the owner's relay.
    let e = env();
    let out = ok(&e.run(&["allow-list", "add", &id, "c.test,b.test", "d.test"]));
    assert_eq!(
        out,
        format!(
            "Added to {id}: c.test,d.test\nCurrent allow-list: api.test,b.test,c.test,d.test\n"
        )
    );
    let out = ok(&e.run(&["allow-list", "delete", &id, "nope.test"]));
    assert!(
        out.starts_with(&format!("No hosts were removed from {id}\n")),
        "{out}"
    );
    let v = r.call(
        "allow_list_delete",
        json!({"hosts": ["c.test", "d.test"]}),
        5,
    );
    assert_eq!(v["allowed_hosts"], json!(["api.test", "b.test"]), "{v}");

    // The guest sees only the placeholder, in every command's environment, and the CA
    // variables point at the bundle the guest wrote.
    let v = r.call(
        "exec",
        json!({"command": "echo $API_TOKEN; echo $SSL_CERT_FILE; head -c 27 /etc/ssl/certs/matchlock-ca.crt"}),
        6,
    );
    let text = unb64(&v["stdout"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("SANDBOX_SECRET_") && lines[0].len() == 15 + 32,
        "{text}"
    );
    assert_eq!(lines[1], "/etc/ssl/certs/matchlock-bundle.crt");
    assert_eq!(lines[2], "-----BEGIN CERTIFICATE-----");
    assert!(!text.contains("real-secret-value"));

    // A request the proxy refuses (an address off the allow-list; the proxy never connects,
    // so nothing leaves the machine) is an `event` notification for the client.
    let v = r.call(
        "exec",
        json!({"command": "wget -qO- http://192.0.2.1/evt 2>&1; true"}),
        8,
    );
    assert!(unb64(&v["stdout"]).contains("403"), "{v}");
    let ev = r.wait_for("network event", |v| {
        v["method"] == "event" && v["params"]["network"]["url"] == "http://192.0.2.1/evt"
    });
    let n = &ev["params"]["network"];
    assert_eq!(ev["params"]["type"], "network", "{ev}");
    assert_eq!(n["blocked"], true, "{ev}");
    assert_eq!(n["method"], "GET", "{ev}");
    assert!(
        n["block_reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{ev}"
    );
    assert!(
        ev["params"]["timestamp"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000),
        "{ev}"
    );

    // Changes steer the next request. Once allowed, the proxy tries the address (502: this
    // namespace has no route, so nothing leaves); once deleted, 403 again without a try.
    let out = ok(&e.run(&["allow-list", "add", &id, "192.0.2.1"]));
    assert!(
        out.starts_with(&format!("Added to {id}: 192.0.2.1\n")),
        "{out}"
    );
    let wget = json!({"command": "wget -qO- http://192.0.2.1/steer 2>&1; true"});
    let allowed = unb64(&r.call("exec", wget.clone(), 9)["stdout"]);
    assert!(
        allowed.contains("502") && !allowed.contains("403"),
        "{allowed}"
    );
    let out = ok(&e.run(&["allow-list", "delete", &id, "192.0.2.1,b.test"]));
    assert_eq!(
        out,
        format!("Removed from {id}: b.test,192.0.2.1\nCurrent allow-list: api.test\n")
    );
    let deleted = unb64(&r.call("exec", wget, 10)["stdout"]);
    assert!(deleted.contains("403"), "{deleted}");
    // Deleting the last host leaves an empty list, which allows every host (reference).
    let out = ok(&e.run(&["allow-list", "delete", &id, "api.test"]));
    assert_eq!(
        out,
        format!("Removed from {id}: api.test\nCurrent allow-list: (empty: all hosts allowed)\n")
    );

    // Neither the state, `get`/`inspect`, nor the logs hold the value.
    let inspect = ok(&e.run(&["inspect", &id]));
    assert!(inspect.contains("API_TOKEN"), "{inspect}");
    assert!(!inspect.contains("real-secret-value"), "{inspect}");
    r.call("close", json!({"timeout_seconds": 2}), 7);
    let logs = e.state_dir().join("vms").join(&id).join("logs");
    for f in std::fs::read_dir(&logs).expect("logs dir") {
        let p = f.expect("entry").path();
        let text = std::fs::read(&p).expect("read log");
        assert!(
            !String::from_utf8_lossy(&text).contains("real-secret-value"),
            "{} holds the secret",
            p.display()
        );
    }
    let events = ok(&e.run(&["log", "--events", &id]));
    assert!(events.contains(r#""event":"ready""#), "{events}");
    assert!(events.contains(r#""event":"stopped""#), "{events}");
    let o = e.run(&["allow-list", "add", &id, "x.test"]);
    assert!(!o.status.success());
    let _ = stderr(&o);
    ok(&e.run(&["rm", &id]));
}

#[test]
fn allow_list_refused_without_interception() {
    let e = env();
    let id = e.detached(&[]);
    let _guard = e.guard(&id);
    let o = e.run(&["allow-list", "add", &id, "a.test"]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o).trim(),
        "update allow-list: allow-list updates unavailable: sandbox was started without network interception"
    );
    e.kill_and_rm(&id);
}

//! End to end: ICMP echo beyond the gateway (issue 9 item 1). A real VM (`nettest`, whose
//! busybox `ping` is the client), its owner in a network namespace with only a veth to the
//! test host (`common/nethost.rs`); the test host's kernel answers echoes on all its
//! addresses (the allowed 198.51.100.2 / 2001:2::2 and the forbidden private ones) and its
//! namespace's `InEchos` counters show what arrived.
//!
//! - Open egress: with ping sockets not permitted in the owner's namespace
//!   (`ping_group_range`), nothing is answered or sent and one warning is logged; once
//!   permitted, `ping` to the test host (IPv4 and IPv6) gets every reply and the test host
//!   counted the echoes; blocked private / metadata / unique-local addresses get no reply
//!   and nothing arrives.
//! - Allow-list (`--allow-host web.test`): the test host's address pinged as an IP literal
//!   is not allowed (no reply, nothing arrives); pinged by the allowed name (resolved by the
//!   owner's DNS) it is answered.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{env, ok};
use nethost::NetHost;

const ALL_GROUPS: &str = "0 2147483647";

/// `matchlock run -d` of the nettest image in the owner's namespace, with `args`.
fn start(net: &NetHost, args: &[&str]) -> String {
    let e = env();
    let image = nethost::nettest_image(e);
    let mut run = e.cmd();
    run.args(["run", "--image", image, "-d"])
        .args(args)
        .env("MATCHLOCK_LOG", "warn,matchlock_net=info");
    ok(&net.wrap(run).output().expect("run -d"))
        .trim()
        .to_string()
}

/// `ping -c <n>` in the guest, giving up after `n + 4` s; returns (success, output).
fn ping(id: &str, flags: &str, target: &str, n: u32) -> (bool, String) {
    let (okk, out, _) = nethost::guest(
        env(),
        id,
        &format!("busybox ping {flags} -c {n} -w {} {target}", n + 4),
    );
    (okk, out)
}

/// One `ping` expected to go unanswered (given 3 s; replies take milliseconds here).
#[track_caller]
fn unanswered(id: &str, flags: &str, target: &str) {
    let (okk, out, _) = nethost::guest(
        env(),
        id,
        &format!("busybox ping {flags} -c 1 -w 3 {target}"),
    );
    assert!(
        !okk && out.contains(" 0 packets received"),
        "{target}: {out}"
    );
}

/// The stderr of the detached owner running in `net`'s sandbox namespace.
fn owner_stderr(net: &NetHost) -> String {
    let ns = std::fs::metadata(format!("/run/netns/{}", net.sandbox_ns))
        .expect("netns")
        .ino();
    common::pids_matching("--detach=false")
        .into_iter()
        .filter(|p| std::fs::metadata(format!("/proc/{p}/ns/net")).is_ok_and(|m| m.ino() == ns))
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/fd/2")).unwrap_or_default())
        .collect()
}

/// Waits briefly for late echoes to be counted, then returns the counters.
fn settled(net: &NetHost) -> (u64, u64) {
    std::thread::sleep(Duration::from_millis(300));
    net.echoes_received()
}

#[test]
fn open_egress_relays_echo_to_allowed_addresses_only() {
    let net = NetHost::new();
    net.set_ping_group_range("1 0");
    let id = start(&net, &[]);
    let _guard = env().guard(&id);

    // Ping sockets not permitted: no reply, nothing sent, one warning.
    let before = net.echoes_received();
    unanswered(&id, "", nethost::HOST_IP);
    unanswered(&id, "", nethost::HOST_IP);
    assert_eq!(settled(&net), before, "an echo left without a ping socket");
    let log = owner_stderr(&net);
    assert_eq!(log.matches("ping_group_range").count(), 1, "{log}");

    // Permitted: every echo answered, and the test host saw them.
    net.set_ping_group_range(ALL_GROUPS);
    let (okk, out) = ping(&id, "-s 100", nethost::HOST_IP, 3);
    assert!(okk && out.contains("3 packets received"), "{out}");
    assert!(out.contains("108 bytes from 198.51.100.2"), "{out}");
    let (v4, v6) = settled(&net);
    assert!(
        v4 >= before.0 + 3,
        "test host counted {v4} echoes (was {})",
        before.0
    );
    let (okk, out) = ping(&id, "-6", nethost::HOST_IP6, 2);
    assert!(okk && out.contains("2 packets received"), "{out}");
    let (v4b, v6b) = settled(&net);
    assert!(
        v6b >= v6 + 2,
        "test host counted {v6b} IPv6 echoes (was {v6})"
    );

    // Blocked ranges: no reply, nothing arrives.
    // (The third forbidden address, 10.0.2.2, is the guest's gateway: smoltcp answers it.)
    for target in ["10.11.12.13", "169.254.169.254"] {
        unanswered(&id, "", target);
    }
    for target in nethost::FORBIDDEN6 {
        unanswered(&id, "-6", target);
    }
    assert_eq!(
        settled(&net),
        (v4b, v6b),
        "a refused echo reached the test host"
    );
}

#[test]
fn allow_list_relays_echo_only_to_allowed_names_addresses() {
    let net = NetHost::new();
    net.set_ping_group_range(ALL_GROUPS);
    let id = start(&net, &["--allow-host", "web.test"]);
    let _guard = env().guard(&id);

    // The IP literal is not on the allow-list (and no allowed name was answered with it).
    let before = net.echoes_received();
    unanswered(&id, "", nethost::HOST_IP);
    assert_eq!(
        settled(&net),
        before,
        "a refused echo reached the test host"
    );

    // The allowed name, resolved by the owner's DNS to that address: answered.
    let (okk, out) = ping(&id, "", "web.test", 3);
    assert!(okk && out.contains("3 packets received"), "{out}");
    let (v4, _) = settled(&net);
    assert!(
        v4 >= before.0 + 3,
        "test host counted {v4} echoes (was {})",
        before.0
    );
}

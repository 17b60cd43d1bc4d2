//! End to end: the guest NIC's two transports (`-netdev stream`, the default, and
//! vhost-user-net, `MATCHLOCK_DEV_NET_TRANSPORT=vhost-user`), each carrying a bulk TCP
//! exchange both ways at once through the stack to the test host's echo server, with the
//! bytes checked; and a bad transport name failing before boot. The owner runs in the test
//! network namespace (`common/nethost.rs`): nothing leaves the machine.
//!
//! The exchange (8 MiB out while reading the echo back, python3 in the `nettest` image)
//! fills the frame queues between the backend and the stack both ways, so the back-pressure
//! paths (guest chains left in the ring, frames held for receive buffers) run, not only the
//! fast path.
//!
//! Needs root (`ip netns add`); fails loudly without it, never skips.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use common::{env, ok, stderr};
use nethost::{guest, NetHost, HOST_IP};

const TRANSPORT_ENV: &str = "MATCHLOCK_DEV_NET_TRANSPORT";

/// Sends 8 MiB of random bytes to the echo server while reading them back; prints the
/// byte count and whether both digests match.
const EXCHANGE: &str = r#"
import hashlib, os, socket, threading
data = os.urandom(8 << 20)
s = socket.create_connection(("HOST", 7), timeout=120)
def send():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send); t.start()
h = hashlib.sha256(); n = 0
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
t.join()
print(n, h.hexdigest() == hashlib.sha256(data).hexdigest())
"#;

/// Starts a detached sandbox in the owner's namespace with `env` set.
fn start(net: &NetHost, image: &str, vars: &[(&str, &str)]) -> String {
    let e = env();
    let mut run = e.cmd();
    run.args(["run", "--image", image, "-d"]);
    for (k, v) in vars {
        run.env(k, v);
    }
    let out = net.wrap(run).output().expect("run -d");
    ok(&out).trim().to_string()
}

/// The QEMU command line of sandbox `id`.
fn qemu_cmdline(id: &str) -> String {
    common::pids_matching(id)
        .into_iter()
        .filter_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .find(|c| c.contains("qemu-system") && c.contains("-netdev"))
        .unwrap_or_default()
}

fn exchange(id: &str) {
    let script = format!(
        "python3 - <<'EOF'\n{}\nEOF",
        EXCHANGE.replace("HOST", HOST_IP)
    );
    let (okk, text, took) = guest(env(), id, &script);
    assert!(okk, "{text}");
    assert_eq!(text.trim(), "8388608 True", "echoed bytes (took {took:?})");
}

#[test]
fn both_transports_carry_bulk_tcp_both_ways() {
    let e = env();
    let image = nethost::nettest_image(e);
    let net = NetHost::new();
    for (vars, netdev) in [
        (&[][..], "-netdev stream,id=net0"),
        (
            &[(TRANSPORT_ENV, "vhost-user")][..],
            "-netdev vhost-user,id=net0,chardev=netchr",
        ),
    ] {
        let id = start(&net, image, vars);
        let _guard = e.guard(&id);
        let cmd = qemu_cmdline(&id);
        assert!(cmd.contains(netdev), "{vars:?}: {cmd}");
        exchange(&id);
    }
}

#[test]
fn unknown_transport_fails_before_boot() {
    let e = env();
    let out = e
        .cmd()
        .args(["run", "--image", "busybox:none", "-d"])
        .env(TRANSPORT_ENV, "tap")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("MATCHLOCK_DEV_NET_TRANSPORT=\"tap\" is not a transport"),
        "{err}"
    );
}

//! End to end: WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through TLS interception
//! (issue 9 item 5). A real VM with Debian's python3-h2 (`nettest`), its owner in a network
//! namespace with only a veth to the test host (`common/nethost.rs`), whose HTTPS server
//! logs every request and every WebSocket message it receives.
//!
//! One sandbox (`--allow-host web.test`, a secret scoped to `api.test`) covers: the echo both
//! ways over h2 (the guest's interceptor advertises `SETTINGS_ENABLE_CONNECT_PROTOCOL`; the
//! upstream leg is an HTTP/1.1 upgrade), a non-allowed `:authority` refused with nothing
//! arriving, a placeholder toward a host it is not scoped to refused with nothing arriving,
//! and the placeholder substituted toward the secret's host.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::time::Duration;

use base64::Engine;

use common::{env, ok};
use nethost::NetHost;

const SECRET: &str = "netws-s3cr3t-value";

/// `python3 /tmp/wsh2.py HOST AUTHORITY PATH [NAME=VALUE]...`: TLS to HOST:443 with ALPN
/// h2, extended CONNECT to AUTHORITY/PATH with the extra headers, then (on 200) a text
/// and a 20000-byte binary message, each checked to come back. Prints `settings <0|1>`,
/// `status <code>` and `echo <n> ok` lines; `$VAR` in a header value is expanded.
const CLIENT: &str = r#"
import os, socket, ssl, sys
import h2.config, h2.connection, h2.events, h2.settings
host, authority, path = sys.argv[1], sys.argv[2], sys.argv[3]
extra = [(a.split('=', 1)[0], os.path.expandvars(a.split('=', 1)[1])) for a in sys.argv[4:]]
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(['h2'])
s = ctx.wrap_socket(socket.create_connection((host, 443), 30), server_hostname=host)
assert s.selected_alpn_protocol() == 'h2', s.selected_alpn_protocol()
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding='utf-8'))
c.initiate_connection()
s.sendall(c.data_to_send())
def pump():
    d = s.recv(65536)
    if not d:
        raise SystemExit('EOF')
    evs = c.receive_data(d)
    out = c.data_to_send()
    if out:
        s.sendall(out)
    return evs
got_settings = False
while not got_settings:
    got_settings = any(isinstance(e, h2.events.RemoteSettingsChanged) for e in pump())
print('settings', c.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0))
sid = c.get_next_available_stream_id()
c.send_headers(sid, [(':method', 'CONNECT'), (':protocol', 'websocket'), (':scheme', 'https'),
                     (':path', path), (':authority', authority),
                     ('sec-websocket-version', '13')] + extra)
s.sendall(c.data_to_send())
buf = b''
status = None
ended = False
def step():
    global buf, status, ended
    for e in pump():
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
            status = dict(e.headers)[':status']
        elif isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
            buf += e.data
            c.acknowledge_received_data(e.flow_controlled_length, sid)
            s.sendall(c.data_to_send())
        elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid:
            ended = True
while status is None and not ended:
    step()
print('status', status)
if status != '200':
    raise SystemExit(0)
def frame(op, data):
    mask = os.urandom(4)
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, 'big'))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))
def read_frame():
    global buf
    while True:
        n, off = (buf[1] & 0x7f, 2) if len(buf) >= 2 else (None, 0)
        if n == 126:
            n, off = (int.from_bytes(buf[2:4], 'big'), 4) if len(buf) >= 4 else (None, 0)
        if n is not None and len(buf) >= off + n:
            op, data, buf = buf[0] & 0x0f, buf[off:off + n], buf[off + n:]
            return op, data
        if ended:
            raise SystemExit('stream ended')
        step()
msgs = [(1, b'ws-over-h2-hello'), (2, bytes(i % 251 for i in range(20000)))]
for i, (op, m) in enumerate(msgs):
    f = frame(op, m)
    for at in range(0, len(f), 16384):
        c.send_data(sid, f[at:at + 16384])
        s.sendall(c.data_to_send())
    got = read_frame()
    print('echo', i, 'ok' if got == (op, m) else 'MISMATCH %r' % (got[0], len(got[1])))
c.send_data(sid, frame(8, b''), end_stream=True)
s.sendall(c.data_to_send())
"#;

/// Runs the client in the guest with `args` and returns its output.
fn client(id: &str, args: &str) -> String {
    let script = base64::engine::general_purpose::STANDARD.encode(CLIENT);
    nethost::guest_sh(
        env(),
        id,
        &format!("printf %s '{script}' | base64 -d > /tmp/wsh2.py && python3 /tmp/wsh2.py {args}"),
        true,
    )
}

/// The network events (objects with a `url`) anywhere in an event-log record.
fn network_events(v: serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(ref m) if m.contains_key("url") => out.push(v),
        serde_json::Value::Object(m) => m.into_iter().for_each(|(_, c)| network_events(c, out)),
        serde_json::Value::Array(a) => a.into_iter().for_each(|c| network_events(c, out)),
        _ => {}
    }
}

#[test]
fn websocket_over_http2_is_relayed_and_follows_the_policy() {
    let e = env();
    let net = NetHost::new();
    let id = net.detached_intercepting(e, SECRET);
    let _guard = e.guard(&id);

    // Allowed: the guest's h2 server offers extended CONNECT; both messages come back.
    let out = client(&id, "web.test web.test '/ws?case=ok'");
    assert!(out.contains("settings 1"), "{out}");
    assert!(out.contains("status 200"), "{out}");
    assert!(out.contains("echo 0 ok"), "{out}");
    assert!(out.contains("echo 1 ok"), "{out}");
    let hs = net.wait_log("https", Duration::from_secs(5), |r| {
        r["path"] == "/ws" && r["query"] == "case=ok"
    });
    assert_eq!(
        hs["version"], "HTTP/1.1",
        "upstream leg is an upgrade: {hs}"
    );
    assert_eq!(hs["headers"]["upgrade"], "websocket", "{hs}");
    net.wait_log("https", Duration::from_secs(5), |r| {
        r["event"] == "ws-message" && r["data"] == "ws-over-h2-hello"
    });

    // A non-allowed :authority on the same allowed TLS connection target: 403, nothing sent.
    let out = client(&id, "web.test evil.test '/ws?case=denied'");
    assert!(out.contains("status 403"), "{out}");
    // A placeholder toward a host the secret is not scoped to: 403, nothing sent.
    let out = client(
        &id,
        "web.test web.test '/ws?case=leak' 'x-token=$API_TOKEN'",
    );
    assert!(out.contains("status 403"), "{out}");

    // Toward the secret's host: substituted in the header, the WebSocket works.
    let out = client(
        &id,
        "api.test api.test '/ws?case=secret' 'authorization=Bearer $API_TOKEN'",
    );
    assert!(
        out.contains("status 200") && out.contains("echo 1 ok"),
        "{out}"
    );
    let got = net.wait_log("https", Duration::from_secs(5), |r| {
        r["path"] == "/ws" && r["query"] == "case=secret"
    });
    assert_eq!(
        got["headers"]["authorization"],
        format!("Bearer {SECRET}"),
        "{got}"
    );

    // Events: the handshakes and the refusals, without the secret's value.
    let events = ok(&e.run(&["log", "--events", &id]));
    let mut found = Vec::new();
    for line in events.lines() {
        if let Ok(v) = serde_json::from_str(line) {
            network_events(v, &mut found);
        }
    }
    let any = |pred: &dyn Fn(&serde_json::Value) -> bool| found.iter().any(pred);
    assert!(
        any(&|v| v["method"] == "CONNECT"
            && v["url"] == "https://web.test/ws"
            && v["status_code"] == 200),
        "{events}"
    );
    assert!(
        any(&|v| v["host"] == "evil.test" && v["blocked"] == true && v["status_code"] == 403),
        "{events}"
    );
    assert!(!events.contains(SECRET), "{events}");

    let log = net.log_text("https");
    assert!(
        !log.contains("case=denied"),
        "refused request arrived: {log}"
    );
    assert!(!log.contains("case=leak"), "leaking request arrived: {log}");
    assert!(
        !log.contains("SANDBOX_SECRET_"),
        "placeholder arrived: {log}"
    );
}

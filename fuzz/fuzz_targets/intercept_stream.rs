//! What a guest sends the interceptor on port 80 (HTTP/1.1) or 443 (a TLS ClientHello and
//! whatever follows), on arbitrary bytes: the interceptor must answer or close, never panic
//! or hang. The policy refuses every host before any resolution or connection (its one
//! pattern contains a space, which no parsed authority can), so inputs never leave the
//! process; the first byte picks HTTP or TLS.
#![no_main]

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use matchlock_net::intercept::{InterceptConfig, Interceptor};
use matchlock_net::policy::Policy;
use matchlock_net::secrets::{Secret, Secrets};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn interceptor() -> Arc<Interceptor> {
    static ICPT: OnceLock<Arc<Interceptor>> = OnceLock::new();
    ICPT.get_or_init(|| {
        let secret = Secret::new("KEY", "value", &["api.example".into()], "SANDBOX_SECRET_k");
        let icpt = Interceptor::new(InterceptConfig {
            policy: Arc::new(Policy::new(["no host"], true)),
            secrets: Arc::new(Secrets::new(vec![secret])),
            events: None,
            upstream_roots: Some(rustls::RootCertStore::empty()),
        })
        .expect("interceptor");
        Arc::new(icpt.with_idle_timeout(Duration::from_secs(1)))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let icpt = interceptor();
        let (mut guest, theirs) = tokio::io::duplex(64 * 1024);
        let tls = pick & 1 == 1;
        let dst: SocketAddr =
            SocketAddrV4::new([198, 51, 100, 7].into(), if tls { 443 } else { 80 }).into();
        let served = if tls {
            tokio::spawn(icpt.serve_tls(dst, theirs))
        } else {
            tokio::spawn(icpt.serve_http(dst, theirs))
        };
        let mut out = Vec::new();
        let exchange = async {
            let _ = guest.write_all(rest).await;
            let _ = guest.shutdown().await;
            let _ = guest.read_to_end(&mut out).await;
        };
        // The guest half-closes at once, so the interceptor must finish well within this
        // (under run.sh's 10 s per-input limit): a hang here is a bug.
        let finished = tokio::time::timeout(Duration::from_secs(8), exchange).await;
        assert!(
            finished.is_ok(),
            "the interceptor neither answered nor closed"
        );
        served.abort();
    });
});

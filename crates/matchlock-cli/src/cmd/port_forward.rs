//! `matchlock port-forward`: forward host TCP ports into a running sandbox owned by another
//! process (a `run --rm=false`/`-d` sandbox or one created through `matchlock rpc`), through
//! its exec relay.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use matchlock_sandbox::forward::{self, Binding, Dial, Forwarder, OnError};
use tokio::signal::unix::{signal, SignalKind};

use super::common;

/// Forward host TCP ports to ports inside a running sandbox.
///
/// Each connection to a local port is tunnelled through the sandbox's guest agent to
/// 127.0.0.1:REMOTE inside the VM (no guest network needed). Runs until Ctrl-C.
///
/// Examples:
///   matchlock port-forward vm-1a2b3c4d 8080            (localhost:8080 -> sandbox:8080)
///   matchlock port-forward vm-1a2b3c4d 18080:80 9000
///   matchlock port-forward --address 0.0.0.0 vm-1a2b3c4d 8080:80
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct PortForwardArgs {
    /// Sandbox ID.
    pub id: String,
    /// [LOCAL_PORT:]REMOTE_PORT mappings.
    #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
    pub specs: Vec<String>,
    /// Host address to listen on (IP literal or localhost). Repeatable, comma-separated.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: Vec<String>,
}

/// Prints one `Forwarding` line per binding (spec §1.13).
pub fn announce(bindings: &[Binding]) {
    for b in bindings {
        let addr = std::net::SocketAddr::new(b.address, b.local_port);
        eprintln!("Forwarding {addr} -> sandbox:{}", b.remote_port);
    }
}

pub fn port_forward(a: PortForwardArgs) -> anyhow::Result<()> {
    // Validate everything before touching the sandbox.
    let specs = a
        .specs
        .iter()
        .map(|s| forward::parse_port_spec(s))
        .collect::<Result<Vec<_>, _>>()?;
    let ips = forward::parse_addresses(&a.address)?;
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let dir = common::running_vm(&state, &a.id)?;
    let rt = common::runtime()?;
    rt.block_on(async move {
        let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let id = a.id.clone();
        let dial: Dial = Arc::new(move || {
            let (id, dir) = (id.clone(), dir.clone());
            Box::pin(async move {
                matchlock_sandbox::relay::connect(&id, &dir)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        let on_error: OnError = Arc::new(|m| eprintln!("port-forward connection error: {m}"));
        let fw = Forwarder::start(&ips, &specs, dial, on_error)
            .await
            .context("start port-forward listener")?;
        announce(fw.bindings());
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        fw.close().await;
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}

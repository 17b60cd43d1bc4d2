//! Port forwards (`port_forward`) and allow-list updates (`allow_list_add`,
//! `allow_list_delete`).

use std::sync::Arc;

use matchlock_api::rpc::{
    to_value, AllowListAddResult, AllowListDeleteResult, HostsParams, PortBinding,
    PortForwardParams, PortForwardResult,
};
use matchlock_sandbox::forward::{self, OnError};
use serde_json::Value;

use crate::error::Failure;
use crate::shared::Shared;

/// `allow_list_add` (`add`) or `allow_list_delete`: changes apply to new connections and
/// requests at once (spec §7.5.3).
pub fn allow_list(s: &Shared, p: HostsParams, add: bool) -> Result<Value, Failure> {
    if p.hosts.iter().all(|h| h.trim().is_empty()) {
        return Err(Failure::Missing("hosts"));
    }
    let net = s.current()?.network().ok_or(Failure::NoInterception)?;
    let change = if add {
        net.allow(&p.hosts)
    } else {
        net.disallow(&p.hosts)
    }
    .map_err(|_| Failure::NoInterception)?;
    Ok(if add {
        to_value(&AllowListAddResult {
            added: change.changed,
            allowed_hosts: change.allowed_hosts,
        })
    } else {
        to_value(&AllowListDeleteResult {
            removed: change.changed,
            allowed_hosts: change.allowed_hosts,
        })
    })
}

/// Each call replaces every previous forward (spec §2.4).
pub async fn port_forward(s: &Shared, p: PortForwardParams) -> Result<Value, Failure> {
    if p.forwards.is_empty() {
        return Err(Failure::Missing("forwards"));
    }
    let addresses = if p.addresses.is_empty() {
        vec!["127.0.0.1".to_string()]
    } else {
        p.addresses
    };
    let ips = forward::parse_addresses(&addresses).map_err(Failure::Address)?;
    let sandbox = s.current()?;
    let on_error: OnError = Arc::new(|m| tracing::warn!("port-forward connection error: {m}"));
    let bindings = sandbox
        .forward(&ips, &p.forwards, on_error)
        .await
        .map_err(Failure::Forward)?
        .iter()
        .map(|b| PortBinding {
            address: b.address.to_string(),
            local_port: b.local_port,
            remote_port: b.remote_port,
        })
        .collect();
    Ok(to_value(&PortForwardResult { bindings }))
}

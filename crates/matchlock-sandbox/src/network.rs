//! The network service: a sandbox's userspace TCP/IP stack ([`matchlock_net::stack`]),
//! attached to a virtio-net device in the VM and started and stopped with it.
//!
//! # Design
//! [`NetworkService::prepare`] binds the stack's datagram socket in the sandbox's state
//! directory before QEMU starts, adds the `-netdev dgram` device to the VM and the guest's
//! static address, gateway and MTU to the boot configuration (no DHCP on the boot path), and
//! points the guest's resolver at the gateway, where the stack answers DNS. The guest link is
//! a private /24, so the gateway's own address is in a blocked range: a guest cannot reach
//! the host's loopback services through it.
//!
//! # Limitations
//! Experimental: only enabled by `MATCHLOCK_EXPERIMENTAL_NET=1` for `matchlock run`
//! ([`experimental_from_env`]); the CLI flags and RPC options for networking still refuse.
//! No HTTP/TLS interception, secrets or events yet. The socket files are recorded in the
//! state DB before they are created (so `gc` finds them after a crash) and removed on stop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use matchlock_guest_proto::GuestNet;
use matchlock_net::policy::Policy;
use matchlock_net::stack::{Stack, StackConfig};
use matchlock_vm::NetDevice;

use crate::services::{BootPlan, Service, ServiceError};

/// The guest's address on its link.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway (the stack) on the guest's link; also the guest's DNS server.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Prefix length of the guest's link.
pub const PREFIX_LEN: u8 = 24;
/// Default IP MTU of the guest's link.
pub const DEFAULT_MTU: u16 = 1500;
const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x0f];
const GATEWAY_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x02];
/// The stack's socket (QEMU sends the guest's frames there).
pub const STACK_SOCKET: &str = "net.sock";
/// QEMU's end of the netdev.
pub const QEMU_SOCKET: &str = "net-qemu.sock";

/// Enables the experimental network.
pub const ENV_ENABLE: &str = "MATCHLOCK_EXPERIMENTAL_NET";
/// Comma-separated allow-list for the experimental network (empty: open egress).
pub const ENV_ALLOW: &str = "MATCHLOCK_EXPERIMENTAL_ALLOW";

/// A sandbox's network: policy and, once prepared, the running stack.
pub struct NetworkService {
    policy: Arc<Policy>,
    mtu: u16,
    stack: Option<Stack>,
    files: Vec<PathBuf>,
}

impl NetworkService {
    /// A network with `policy` (private ranges are blocked unless the policy says otherwise).
    pub fn new(policy: Policy) -> NetworkService {
        NetworkService {
            policy: Arc::new(policy),
            mtu: DEFAULT_MTU,
            stack: None,
            files: Vec::new(),
        }
    }

    /// The policy the stack enforces (shared: allow-list changes apply to new flows).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.clone()
    }
}

/// The experimental gate: a network service when `MATCHLOCK_EXPERIMENTAL_NET=1`, with open
/// egress (private ranges blocked) or the allow-list in `MATCHLOCK_EXPERIMENTAL_ALLOW`.
pub fn experimental_from_env() -> Option<Box<dyn Service>> {
    if std::env::var(ENV_ENABLE).ok().as_deref() != Some("1") {
        return None;
    }
    let allow = std::env::var(ENV_ALLOW).unwrap_or_default();
    let policy = Policy::new(allow.split(','), true);
    tracing::warn!(allow = ?policy.allow.hosts(), "experimental guest network enabled");
    Some(Box::new(NetworkService::new(policy)))
}

fn remove_stale(path: &Path) -> Result<(), ServiceError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ServiceError {
            service: "network",
            source: Box::new(e),
        }),
        _ => Ok(()),
    }
}

impl Service for NetworkService {
    fn name(&self) -> &'static str {
        "network"
    }

    fn host_files(&self, dir: &Path) -> Vec<PathBuf> {
        vec![dir.join(STACK_SOCKET), dir.join(QEMU_SOCKET)]
    }

    fn prepare(&mut self, plan: &mut BootPlan, dir: &Path) -> Result<(), ServiceError> {
        let socket = dir.join(STACK_SOCKET);
        let local = dir.join(QEMU_SOCKET);
        for f in [&socket, &local] {
            remove_stale(f)?;
        }
        self.files = vec![socket.clone(), local.clone()];
        let stack = Stack::start(StackConfig {
            socket: socket.clone(),
            peer: local.clone(),
            gateway: GATEWAY_ADDR,
            guest: GUEST_ADDR,
            prefix_len: PREFIX_LEN,
            mtu: self.mtu,
            gateway_mac: GATEWAY_MAC,
            policy: self.policy.clone(),
        })
        .map_err(|e| ServiceError {
            service: "network",
            source: Box::new(e),
        })?;
        self.stack = Some(stack);
        plan.vm.net = Some(NetDevice {
            local,
            remote: socket,
            mac: GUEST_MAC,
        });
        plan.guest.net = Some(GuestNet {
            address: GUEST_ADDR,
            prefix_len: PREFIX_LEN,
            gateway: GATEWAY_ADDR,
            mtu: self.mtu,
        });
        plan.guest.dns_servers = vec![GATEWAY_ADDR.to_string()];
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut s) = self.stack.take() {
            s.stop();
        }
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }
}

//! The network service: a sandbox's userspace TCP/IP stack ([`matchlock_net::stack`]),
//! attached to a virtio-net device in the VM and started and stopped with it, and the
//! run-time control of its policy ([`NetworkControl`]).
//!
//! # Design
//! Every sandbox has a network unless its configuration says `no_network` (then the VM has
//! no NIC at all). [`for_config`] turns the configuration into a service: the policy
//! (allow-list plus the secrets' hosts, blocked address ranges unless `block_private_ips`
//! is false), the secrets with their placeholders, the MTU and the DNS servers.
//! [`NetworkService::prepare`] binds the stack's unix socket in the sandbox's state
//! directory before QEMU starts, adds the virtio-net device to the VM (QEMU connects to that
//! socket: `-netdev stream`, length-prefixed frames, by default and for snapshot boots via
//! [`NetworkService::set_transport`]; `-netdev vhost-user`, the stack serving the virtqueues
//! from the shared guest memory, with [`NET_TRANSPORT_ENV`]`=vhost-user`) and the guest's
//! static IPv4 and IPv6 addresses, gateways and MTU to the boot configuration (no DHCP or
//! router advertisements on the boot path),
//! and points the guest's resolver at the gateway (or the configured servers; the stack
//! answers DNS sent to any address). The guest link is a private /24 plus a unique-local
//! /64 (`fd00:6d6c::/64`), so the gateway's own addresses are in blocked ranges: a guest
//! cannot reach the host's loopback services through them. Without interception the stack
//! forwards guest UDP (open egress); under it, only DNS.
//!
//! [`exec_env`] is what every command gets: secret placeholders (never the values) and,
//! under interception, the CA bundle variables.
//!
//! # Limitations
//! The socket files are recorded in the state DB before they are created (so `gc` finds
//! them after a crash) and removed on stop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use matchlock_api::NetworkConfig;
use matchlock_guest_proto::{GuestNet, GuestNet6};
use matchlock_net::policy::Policy;
pub use matchlock_net::secrets::{parse_secret_spec, SecretSpec, SecretSpecError};
use matchlock_net::secrets::{Secret, Secrets};
use matchlock_net::stack::{Ipv6Link, Stack, StackConfig, Transport, VHOST_USER_MAX_MTU};
use matchlock_vm::{NetDevice, NetTransport};

use crate::services::{BootPlan, EventHub, SandboxEvent, Service, ServiceError};
use matchlock_api::rpc::NetworkEventInfo;
use matchlock_net::dns::{DnsConfig, DnsResolver};
use matchlock_net::events::{EventSink as NetEventSink, NetworkEvent};
use matchlock_net::hooks::HookRules;
use matchlock_net::intercept::{InterceptConfig, Interceptor};

/// The guest's address on its link.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway (the stack) on the guest's link; also the guest's DNS server.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Prefix length of the guest's link.
pub const PREFIX_LEN: u8 = 24;
/// The guest's IPv6 address (a unique-local address: blocked like 10.0.2.0/24).
pub const GUEST_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6d6c, 0, 0, 0, 0, 0, 0x15);
/// The gateway's IPv6 address on the guest's link.
pub const GATEWAY_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6d6c, 0, 0, 0, 0, 0, 0x2);
/// IPv6 prefix length of the guest's link.
pub const PREFIX_LEN6: u8 = 64;
/// Default IP MTU of the guest's link.
pub const DEFAULT_MTU: u16 = 1500;
const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x0f];
const GATEWAY_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x02];
/// The stack's socket (QEMU connects to it and sends the guest's frames there).
pub const STACK_SOCKET: &str = "net.sock";

/// Where the guest finds the interception CA (written by the guest at boot).
pub const GUEST_CA_FILE: &str = "/etc/ssl/certs/matchlock-ca.crt";
/// The guest's trust bundle for clients: the image's system bundle (when it has one) plus
/// the CA, so TLS that is not intercepted still verifies (the reference pointed
/// `SSL_CERT_FILE` at the CA alone, which broke every other TLS connection).
pub const GUEST_CA_BUNDLE: &str = "/etc/ssl/certs/matchlock-bundle.crt";

/// A sandbox's network: policy, secrets and, once prepared, the running stack.
pub struct NetworkService {
    policy: Arc<Policy>,
    secrets: Arc<Secrets>,
    intercepting: bool,
    mtu: u16,
    /// `--dns-servers` (empty: the host's resolver answers).
    dns: Vec<IpAddr>,
    events: Arc<EventHub>,
    hooks: Arc<HookRules>,
    stack: Option<Stack>,
    files: Vec<PathBuf>,
    transport: NetTransport,
}

/// The developer setting that selects the NIC's transport: `stream` (the default) or
/// `vhost-user` (MTU at most 1500). vhost-user-net is not the default because it did not
/// lower the host CPU per MiB under TCG (docs/testing.md, "Network").
pub const NET_TRANSPORT_ENV: &str = "MATCHLOCK_DEV_NET_TRANSPORT";

/// The transport [`NET_TRANSPORT_ENV`] selects for a link of `mtu`.
fn transport_from_env(mtu: u16) -> Result<NetTransport, NetworkSetupError> {
    let fits = mtu <= VHOST_USER_MAX_MTU;
    match std::env::var(NET_TRANSPORT_ENV).as_deref() {
        Err(_) | Ok("") | Ok("stream") => Ok(NetTransport::Stream),
        Ok("vhost-user") if fits => Ok(NetTransport::VhostUser),
        Ok("vhost-user") => Err(NetworkSetupError::TransportMtu(mtu)),
        Ok(other) => Err(NetworkSetupError::Transport(other.to_string())),
    }
}

/// Failures turning a network configuration into a network service.
#[derive(Debug, thiserror::Error)]
pub enum NetworkSetupError {
    #[error("invalid network mtu {0}: must be between 576 and 9000")]
    Mtu(u32),
    #[error("invalid dns server {0:?}: expected an IP address")]
    DnsServer(String),
    #[error("invalid secret name {0:?}: must be a valid environment variable name")]
    SecretName(String),
    #[error("{NET_TRANSPORT_ENV}={0:?} is not a transport (expected `vhost-user` or `stream`)")]
    Transport(String),
    #[error("{NET_TRANSPORT_ENV}=vhost-user carries an MTU of at most 1500, not {0}")]
    TransportMtu(u16),
    #[error("invalid network.interception")]
    Hooks(#[source] matchlock_net::hooks::HookError),
}

/// Whether `net` asks for interception (the reference's rule, §7.1): an allow-list,
/// secrets, `intercept` or interception rules.
pub fn intercepting(net: &NetworkConfig) -> bool {
    !net.no_network && net.needs_network_stack()
}

/// Builds the network service for `net` (none under `no_network`). Secret placeholders not
/// given are generated here, into `net`, so the guest's environment and the proxy agree.
pub fn for_config(
    net: &mut NetworkConfig,
    events: Arc<EventHub>,
) -> Result<Option<(NetworkService, Arc<NetworkControl>)>, NetworkSetupError> {
    if net.no_network {
        return Ok(None);
    }
    let mtu = match net.mtu {
        0 => DEFAULT_MTU,
        m => u16::try_from(m)
            .ok()
            .filter(|m| (576..=9000).contains(m))
            .ok_or(NetworkSetupError::Mtu(m))?,
    };
    let mut dns = Vec::new();
    for d in &net.dns_servers {
        let ip: IpAddr = d
            .trim()
            .parse()
            .map_err(|_| NetworkSetupError::DnsServer(d.clone()))?;
        dns.push(ip);
    }
    let mut secrets = Vec::new();
    for (name, s) in net.secrets.iter_mut() {
        let valid = !name.is_empty()
            && !name.contains(['=', '\0'])
            && !name.chars().any(char::is_whitespace);
        if !valid {
            return Err(NetworkSetupError::SecretName(name.clone()));
        }
        let secret = Secret::new(name, &s.value, &s.hosts, &s.placeholder);
        s.placeholder = secret.placeholder.clone();
        secrets.push(secret);
    }
    let secrets = Secrets::new(secrets);
    let none = serde_json::Value::Null;
    let hooks = HookRules::compile(net.interception.as_ref().unwrap_or(&none))
        .map_err(NetworkSetupError::Hooks)?;
    let mut hosts: Vec<&str> = net.allowed_hosts.iter().map(String::as_str).collect();
    hosts.extend(secrets.hosts());
    let policy = Arc::new(Policy::new(hosts, net.block_private_ips));
    let control = Arc::new(NetworkControl {
        policy: policy.clone(),
        intercepting: intercepting(net),
    });
    let service = NetworkService {
        policy,
        secrets: Arc::new(secrets),
        intercepting: control.intercepting,
        mtu,
        dns,
        events,
        hooks: Arc::new(hooks),
        stack: None,
        files: Vec::new(),
        transport: transport_from_env(mtu)?,
    };
    Ok(Some((service, control)))
}

/// Checks `net` the way [`for_config`] will, without changing it (callers validate before
/// resolving images or booting).
pub fn validate(net: &NetworkConfig) -> Result<(), NetworkSetupError> {
    for_config(&mut net.clone(), Arc::default()).map(|_| ())
}

/// Environment variables, in order.
pub type EnvList = Vec<(String, String)>;

/// Environment every command of a sandbox with `net` gets: `forced` overrides image,
/// config and request environment (secret placeholders, as the reference); `defaults` sits
/// under the image's environment (the CA bundle for common TLS clients).
pub fn exec_env(net: &NetworkConfig) -> (EnvList, EnvList) {
    if net.no_network {
        return (Vec::new(), Vec::new());
    }
    let forced = net
        .secrets
        .iter()
        .map(|(k, s)| (k.clone(), s.placeholder.clone()))
        .collect();
    let mut defaults = Vec::new();
    if intercepting(net) {
        for k in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
            defaults.push((k.to_string(), GUEST_CA_BUNDLE.to_string()));
        }
        defaults.push(("NODE_EXTRA_CA_CERTS".to_string(), GUEST_CA_FILE.to_string()));
    }
    (forced, defaults)
}

/// Run-time control of a sandbox's network: the allow-list (`allow-list add|delete`, RPC
/// `allow_list_add/delete`). Changes apply to new connections and requests at once.
pub struct NetworkControl {
    policy: Arc<Policy>,
    intercepting: bool,
}

/// Why an allow-list change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("allow-list updates unavailable: sandbox was started without network interception")]
    NoInterception,
}

/// The result of an allow-list change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowListChange {
    /// Hosts added (or removed), in order.
    pub changed: Vec<String>,
    /// The allow-list now (empty: every host allowed).
    pub allowed_hosts: Vec<String>,
}

impl NetworkControl {
    fn check(&self) -> Result<(), AllowListError> {
        if self.intercepting {
            Ok(())
        } else {
            Err(AllowListError::NoInterception)
        }
    }

    /// Adds hosts (trimmed, empties and known hosts skipped).
    pub fn allow(&self, hosts: &[String]) -> Result<AllowListChange, AllowListError> {
        self.check()?;
        let changed = self.policy.allow.add(hosts.iter().map(String::as_str));
        tracing::info!(added = ?changed, "allow-list changed");
        Ok(AllowListChange {
            changed,
            allowed_hosts: self.policy.allow.hosts(),
        })
    }

    /// Removes hosts.
    pub fn disallow(&self, hosts: &[String]) -> Result<AllowListChange, AllowListError> {
        self.check()?;
        let changed = self.policy.allow.delete(hosts.iter().map(String::as_str));
        tracing::info!(removed = ?changed, "allow-list changed");
        Ok(AllowListChange {
            changed,
            allowed_hosts: self.policy.allow.hosts(),
        })
    }

    /// The allow-list now.
    pub fn allowed_hosts(&self) -> Vec<String> {
        self.policy.allow.hosts()
    }
}

impl NetworkService {
    /// The stack's and the interceptor's events, into the sandbox's event hub.
    fn event_sink(&self) -> NetEventSink {
        let hub = self.events.clone();
        Arc::new(move |ev: NetworkEvent| {
            hub.emit(&SandboxEvent::Network {
                timestamp: ev.timestamp_unix,
                event: NetworkEventInfo {
                    method: ev.method,
                    url: ev.url,
                    host: ev.host,
                    status_code: ev.status_code,
                    request_bytes: ev.request_bytes,
                    response_bytes: ev.response_bytes,
                    duration_ms: ev.duration_ms,
                    blocked: ev.blocked,
                    block_reason: ev.block_reason.unwrap_or_default(),
                },
            });
        })
    }
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

impl NetworkService {
    /// The NIC's transport ([`NET_TRANSPORT_ENV`] or the default).
    pub fn transport(&self) -> NetTransport {
        self.transport
    }

    /// Overrides the transport before [`Service::prepare`]: a VM restored from a snapshot
    /// needs [`NetTransport::Stream`] (QEMU 7.2 cannot migrate vhost-user devices), which is
    /// the default unless [`NET_TRANSPORT_ENV`] asks for vhost-user.
    pub fn set_transport(&mut self, transport: NetTransport) {
        self.transport = transport;
    }
}

impl Service for NetworkService {
    fn name(&self) -> &'static str {
        "network"
    }

    fn host_files(&self, dir: &Path) -> Vec<PathBuf> {
        vec![dir.join(STACK_SOCKET)]
    }

    fn prepare(&mut self, plan: &mut BootPlan, dir: &Path) -> Result<(), ServiceError> {
        let socket = dir.join(STACK_SOCKET);
        remove_stale(&socket)?;
        self.files = vec![socket.clone()];
        let events = self.event_sink();
        let intercept = if self.intercepting {
            let icpt = Interceptor::new(InterceptConfig {
                policy: self.policy.clone(),
                secrets: self.secrets.clone(),
                events: Some(events.clone()),
                upstream_roots: None,
            })
            .map_err(|e| ServiceError {
                service: "network",
                source: Box::new(e),
            })?
            .with_hooks(self.hooks.clone());
            plan.guest.ca_pem = Some(icpt.ca_pem());
            Some(Arc::new(icpt))
        } else {
            None
        };
        let dns = Arc::new(DnsResolver::new(DnsConfig {
            servers: self.dns.iter().map(|ip| SocketAddr::new(*ip, 53)).collect(),
            policy: self.policy.clone(),
        }));
        let stack = Stack::start(StackConfig {
            socket: socket.clone(),
            transport: match self.transport {
                NetTransport::Stream => Transport::Stream,
                NetTransport::VhostUser => Transport::VhostUser,
            },
            gateway: GATEWAY_ADDR,
            guest: GUEST_ADDR,
            prefix_len: PREFIX_LEN,
            ipv6: Some(Ipv6Link {
                gateway: GATEWAY_ADDR6,
                guest: GUEST_ADDR6,
                prefix_len: PREFIX_LEN6,
            }),
            // Open egress forwards UDP; interception keeps it to DNS.
            udp_egress: !self.intercepting,
            mtu: self.mtu,
            gateway_mac: GATEWAY_MAC,
            policy: self.policy.clone(),
            intercept,
            events: Some(events),
            dns,
        })
        .map_err(|e| ServiceError {
            service: "network",
            source: Box::new(e),
        })?;
        self.stack = Some(stack);
        plan.vm.net = Some(NetDevice {
            socket,
            mac: GUEST_MAC,
            transport: self.transport,
        });
        plan.guest.net = Some(GuestNet {
            address: GUEST_ADDR,
            prefix_len: PREFIX_LEN,
            gateway: GATEWAY_ADDR,
            mtu: self.mtu,
            ipv6: Some(GuestNet6 {
                address: GUEST_ADDR6,
                prefix_len: PREFIX_LEN6,
                gateway: GATEWAY_ADDR6,
            }),
        });
        // The stack answers DNS sent to any address; the guest lists the configured servers
        // (as the reference) or, by default, the gateway.
        plan.guest.dns_servers = if self.dns.is_empty() {
            vec![GATEWAY_ADDR.to_string()]
        } else {
            self.dns.iter().map(ToString::to_string).collect()
        };
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

//! [`Sandbox`]: a builder for `create` options, mirroring the Go SDK's `SandboxBuilder`.

use std::collections::BTreeMap;

use matchlock_api::rpc::{CreateParams, ResourceParams};
use matchlock_api::{HostMapping, ImageConfig, NetworkConfig, Secret};

/// A `[LOCAL:]REMOTE` port mapping (the wire type of `port_forward`).
pub use matchlock_api::rpc::PortMapping as PortForward;

/// Options for [`crate::Client::create`]; build them with [`Sandbox`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateOptions {
    pub image: String,
    pub privileged: bool,
    pub cpus: f64,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    pub timeout_seconds: u64,
    pub env: BTreeMap<String, String>,
    pub allowed_hosts: Vec<String>,
    pub add_hosts: Vec<(String, String)>,
    pub block_private_ips: Option<bool>,
    pub no_network: bool,
    pub dns_servers: Vec<String>,
    pub hostname: String,
    pub mtu: u32,
    pub secrets: BTreeMap<String, (String, Vec<String>)>,
    pub user: String,
    pub working_dir: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub port_forwards: Vec<PortForward>,
    pub port_forward_addresses: Vec<String>,
    pub launch_entrypoint: bool,
}

impl CreateOptions {
    /// The `create` params (spec §12.1): resources only when set, `network` only when any
    /// network option is set.
    pub fn to_params(&self) -> CreateParams {
        let set = |v: u64| (v > 0).then_some(v);
        let resources = ResourceParams {
            cpus: (self.cpus > 0.0).then_some(self.cpus),
            memory_mb: set(self.memory_mb),
            disk_size_mb: set(self.disk_size_mb),
            timeout_seconds: set(self.timeout_seconds),
        };
        let wants_network = !self.allowed_hosts.is_empty()
            || !self.add_hosts.is_empty()
            || !self.secrets.is_empty()
            || !self.dns_servers.is_empty()
            || !self.hostname.is_empty()
            || self.mtu > 0
            || self.no_network
            || self.block_private_ips.is_some();
        let network = wants_network.then(|| self.network());
        let image_config = ImageConfig {
            user: self.user.clone(),
            working_dir: self.working_dir.clone(),
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            env: BTreeMap::new(),
        };
        CreateParams {
            image: self.image.clone(),
            privileged: self.privileged,
            launch_entrypoint: self.launch_entrypoint,
            resources,
            network,
            env: self.env.clone(),
            image_config: (image_config != ImageConfig::default()).then_some(image_config),
            ..Default::default()
        }
    }

    /// The `network` section: egress settings only when the sandbox has a network.
    fn network(&self) -> NetworkConfig {
        let mut n = NetworkConfig {
            no_network: self.no_network,
            add_hosts: self
                .add_hosts
                .iter()
                .map(|(host, ip)| HostMapping {
                    host: host.clone(),
                    ip: ip.clone(),
                })
                .collect(),
            dns_servers: self.dns_servers.clone(),
            hostname: self.hostname.clone(),
            ..Default::default()
        };
        if !self.no_network {
            n.allowed_hosts = self.allowed_hosts.clone();
            n.block_private_ips = self.block_private_ips.unwrap_or(true);
            n.secrets = self
                .secrets
                .iter()
                .map(|(k, (value, hosts))| {
                    let secret = Secret {
                        value: value.clone(),
                        placeholder: String::new(),
                        hosts: hosts.clone(),
                    };
                    (k.clone(), secret)
                })
                .collect();
            n.mtu = self.mtu;
        }
        n
    }
}

/// Builder for a sandbox, mirroring the Go SDK (`sdk.New(image).WithCPUs(2)...`).
///
/// ```
/// use matchlock_sdk::Sandbox;
/// let opts = Sandbox::new("alpine:latest")
///     .with_cpus(1.0)
///     .with_memory(256)
///     .with_env("GREETING", "hi")
///     .with_port_forward(8080, 80)
///     .options();
/// assert_eq!(opts.memory_mb, 256);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    opts: CreateOptions,
}

impl Sandbox {
    pub fn new(image: impl Into<String>) -> Self {
        Sandbox {
            opts: CreateOptions {
                image: image.into(),
                ..Default::default()
            },
        }
    }
    pub fn with_privileged(mut self) -> Self {
        self.opts.privileged = true;
        self
    }
    pub fn with_cpus(mut self, cpus: f64) -> Self {
        self.opts.cpus = cpus;
        self
    }
    pub fn with_memory(mut self, mb: u64) -> Self {
        self.opts.memory_mb = mb;
        self
    }
    pub fn with_disk_size(mut self, mb: u64) -> Self {
        self.opts.disk_size_mb = mb;
        self
    }
    /// Sandbox lifetime in seconds (enforced by the server: the sandbox is stopped after it).
    pub fn with_timeout(mut self, seconds: u64) -> Self {
        self.opts.timeout_seconds = seconds;
        self
    }
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.opts.env.insert(key.into(), value.into());
        self
    }
    pub fn with_env_map(mut self, env: BTreeMap<String, String>) -> Self {
        self.opts.env.extend(env);
        self
    }
    pub fn allow_host(mut self, hosts: &[&str]) -> Self {
        self.opts
            .allowed_hosts
            .extend(hosts.iter().map(|h| h.to_string()));
        self
    }
    pub fn add_host(mut self, host: impl Into<String>, ip: impl Into<String>) -> Self {
        self.opts.add_hosts.push((host.into(), ip.into()));
        self
    }
    pub fn block_private_ips(self) -> Self {
        self.with_block_private_ips(true)
    }
    pub fn allow_private_ips(self) -> Self {
        self.with_block_private_ips(false)
    }
    pub fn with_block_private_ips(mut self, block: bool) -> Self {
        self.opts.block_private_ips = Some(block);
        self
    }
    pub fn unset_block_private_ips(mut self) -> Self {
        self.opts.block_private_ips = None;
        self
    }
    pub fn add_secret(mut self, name: &str, value: &str, hosts: &[&str]) -> Self {
        self.opts.secrets.insert(
            name.to_string(),
            (
                value.to_string(),
                hosts.iter().map(|h| h.to_string()).collect(),
            ),
        );
        self
    }
    pub fn with_dns_servers(mut self, servers: &[&str]) -> Self {
        self.opts
            .dns_servers
            .extend(servers.iter().map(|s| s.to_string()));
        self
    }
    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.opts.hostname = hostname.into();
        self
    }
    pub fn with_network_mtu(mut self, mtu: u32) -> Self {
        self.opts.mtu = mtu;
        self
    }
    pub fn with_no_network(mut self) -> Self {
        self.opts.no_network = true;
        self
    }
    pub fn with_port_forward(mut self, local: u16, remote: u16) -> Self {
        self.opts.port_forwards.push(PortForward {
            local_port: local,
            remote_port: remote,
        });
        self
    }
    pub fn with_port_forward_addresses(mut self, addresses: &[&str]) -> Self {
        self.opts
            .port_forward_addresses
            .extend(addresses.iter().map(|a| a.to_string()));
        self
    }
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.opts.user = user.into();
        self
    }
    pub fn with_working_dir(mut self, dir: impl Into<String>) -> Self {
        self.opts.working_dir = dir.into();
        self
    }
    /// Overrides the image ENTRYPOINT (and clears its CMD), as the Go SDK does.
    pub fn with_entrypoint(mut self, argv: &[&str]) -> Self {
        self.opts.entrypoint = argv.iter().map(|a| a.to_string()).collect();
        self
    }
    pub fn with_cmd(mut self, argv: &[&str]) -> Self {
        self.opts.cmd = argv.iter().map(|a| a.to_string()).collect();
        self
    }
    pub fn options(self) -> CreateOptions {
        self.opts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_api::rpc::to_value;
    use serde_json::json;

    #[test]
    fn params_like_the_sdks() {
        let p = to_value(&Sandbox::new("img").options().to_params());
        assert_eq!(p, json!({"image": "img"}));
        let p = to_value(
            &Sandbox::new("img")
                .with_memory(256)
                .with_env("A", "b")
                .with_no_network()
                .with_entrypoint(&["sh", "-c", "echo hi"])
                .options()
                .to_params(),
        );
        assert_eq!(p["resources"], json!({"memory_mb": 256}));
        assert_eq!(
            p["network"],
            json!({"no_network": true, "block_private_ips": true})
        );
        assert_eq!(p["env"], json!({"A": "b"}));
        assert_eq!(
            p["image_config"]["entrypoint"],
            json!(["sh", "-c", "echo hi"])
        );
        let p = to_value(
            &Sandbox::new("img")
                .allow_host(&["a.com"])
                .options()
                .to_params(),
        );
        assert_eq!(
            p["network"],
            json!({"allowed_hosts": ["a.com"], "block_private_ips": true})
        );
    }
}

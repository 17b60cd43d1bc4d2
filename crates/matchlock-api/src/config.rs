//! The sandbox configuration schema (spec §3), defaults (§3.1) and validation (§3.4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Default vCPUs (fractional values become a cgroup quota in the guest).
pub const DEFAULT_CPUS: f64 = 1.0;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Default size of the writable upper disk in MiB.
pub const DEFAULT_DISK_SIZE_MB: u64 = 5120;
/// Default command timeout in seconds.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
/// Default guest DNS resolvers.
pub const DEFAULT_DNS_SERVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];
/// Default MTU of the guest NIC.
pub const DEFAULT_MTU: u32 = 1500;

/// Errors of configuration validation; messages are the reference's, which tests grep for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid configuration: network.no_network cannot be combined with network.{0}")]
    NoNetworkConflict(&'static str),
    #[error("cpus must be a finite number > 0")]
    CpusInvalid,
    #[error("cpus must be <= host cpus ({0})")]
    CpusTooMany(usize),
    #[error("memory_mb must be > 0")]
    MemoryZero,
    #[error("disk_size_mb must be >= {min}")]
    DiskTooSmall { min: u64 },
    #[error("invalid add-host mapping: {0}")]
    AddHost(String),
    #[error("invalid hostname {0:?}: use letters, digits, '-' and '.', at most 64 characters")]
    Hostname(String),
    #[error("invalid configuration: vfs.workspace requires at least one vfs.mounts entry")]
    VfsWorkspaceWithoutMounts,
    #[error("invalid configuration: vfs.workspace is required when vfs.mounts is set")]
    VfsMountsWithoutWorkspace,
    #[error("invalid configuration: vfs.interception requires at least one vfs.mounts entry")]
    VfsInterceptionWithoutMounts,
    #[error("invalid configuration: invalid vfs.workspace {0:?}: must be absolute and contain only alphanumeric, '/', '_', '.', '-'")]
    VfsWorkspacePath(String),
    #[error("invalid configuration: vfs.mounts key {0:?} must be absolute")]
    VfsMountNotAbsolute(String),
    #[error("invalid configuration: vfs.mounts key {0:?} must be a clean path (no '.', '..', '//' or trailing '/')")]
    VfsMountNotClean(String),
    #[error(
        "invalid configuration: vfs.mounts key {key:?} must be within workspace {workspace:?}"
    )]
    VfsMountOutsideWorkspace { key: String, workspace: String },
}

/// `api.Config`: everything needed to create a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default)]
    pub image: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub launch_entrypoint: bool,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfs: Option<VfsConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config: Option<ImageConfig>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    #[serde(default = "default_disk")]
    pub disk_size_mb: u64,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

fn default_cpus() -> f64 {
    DEFAULT_CPUS
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_MB
}
fn default_disk() -> u64 {
    DEFAULT_DISK_SIZE_MB
}
fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: DEFAULT_CPUS,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_size_mb: DEFAULT_DISK_SIZE_MB,
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
        }
    }
}

impl Resources {
    /// Whole vCPUs to give the VM: `ceil(cpus)`.
    pub fn vcpus(&self) -> u32 {
        let c = self.cpus.ceil();
        if c.is_finite() && c >= 1.0 && c <= f64::from(u32::MAX) {
            // The range check above makes the conversion exact.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let v = c as u32;
            v
        } else {
            1
        }
    }

    /// Validates against this host's logical CPU count (spec §1.3.1 step 4).
    pub fn validate_for_host(&self) -> Result<(), ConfigError> {
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        self.validate(host_cpus)
    }

    /// Validates cpus against a logical CPU count.
    pub fn validate(&self, host_cpus: usize) -> Result<(), ConfigError> {
        if !self.cpus.is_finite() || self.cpus <= 0.0 {
            return Err(ConfigError::CpusInvalid);
        }
        if self.vcpus() as usize > host_cpus {
            return Err(ConfigError::CpusTooMany(host_cpus));
        }
        if self.memory_mb == 0 {
            return Err(ConfigError::MemoryZero);
        }
        if self.disk_size_mb < 16 {
            return Err(ConfigError::DiskTooSmall { min: 16 });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMapping {
    pub host: String,
    pub ip: String,
}

/// A secret: the guest only ever sees `placeholder`; `value` is swapped in on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub placeholder: String,
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The guest network. Absent (or `no_network: false`) means a network with open egress
/// except blocked address ranges; `block_private_ips` defaults to true when omitted (the
/// reference defaulted it to false, leaving private ranges reachable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_hosts: Vec<HostMapping>,
    #[serde(default = "default_true")]
    pub block_private_ips: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_network: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub intercept: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interception: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtu: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn default_true() -> bool {
    true
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            allowed_hosts: Vec::new(),
            add_hosts: Vec::new(),
            block_private_ips: true,
            no_network: false,
            intercept: false,
            interception: None,
            secrets: BTreeMap::new(),
            dns_servers: Vec::new(),
            hostname: String::new(),
            mtu: 0,
        }
    }
}

impl NetworkConfig {
    /// The reference's `network.Validate()` (only constrains `no_network`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.no_network {
            if !self.allowed_hosts.is_empty() {
                return Err(ConfigError::NoNetworkConflict("allowed_hosts"));
            }
            if !self.secrets.is_empty() {
                return Err(ConfigError::NoNetworkConflict("secrets"));
            }
            if self.intercept {
                return Err(ConfigError::NoNetworkConflict("intercept"));
            }
            if self.interception.is_some() {
                return Err(ConfigError::NoNetworkConflict("interception"));
            }
        }
        for m in &self.add_hosts {
            validate_host_mapping(&m.host, &m.ip)?;
        }
        if !self.hostname.is_empty() {
            validate_hostname(&self.hostname)?;
        }
        Ok(())
    }

    /// DNS servers, defaulted.
    pub fn dns(&self) -> Vec<String> {
        if self.dns_servers.is_empty() {
            DEFAULT_DNS_SERVERS.iter().map(|s| s.to_string()).collect()
        } else {
            self.dns_servers.clone()
        }
    }

    /// True when the configuration asks for something that needs a guest NIC or the
    /// interception proxy.
    pub fn needs_network_stack(&self) -> bool {
        !self.allowed_hosts.is_empty()
            || !self.secrets.is_empty()
            || self.intercept
            || self.interception.is_some()
    }
}

/// The workspace filesystem (`vfs` on the wire, spec §3.5): providers mounted at guest paths
/// under `workspace`. Unknown fields are ignored, as the reference does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VfsConfig {
    /// Guest path where the workspace is mounted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workspace: String,
    /// Guest path (absolute, within `workspace`) -> provider.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mounts: BTreeMap<String, MountConfig>,
    /// Interception rules (`matchlock_vfs::intercept`: before-phase blocks, file events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interception: Option<serde_json::Value>,
}

/// One mount of [`VfsConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountConfig {
    /// `host_fs`, `overlay` or `memory` (empty or unknown means `memory`, as the reference).
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_path: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// Owner the guest sees on every file of a `host_fs` mount (the host's owner otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// Group the guest sees on every file of a `host_fs` mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<u32>,
}

/// Whether `p` matches the reference's guest-mount pattern `^/[a-zA-Z0-9/_.-]+$`.
pub fn guest_mount_path_ok(p: &str) -> bool {
    p.len() > 1
        && p.starts_with('/')
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
}

/// Whether guest path `p` is `base` or below it, component-wise (`/w-x` is not below `/w`;
/// everything absolute is below `/`).
pub fn guest_path_within(p: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    base.is_empty() || p == base || p.strip_prefix(base).is_some_and(|r| r.starts_with('/'))
}

/// Whether `p` is absolute and has no empty, `.` or `..` component and no trailing `/`.
fn guest_path_clean(p: &str) -> bool {
    p == "/"
        || (p.starts_with('/')
            && p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."))
}

impl VfsConfig {
    /// The workspace with surrounding blanks removed.
    pub fn workspace(&self) -> &str {
        self.workspace.trim()
    }

    /// The reference's `ValidateVFS` (spec §3.4), plus clean mount keys (the router
    /// relies on them).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ws = self.workspace();
        let has_mounts = !self.mounts.is_empty();
        if !ws.is_empty() && !has_mounts {
            return Err(ConfigError::VfsWorkspaceWithoutMounts);
        }
        if has_mounts && ws.is_empty() {
            return Err(ConfigError::VfsMountsWithoutWorkspace);
        }
        if self.interception.is_some() && !has_mounts {
            return Err(ConfigError::VfsInterceptionWithoutMounts);
        }
        if ws.is_empty() {
            return Ok(());
        }
        if ws != "/" && !guest_mount_path_ok(ws) {
            return Err(ConfigError::VfsWorkspacePath(ws.to_string()));
        }
        for key in self.mounts.keys() {
            if !key.starts_with('/') {
                return Err(ConfigError::VfsMountNotAbsolute(key.clone()));
            }
            if !guest_path_clean(key) {
                return Err(ConfigError::VfsMountNotClean(key.clone()));
            }
            if !guest_path_within(key, ws) {
                return Err(ConfigError::VfsMountOutsideWorkspace {
                    key: key.clone(),
                    workspace: ws.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Whether the guest gets a workspace filesystem at all.
    pub fn enabled(&self) -> bool {
        !self.mounts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraDisk {
    pub host_path: String,
    pub guest_mount: String,
    #[serde(default)]
    pub readonly: bool,
}

/// The image's OCI config as the sandbox applies it (`image_config` on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Changes a caller asks for on top of an image's config (CLI flags, RPC `image_config`).
/// `None` keeps the image's value; `Some` replaces it (`Some(vec![])` clears ENTRYPOINT, as
/// `--entrypoint ""` does). `env` entries are added over the image's ENV.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOverrides {
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
}

impl ImageOverrides {
    /// The RPC form: the request's `image_config`, where empty fields mean "keep".
    pub fn from_request(req: &ImageConfig) -> ImageOverrides {
        let set = |s: &String| (!s.is_empty()).then(|| s.clone());
        let set_vec = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        ImageOverrides {
            user: set(&req.user),
            working_dir: set(&req.working_dir),
            entrypoint: set_vec(&req.entrypoint),
            cmd: set_vec(&req.cmd),
            env: req.env.clone(),
        }
    }
}

impl ImageConfig {
    /// This config with `o` applied (the one place overrides are merged).
    pub fn with_overrides(&self, o: &ImageOverrides) -> ImageConfig {
        let mut c = self.clone();
        if let Some(u) = &o.user {
            c.user = u.clone();
        }
        if let Some(w) = &o.working_dir {
            c.working_dir = w.clone();
        }
        if let Some(e) = &o.entrypoint {
            c.entrypoint = e.clone();
        }
        if let Some(cmd) = &o.cmd {
            c.cmd = cmd.clone();
        }
        c.env
            .extend(o.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        c
    }

    /// Docker's composition: ENTRYPOINT ++ (args if any, else CMD).
    pub fn compose(&self, args: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone();
        if args.is_empty() {
            argv.extend(self.cmd.iter().cloned());
        } else {
            argv.extend(args.iter().cloned());
        }
        argv
    }
}

/// Validates an `/etc/hosts` mapping (host non-empty, no whitespace or ':', IP parses).
pub fn validate_host_mapping(host: &str, ip: &str) -> Result<(), ConfigError> {
    if host.is_empty() {
        return Err(ConfigError::AddHost("host cannot be empty".into()));
    }
    if host.chars().any(|c| c.is_whitespace() || c == ':') {
        return Err(ConfigError::AddHost(format!(
            "host {host:?} must not contain whitespace or ':'"
        )));
    }
    if ip.parse::<std::net::IpAddr>().is_err() {
        return Err(ConfigError::AddHost(format!("invalid IP {ip:?}")));
    }
    Ok(())
}

/// Parses the CLI's `host:ip` form, splitting at the first ':' so IPv6 works.
pub fn parse_add_host(spec: &str) -> Result<HostMapping, ConfigError> {
    let Some((host, ip)) = spec.split_once(':') else {
        return Err(ConfigError::AddHost(format!("{spec:?} (expected host:ip)")));
    };
    let (host, ip) = (host.trim(), ip.trim());
    validate_host_mapping(host, ip)?;
    let ip = ip
        .parse::<std::net::IpAddr>()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| ip.to_string());
    Ok(HostMapping {
        host: host.to_string(),
        ip,
    })
}

/// Hostnames end up in the guest's `/etc/hosts` and `sethostname`, so keep them plain.
pub fn validate_hostname(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Hostname(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_rounds_up() {
        let r = Resources {
            cpus: 0.5,
            ..Default::default()
        };
        assert_eq!(r.vcpus(), 1);
        let r = Resources {
            cpus: 1.2,
            ..Default::default()
        };
        assert_eq!(r.vcpus(), 2);
        assert_eq!(r.validate(1), Err(ConfigError::CpusTooMany(1)));
        let r = Resources {
            cpus: f64::NAN,
            ..Default::default()
        };
        assert_eq!(r.validate(4), Err(ConfigError::CpusInvalid));
    }

    #[test]
    fn add_host_parsing() {
        assert_eq!(
            parse_add_host("api.internal:10.0.0.10").expect("ok"),
            HostMapping {
                host: "api.internal".into(),
                ip: "10.0.0.10".into()
            }
        );
        assert_eq!(
            parse_add_host("h:2001:db8::10").expect("v6").ip,
            "2001:db8::10"
        );
        for bad in ["invalid-spec", ":1.2.3.4", "a b:1.2.3.4", "h:notanip"] {
            let e = parse_add_host(bad).expect_err(bad).to_string();
            assert!(e.starts_with("invalid add-host mapping"), "{e}");
        }
    }

    #[test]
    fn overrides() {
        let img = ImageConfig {
            user: "app".into(),
            entrypoint: vec!["/ep".into()],
            cmd: vec!["c".into()],
            env: [("A".into(), "img".into()), ("B".into(), "img".into())].into(),
            ..Default::default()
        };
        let o = ImageOverrides {
            entrypoint: Some(vec![]),
            working_dir: Some("/w".into()),
            env: [("B".into(), "o".into())].into(),
            ..Default::default()
        };
        let c = img.with_overrides(&o);
        assert_eq!(c.user, "app");
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.cmd, ["c"]);
        assert_eq!(c.working_dir, "/w");
        assert_eq!((c.env["A"].as_str(), c.env["B"].as_str()), ("img", "o"));
        let req = ImageConfig {
            user: "u".into(),
            ..Default::default()
        };
        let o = ImageOverrides::from_request(&req);
        assert_eq!(o.user.as_deref(), Some("u"));
        assert_eq!(o.entrypoint, None);
        assert_eq!(img.with_overrides(&o).entrypoint, ["/ep"]);
    }

    #[test]
    fn compose_follows_docker() {
        let ic = ImageConfig {
            entrypoint: vec!["sh".into(), "-lc".into()],
            cmd: vec!["echo hello world".into()],
            ..Default::default()
        };
        assert_eq!(ic.compose(&[]), ["sh", "-lc", "echo hello world"]);
        assert_eq!(ic.compose(&["true".into()]), ["sh", "-lc", "true"]);
    }

    #[test]
    fn config_wire_names() {
        let c: Config = serde_json::from_str(
            r#"{"image":"alpine","resources":{"cpus":0.5},"network":{"no_network":true,"allowed_hosts":["x"]}}"#,
        )
        .expect("parse");
        assert_eq!(c.resources.memory_mb, DEFAULT_MEMORY_MB);
        let err = c
            .network
            .as_ref()
            .expect("net")
            .validate()
            .expect_err("conflict");
        assert_eq!(
            err.to_string(),
            "invalid configuration: network.no_network cannot be combined with network.allowed_hosts"
        );
    }

    #[test]
    fn vfs_validation_messages() {
        let v = |j: &str| -> Result<(), String> {
            let c: VfsConfig = serde_json::from_str(j).expect("parse");
            c.validate().map_err(|e| e.to_string())
        };
        assert_eq!(
            v(r#"{"workspace":"/w"}"#).expect_err("no mounts"),
            "invalid configuration: vfs.workspace requires at least one vfs.mounts entry"
        );
        assert_eq!(
            v(r#"{"mounts":{"/w":{}}}"#).expect_err("no ws"),
            "invalid configuration: vfs.workspace is required when vfs.mounts is set"
        );
        assert_eq!(
            v(r#"{"interception":{"rules":[]}}"#).expect_err("icpt"),
            "invalid configuration: vfs.interception requires at least one vfs.mounts entry"
        );
        assert!(v(r#"{"workspace":"/w","mounts":{"/x":{}}}"#)
            .expect_err("outside")
            .contains("must be within workspace"));
        assert!(v(r#"{"workspace":"/w","mounts":{"/w-x":{}}}"#)
            .expect_err("prefix")
            .contains("must be within workspace"));
        assert!(v(r#"{"workspace":"/w","mounts":{"w/x":{}}}"#)
            .expect_err("relative")
            .contains("must be absolute"));
        assert!(v(r#"{"workspace":"/w","mounts":{"/w/../etc":{}}}"#)
            .expect_err("dotdot")
            .contains("clean path"));
        assert!(v(r#"{"workspace":"/w x","mounts":{"/w x":{}}}"#)
            .expect_err("ws chars")
            .contains("vfs.workspace"));
        v(r#"{"workspace":"/w","mounts":{"/w":{"type":"host_fs","host_path":"/tmp","future":1}},"interception":null}"#)
            .expect("valid");
        v(r#"{"workspace":"/","mounts":{"/anything/x":{}}}"#).expect("root ws");
        v(r#"{}"#).expect("empty");
        let c: VfsConfig =
            serde_json::from_str(r#"{"workspace":"/w","mounts":{"/w/a":{"type":"host_fs","host_path":"/h","readonly":true}}}"#)
                .expect("parse");
        let m = &c.mounts["/w/a"];
        assert_eq!(
            (m.kind.as_str(), m.host_path.as_str(), m.readonly),
            ("host_fs", "/h", true)
        );
        let back = serde_json::to_value(&c).expect("ser");
        assert_eq!(back["mounts"]["/w/a"]["type"], "host_fs");
    }
}

//! Typed params and results of every method, and the params of every notification
//! (spec §2.4). Field names are the reference's wire names.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ExtraDisk, ImageConfig, NetworkConfig};

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Decodes params; absent (`null`) params are the type's default.
pub fn decode_params<T: DeserializeOwned + Default>(p: Value) -> Result<T, serde_json::Error> {
    if p.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(p)
}

/// Encodes params or a result as a JSON value.
pub fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `create` params as clients send them: only what the caller set; the server fills in the
/// defaults (an explicit `resources.timeout_seconds` is enforced, an absent one is not).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateParams {
    pub image: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub launch_entrypoint: bool,
    #[serde(default, skip_serializing_if = "ResourceParams::is_empty")]
    pub resources: ResourceParams,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfs: Option<Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config: Option<ImageConfig>,
}

/// The `resources` a client sets; unset fields take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

impl ResourceParams {
    pub fn is_empty(&self) -> bool {
        *self == ResourceParams::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateResult {
    pub id: String,
}

/// Params of `exec`, `exec_stream`, `exec_pipe` and `exec_tty`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecParams {
    #[serde(default)]
    pub command: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `exec_tty` only: initial terminal size (0 = 24x80).
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub rows: u16,
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub cols: u16,
}

/// Result of `exec` (output captured, base64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
}

/// Result of the streaming exec methods (output went out as notifications).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStreamResult {
    pub exit_code: i32,
    pub duration_ms: u64,
}

/// Params of output notifications (`exec_*.stdout`, `exec_*.stderr`, `log_stream.data`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamData {
    pub id: Value,
    /// Base64.
    #[serde(default)]
    pub data: String,
}

/// Params of `exec_pipe.ready` / `exec_tty.ready`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadyParams {
    pub id: Value,
}

/// Params of the input notifications: `*.stdin` (data), `*.stdin_eof`, `exec_tty.resize`
/// (rows, cols). `id` is the exec request's id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputParams {
    #[serde(default)]
    pub id: Value,
    /// Base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub rows: u16,
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub cols: u16,
}

/// Params of `write_file` (path, content, mode), `read_file` and `list_files` (path).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileParams {
    #[serde(default)]
    pub path: String,
    /// Base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    /// 0 = 0644.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub mode: u32,
}

/// Result of `read_file` and `log` (base64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentResult {
    pub content: String,
}

/// One entry of `list_files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Go `os.FileMode` bits (permissions low; directory bit 31).
    pub mode: u32,
    #[serde(default)]
    pub mod_time: String,
    pub is_dir: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilesResult {
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// Params of `allow_list_add` / `allow_list_delete`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsParams {
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// Result of `allow_list_add`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowListAddResult {
    #[serde(default)]
    pub added: Vec<String>,
    /// The allow-list now (empty: every host allowed).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// Result of `allow_list_delete`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowListDeleteResult {
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// One `[LOCAL:]REMOTE` mapping (local 0 lets the OS choose).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(default)]
    pub local_port: u16,
    #[serde(default)]
    pub remote_port: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForwardParams {
    #[serde(default)]
    pub forwards: Vec<PortMapping>,
    /// Empty = 127.0.0.1.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A listener the server bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    pub address: String,
    pub local_port: u16,
    pub remote_port: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForwardResult {
    pub bindings: Vec<PortBinding>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CancelParams {
    #[serde(default)]
    pub id: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResult {
    pub cancelled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloseParams {
    /// Grace period for a clean guest shutdown.
    #[serde(default)]
    pub timeout_seconds: f64,
}

/// The empty result `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use serde_json::json;

    #[test]
    fn create_params_decode_as_config() {
        let p = CreateParams {
            image: "busybox:local".into(),
            launch_entrypoint: true,
            resources: ResourceParams {
                memory_mb: Some(256),
                ..Default::default()
            },
            env: [("A".into(), "b".into())].into(),
            image_config: Some(ImageConfig {
                user: "app".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = to_value(&p);
        assert_eq!(v["resources"], json!({"memory_mb": 256}));
        let cfg: Config = serde_json::from_value(v).expect("server decodes it");
        assert_eq!(cfg.image, "busybox:local");
        assert!(cfg.launch_entrypoint);
        assert_eq!(cfg.resources.memory_mb, 256);
        assert_eq!(cfg.env["A"], "b");
        assert_eq!(cfg.image_config.map(|c| c.user), Some("app".into()));
        assert_eq!(to_value(&CreateParams::default()), json!({"image": ""}));
    }

    #[test]
    fn optional_fields_are_omitted() {
        assert_eq!(
            to_value(&ExecParams {
                command: "true".into(),
                ..Default::default()
            }),
            json!({"command": "true"})
        );
        assert_eq!(
            to_value(&InputParams {
                id: json!(3),
                ..Default::default()
            }),
            json!({"id": 3})
        );
        assert_eq!(to_value(&Empty {}), json!({}));
        let p: FileParams = decode_params(Value::Null).expect("null");
        assert_eq!(p, FileParams::default());
    }
}

/// Params of the `event` notification (spec §2.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventParams {
    /// `network`, `file` or `exec`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds for network events, Unix milliseconds for file events (as the reference).
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkEventInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileEventInfo>,
}

/// One guest filesystem operation in the workspace (spec §9.5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEventInfo {
    /// Hook op name (`create`, `write`, `rename`, ...).
    #[serde(default)]
    pub op: String,
    /// Absolute guest path.
    #[serde(default)]
    pub path: String,
    /// Bytes transferred (read/write), the new size (truncate), else 0.
    #[serde(default)]
    pub size: u64,
    /// Go `os.FileMode` bits.
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

/// One HTTP(S) request through the interception proxy, or one blocked connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkEventInfo {
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub request_bytes: u64,
    #[serde(default)]
    pub response_bytes: u64,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub block_reason: String,
}

//! `create` parameters: defaults merged with the request and validated (spec §3.1-3.4).
//!
//! # Design
//! The request is decoded into [`matchlock_api::Config`]; resources that are missing or not
//! positive keep their defaults (the reference merges field-wise); `network`, `vfs`, `env`,
//! `image_config` and `extra_disks` are taken wholesale when present. Validation messages are
//! the reference's. Whether `resources.timeout_seconds` was given explicitly is remembered:
//! only then is it enforced (as the CLI does), so clients that never set it keep sandboxes as
//! long as they like.
//!
//! # Limitations
//! VFS interception rules are validated but not applied yet; `create` refuses them (see the
//! handler) instead of ignoring them.

use matchlock_api::{Config, Resources};
use serde_json::Value;

use crate::error::Failure;

/// A validated `create` request.
#[derive(Debug, Clone)]
pub struct CreatePlan {
    pub config: Config,
    /// `resources.timeout_seconds` when the client set it (> 0).
    pub lifetime_secs: Option<u64>,
}

/// Decodes, merges with defaults and validates `create` params.
pub fn plan(params: Value) -> Result<CreatePlan, Failure> {
    let explicit_timeout = params
        .get("resources")
        .and_then(|r| r.get("timeout_seconds"))
        .and_then(Value::as_f64)
        .filter(|t| *t > 0.0);
    // Non-positive numbers mean "default" (the reference merges only values > 0); drop them
    // before decoding so unsigned fields do not reject them.
    let mut params = params;
    if let Some(Value::Object(r)) = params.get_mut("resources") {
        r.retain(|_, v| v.as_f64().is_none_or(|n| n > 0.0));
        if let Some(t) = explicit_timeout {
            r.insert("timeout_seconds".into(), Value::from(ceil_secs(t)));
        }
    }
    let mut cfg: Config = serde_json::from_value(params).map_err(Failure::Params)?;
    if cfg.image.trim().is_empty() {
        return Err(Failure::ImageRequired);
    }
    if !cfg.id.is_empty() {
        return Err(Failure::IdInternal);
    }
    let d = Resources::default();
    let r = &mut cfg.resources;
    if r.cpus.is_nan() || r.cpus <= 0.0 {
        r.cpus = d.cpus;
    }
    if r.memory_mb == 0 {
        r.memory_mb = d.memory_mb;
    }
    if r.disk_size_mb == 0 {
        r.disk_size_mb = d.disk_size_mb;
    }
    if r.timeout_seconds == 0 {
        r.timeout_seconds = d.timeout_seconds;
    }
    if let Some(n) = &cfg.network {
        n.validate().map_err(Failure::Config)?;
    }
    if let Some(v) = &cfg.vfs {
        v.validate().map_err(Failure::Config)?;
    }
    Ok(CreatePlan {
        config: cfg,
        lifetime_secs: explicit_timeout.map(ceil_secs),
    })
}

/// Whole seconds; a fraction rounds up so a tiny timeout is never "no timeout".
fn ceil_secs(t: f64) -> u64 {
    // `t` is finite and positive here; the float-to-int cast saturates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let s = t.ceil() as u64;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_and_defaults() {
        let p =
            plan(json!({"image": "a", "resources": {"memory_mb": 256, "cpus": 0}})).expect("plan");
        assert_eq!(p.config.resources.memory_mb, 256);
        assert!((p.config.resources.cpus - 1.0).abs() < f64::EPSILON);
        assert_eq!(p.config.resources.disk_size_mb, 5120);
        assert_eq!(p.config.resources.timeout_seconds, 300);
        assert_eq!(p.lifetime_secs, None);
        let p = plan(json!({"image": "a", "resources": {"timeout_seconds": 2.5}})).expect("t");
        assert_eq!(p.lifetime_secs, Some(3));
        let p = plan(json!({"image": "a", "resources": {"timeout_seconds": -1}})).expect("neg");
        assert_eq!(p.lifetime_secs, None);
    }

    #[test]
    fn validation_messages() {
        let msg = |v: Value| plan(v).expect_err("invalid").message();
        assert_eq!(msg(json!({})), "image is required (e.g., alpine:latest)");
        assert_eq!(
            msg(json!({"image": "a", "id": "vm-1"})),
            "id is internal-only and cannot be set"
        );
        assert!(msg(
            json!({"image": "a", "network": {"no_network": true, "allowed_hosts": ["x"]}})
        )
        .contains("network.no_network"));
        assert!(msg(json!({"image": "a", "vfs": {"workspace": "/w"}}))
            .contains("requires at least one"));
        assert!(msg(json!({"image": "a", "vfs": {"mounts": {"/w": {}}}}))
            .contains("vfs.workspace is required"));
        assert!(
            msg(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {"/x": {}}}}))
                .contains("must be within workspace")
        );
        assert!(
            msg(json!({"image": "a", "vfs": {"interception": {"rules": []}}}))
                .contains("requires at least one")
        );
        assert!(
            plan(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {"/w/d": {}}}})).is_ok()
        );
        assert_eq!(plan(json!({"image": 5})).expect_err("type").code(), -32602);
    }
}

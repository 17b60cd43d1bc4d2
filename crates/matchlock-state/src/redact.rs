//! Redaction of secret values from sandbox configs before they are stored.
//!
//! # Design
//! The reference persists `network.secrets.*.value` in plaintext and prints it from `get` and
//! `inspect` (spec §15.27). We replace each value with [`REDACTED`] inside `register`, so no
//! caller can forget; names, hosts and placeholders stay visible because they are not secret.
//!
//! # Limitations
//! Only the documented location is redacted. Secrets a user puts in `env` are stored as given
//! (the reference's tests rely on `env` being visible in `get`).

use serde_json::Value;

/// What a secret value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Replaces every `network.secrets.<NAME>.value` with [`REDACTED`]. A secret given as a bare
/// string (not the schema, but cheap to cover) is replaced entirely.
pub fn redact_config(config: &mut Value) {
    let Some(secrets) = config
        .get_mut("network")
        .and_then(|n| n.get_mut("secrets"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for secret in secrets.values_mut() {
        match secret {
            Value::Object(fields) => {
                if let Some(v) = fields.get_mut("value") {
                    *v = Value::String(REDACTED.to_owned());
                }
            }
            Value::String(s) => *s = REDACTED.to_owned(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redacts_values_keeps_the_rest() {
        let mut c = json!({
            "image": "alpine",
            "env": {"A": "b"},
            "network": {"allowed_hosts": ["x"], "secrets": {
                "K": {"value": "sk-123", "hosts": ["api.x.com"], "placeholder": "P"},
                "L": {"hosts": []},
                "M": "raw-secret"
            }}
        });
        redact_config(&mut c);
        assert_eq!(c["network"]["secrets"]["K"]["value"], REDACTED);
        assert_eq!(c["network"]["secrets"]["K"]["hosts"][0], "api.x.com");
        assert_eq!(c["network"]["secrets"]["K"]["placeholder"], "P");
        assert!(c["network"]["secrets"]["L"].get("value").is_none());
        assert_eq!(c["network"]["secrets"]["M"], REDACTED);
        assert_eq!(c["env"]["A"], "b");
        assert!(!c.to_string().contains("sk-123"));
    }

    #[test]
    fn configs_without_secrets_are_untouched() {
        for v in [
            json!(null),
            json!({"network": null}),
            json!({"network": {"secrets": []}}),
        ] {
            let mut c = v.clone();
            redact_config(&mut c);
            assert_eq!(c, v);
        }
    }
}

//! Compiling `network.interception.rules[]` into matchable rules (spec §3.6, §7.7.1).
//!
//! # Design
//! Normalisation follows the reference exactly: phase `after` else `before`; action
//! `block`/`mutate` else `allow`, and `allow` with any mutation field *for the rule's phase*
//! becomes `mutate`; header names canonicalised (they become `http::HeaderName`s, which
//! compare case-insensitively); names, query keys and paths trimmed, empty keys and empty
//! `find`s dropped; delete lists de-duplicated; methods upper-cased; a rule that is not a
//! block, has no mutation for its phase and no `callback_id` is dropped.
//!
//! Matching is stricter than the reference where a guest could otherwise dodge a `block`
//! rule: host globs match ASCII case-insensitively and without one trailing dot (as DNS
//! names do), and the path glob is tried on the decoded path *and* on its cleaned form
//! (`.`/`..` segments and repeated `/` resolved, as upstream servers do), a match on
//! either counting. Also unlike the reference, a header name or value that HTTP cannot
//! carry (a space in a name, a newline in a value) fails compilation, so create fails
//! with a message naming the rule instead of the proxy producing a broken request later.
//!
//! # Limitations
//! Mutation fields of the other phase are kept but never used (as the reference).

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::wire::{ReplacementWire, RuleWire};
use super::HookError;
use crate::policy::glob_match;
use matchlock_api::pathglob::path_match;

/// When a rule runs: on the request before it goes upstream, or on the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Request phase (the default).
    Before,
    /// Response phase.
    After,
}

impl Phase {
    /// The wire name (`before` / `after`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Before => "before",
            Phase::After => "after",
        }
    }

    fn parse(s: Option<&str>) -> Phase {
        match s.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Some("after") => Phase::After,
            _ => Phase::Before,
        }
    }
}

/// A normalised action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Block,
    Mutate,
}

impl Action {
    pub(crate) fn parse(s: Option<&str>) -> Action {
        match s.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Some("block") => Action::Block,
            Some("mutate") => Action::Mutate,
            _ => Action::Allow,
        }
    }
}

/// One literal body replacement (`find` is never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// The bytes to find.
    pub find: Vec<u8>,
    /// What replaces each occurrence.
    pub replace: Vec<u8>,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub name: String,
    pub phase: Phase,
    pub action: Action,
    pub callback_id: Option<String>,
    pub timeout_ms: u64,
    pub hosts: Vec<String>,
    pub methods: Vec<String>,
    pub path: Option<String>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub delete_headers: Vec<HeaderName>,
    pub set_query: Vec<(String, String)>,
    pub delete_query: Vec<String>,
    pub rewrite_path: Option<String>,
    pub set_response_headers: Vec<(HeaderName, HeaderValue)>,
    pub delete_response_headers: Vec<HeaderName>,
    pub body_replacements: Vec<Replacement>,
}

impl Rule {
    /// Compiles wire rule number `index`; `None` when it has nothing to do.
    pub(crate) fn compile(index: usize, w: RuleWire) -> Result<Option<Rule>, HookError> {
        let name = w.name.unwrap_or_default();
        let phase = Phase::parse(w.phase.as_deref());
        let rule = Rule {
            phase,
            action: Action::parse(w.action.as_deref()),
            callback_id: non_empty(w.callback_id),
            timeout_ms: w
                .timeout_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .unwrap_or(0),
            hosts: trimmed_list(w.hosts, false)
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            methods: w
                .methods
                .unwrap_or_default()
                .iter()
                .map(|m| m.trim().to_ascii_uppercase())
                .filter(|m| !m.is_empty())
                .collect(),
            path: non_empty(w.path),
            set_headers: header_set(index, &name, w.set_headers)?,
            delete_headers: header_delete(index, &name, w.delete_headers)?,
            set_query: w
                .set_query
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.trim().to_owned(), v))
                .filter(|(k, _)| !k.is_empty())
                .collect(),
            delete_query: trimmed_list(w.delete_query, true),
            rewrite_path: non_empty(w.rewrite_path),
            set_response_headers: header_set(index, &name, w.set_response_headers)?,
            delete_response_headers: header_delete(index, &name, w.delete_response_headers)?,
            body_replacements: replacements(w.body_replacements),
            name,
        };
        let mut rule = rule;
        if rule.action == Action::Allow && rule.has_mutations() {
            rule.action = Action::Mutate;
        }
        let effective =
            rule.action == Action::Block || rule.has_mutations() || rule.callback_id.is_some();
        Ok(effective.then_some(rule))
    }

    /// Whether the rule mutates anything in its own phase.
    pub(crate) fn has_mutations(&self) -> bool {
        match self.phase {
            Phase::Before => {
                !self.set_headers.is_empty()
                    || !self.delete_headers.is_empty()
                    || !self.set_query.is_empty()
                    || !self.delete_query.is_empty()
                    || self.rewrite_path.is_some()
            }
            Phase::After => {
                !self.set_response_headers.is_empty()
                    || !self.delete_response_headers.is_empty()
                    || !self.body_replacements.is_empty()
            }
        }
    }

    /// Host globs (any; empty = all; ASCII case-insensitive, trailing dot ignored), methods
    /// (empty = all), path (Go `path.Match` on the decoded path, `/` when empty, or on its
    /// cleaned form; a bad pattern never matches).
    pub(crate) fn matches(&self, host: &str, method: &str, path: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        if !self.hosts.is_empty() && !self.hosts.iter().any(|p| glob_match(p, host)) {
            return false;
        }
        if !self.methods.is_empty() {
            let method = method.trim().to_ascii_uppercase();
            if !self.methods.contains(&method) {
                return false;
            }
        }
        if let Some(pattern) = &self.path {
            let path = if path.is_empty() { "/" } else { path };
            if !path_match(pattern, path) && !path_match(pattern, &clean_path(path)) {
                return false;
            }
        }
        true
    }

    /// The callback timeout: the rule's `timeout_ms`, or [`super::DEFAULT_CALLBACK_TIMEOUT`].
    pub(crate) fn callback_timeout(&self) -> Duration {
        if self.timeout_ms == 0 {
            super::DEFAULT_CALLBACK_TIMEOUT
        } else {
            Duration::from_millis(self.timeout_ms)
        }
    }
}

/// The path with empty, `.` and `..` segments resolved (Go `path.Clean`, keeping a
/// trailing `/`).
pub(crate) fn clean_path(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = format!("/{}", segments.join("/"));
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    if trailing && out != "/" {
        out.push('/');
    }
    out
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn trimmed_list(list: Option<Vec<String>>, dedup: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in list.unwrap_or_default() {
        let item = item.trim();
        if item.is_empty() || (dedup && out.iter().any(|x| x == item)) {
            continue;
        }
        out.push(item.to_owned());
    }
    out
}

fn header_name(index: usize, rule: &str, name: &str) -> Result<HeaderName, HookError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|source| HookError::HeaderName {
        index,
        rule: rule.to_owned(),
        name: name.to_owned(),
        source,
    })
}

fn header_set(
    index: usize,
    rule: &str,
    map: Option<BTreeMap<String, String>>,
) -> Result<Vec<(HeaderName, HeaderValue)>, HookError> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for (k, v) in map.unwrap_or_default() {
        let k = k.trim();
        if k.is_empty() {
            continue;
        }
        let name = header_name(index, rule, k)?;
        let value = HeaderValue::from_str(&v).map_err(|source| HookError::HeaderValue {
            index,
            rule: rule.to_owned(),
            name: k.to_owned(),
            source,
        })?;
        // Two spellings of one header: the later (in sorted key order) wins.
        out.retain(|(n, _)| *n != name);
        out.push((name, value));
    }
    Ok(out)
}

fn header_delete(
    index: usize,
    rule: &str,
    list: Option<Vec<String>>,
) -> Result<Vec<HeaderName>, HookError> {
    let mut out: Vec<HeaderName> = Vec::new();
    for k in list.unwrap_or_default() {
        let k = k.trim();
        if k.is_empty() {
            continue;
        }
        let name = header_name(index, rule, k)?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Drops empty `find`s; a missing `replace` is the empty string.
pub(crate) fn replacements(list: Option<Vec<ReplacementWire>>) -> Vec<Replacement> {
    list.unwrap_or_default()
        .into_iter()
        .filter_map(|r| {
            let find = r.find.unwrap_or_default();
            (!find.is_empty()).then(|| Replacement {
                find: find.into_bytes(),
                replace: r.replace.unwrap_or_default().into_bytes(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{clean_path, Action, Phase, Rule};
    use crate::hooks::wire::RuleWire;

    fn compile(v: serde_json::Value) -> Option<Rule> {
        let w: RuleWire = serde_json::from_value(v).expect("wire rule");
        Rule::compile(0, w).expect("compiles")
    }

    #[test]
    fn normalised_fields() {
        let r = compile(serde_json::json!({
            "name": "n", "phase": " After ", "action": "ALLOW", "callback_id": "  ",
            "hosts": [" a.example ", "", "B.example"], "methods": ["get", " Post", ""],
            "path": " /p/* ", "timeout_ms": -5,
            "set_response_headers": {"x-a": "1", "X-A": "2", "": "z"},
            "delete_response_headers": ["x-b", "X-B", " ", "x-c"],
            "body_replacements": [{"find": "f"}, {"find": "", "replace": "r"}],
            "set_headers": {"X-Before": "ignored in after"}
        }))
        .expect("kept");
        assert_eq!(r.phase, Phase::After);
        assert_eq!(r.action, Action::Mutate);
        assert_eq!(r.callback_id, None);
        assert_eq!(r.timeout_ms, 0);
        assert_eq!(r.hosts, ["a.example", "b.example"]);
        assert_eq!(r.methods, ["GET", "POST"]);
        assert_eq!(r.path.as_deref(), Some("/p/*"));
        assert_eq!(r.set_response_headers.len(), 1);
        assert_eq!(r.set_response_headers[0].1, "1");
        let deleted: Vec<&str> = r
            .delete_response_headers
            .iter()
            .map(|h| h.as_str())
            .collect();
        assert_eq!(deleted, ["x-b", "x-c"]);
        assert_eq!(r.body_replacements.len(), 1);
        assert_eq!(r.body_replacements[0].replace, b"");
        // block stays block even with mutations; a callback-only rule is kept as allow.
        let r = compile(serde_json::json!({"action": "block", "set_headers": {"a": "b"}}));
        assert_eq!(r.map(|r| r.action), Some(Action::Block));
        let r = compile(serde_json::json!({"callback_id": "network_hook_1", "timeout_ms": 250}));
        let r = r.expect("kept");
        assert_eq!((r.action, r.timeout_ms), (Action::Allow, 250));
    }

    #[test]
    fn clean_path_resolves_dot_segments() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a//b", "/a/b"),
            ("/x/../admin/y", "/admin/y"),
            ("/./admin/./y", "/admin/y"),
            ("/../../admin", "/admin"),
            ("/a/b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("//", "/"),
        ] {
            assert_eq!(clean_path(input), want, "{input}");
        }
    }
}

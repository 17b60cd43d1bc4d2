//! VFS interception rules: the wire form (spec §3.7), compilation (§9.4) and matching.
//!
//! # Design
//! Only what the host can honour is kept: `block` rules in the `before` phase. `allow` rules
//! are no-ops and are dropped, as are rules with any other action (the SDKs keep their
//! callback rules locally, §12.5) and after-phase blocks (the reference compiles them but
//! they never fire). Unknown op names are dropped from a rule; a rule whose op list becomes
//! empty because every name was unknown is dropped too, rather than widening to "all ops"
//! (an empty list on the wire still means all ops).

use serde::Deserialize;

use matchlock_api::pathglob::path_match;

/// Most rules one sandbox may carry: matching is linear per operation.
pub const MAX_RULES: usize = 256;

/// One filesystem operation as hooks and events name it (spec §9.4 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Stat,
    ReadDir,
    Open,
    Create,
    Mkdir,
    Chmod,
    Remove,
    RemoveAll,
    Rename,
    Symlink,
    Readlink,
    Read,
    Write,
    Close,
    Sync,
    Truncate,
}

impl Op {
    /// The op's wire name (as in events and rules).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Stat => "stat",
            Op::ReadDir => "readdir",
            Op::Open => "open",
            Op::Create => "create",
            Op::Mkdir => "mkdir",
            Op::Chmod => "chmod",
            Op::Remove => "remove",
            Op::RemoveAll => "remove_all",
            Op::Rename => "rename",
            Op::Symlink => "symlink",
            Op::Readlink => "readlink",
            Op::Read => "read",
            Op::Write => "write",
            Op::Close => "close",
            Op::Sync => "sync",
            Op::Truncate => "truncate",
        }
    }

    /// Parses a wire op name, case-insensitively, with the reference's aliases.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "stat" => Op::Stat,
            "readdir" | "read_dir" => Op::ReadDir,
            "open" => Op::Open,
            "create" => Op::Create,
            "mkdir" => Op::Mkdir,
            "chmod" => Op::Chmod,
            "remove" => Op::Remove,
            "remove_all" | "removeall" => Op::RemoveAll,
            "rename" => Op::Rename,
            "symlink" => Op::Symlink,
            "readlink" => Op::Readlink,
            "read" => Op::Read,
            "write" => Op::Write,
            "close" => Op::Close,
            "sync" => Op::Sync,
            "truncate" => Op::Truncate,
            _ => return None,
        })
    }
}

/// `vfs.interception` as sent by clients (spec §3.7, §12.3).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct InterceptionWire {
    #[serde(default)]
    pub emit_events: bool,
    #[serde(default)]
    pub rules: Vec<RuleWire>,
}

/// One `VFSHookRule` in its wire form.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuleWire {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub ops: Vec<String>,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub timeout_ms: u64,
}

/// Why an interception config was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("vfs.interception is not a valid interception config")]
    Parse(#[source] serde_json::Error),
    #[error("vfs.interception has {count} rules; at most {max} are allowed")]
    TooMany { count: usize, max: usize },
}

/// A compiled before-phase block rule.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRule {
    pub name: String,
    /// Empty = every op.
    pub ops: Vec<Op>,
    /// Go `path.Match` pattern on the cleaned guest path; empty = every path.
    pub path: String,
}

impl BlockRule {
    fn matches(&self, op: Op, path: &str) -> bool {
        (self.ops.is_empty() || self.ops.contains(&op))
            && (self.path.is_empty() || path_match(&self.path, path))
    }
}

/// What the host enforces and reports for one sandbox's workspace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pub blocks: Vec<BlockRule>,
    pub emit_events: bool,
}

impl Rules {
    /// Compiles `vfs.interception` as carried in the config (absent = nothing to do).
    pub fn from_config(value: Option<&serde_json::Value>) -> Result<Option<Rules>, RulesError> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => {
                let wire: InterceptionWire =
                    serde_json::from_value(v.clone()).map_err(RulesError::Parse)?;
                Rules::compile(&wire)
            }
        }
    }

    /// Compiles the wire form; `None` when nothing would be enforced or reported (no engine,
    /// as the reference).
    pub fn compile(wire: &InterceptionWire) -> Result<Option<Rules>, RulesError> {
        if wire.rules.len() > MAX_RULES {
            return Err(RulesError::TooMany {
                count: wire.rules.len(),
                max: MAX_RULES,
            });
        }
        let blocks: Vec<BlockRule> = wire.rules.iter().filter_map(compile_rule).collect();
        if blocks.is_empty() && !wire.emit_events {
            return Ok(None);
        }
        Ok(Some(Rules {
            blocks,
            emit_events: wire.emit_events,
        }))
    }

    /// The first block rule matching `op` on `path`, if any.
    pub fn blocking(&self, op: Op, path: &str) -> Option<&BlockRule> {
        self.blocks.iter().find(|r| r.matches(op, path))
    }
}

fn compile_rule(w: &RuleWire) -> Option<BlockRule> {
    let after = w.phase.trim().eq_ignore_ascii_case("after");
    let action = w.action.trim().to_ascii_lowercase();
    if after || action != "block" {
        return None;
    }
    let ops: Vec<Op> = w.ops.iter().filter_map(|o| Op::parse(o)).collect();
    if ops.is_empty() && !w.ops.is_empty() {
        return None;
    }
    Some(BlockRule {
        name: w.name.clone(),
        ops,
        path: w.path.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(phase: &str, ops: &[&str], path: &str, action: &str) -> RuleWire {
        RuleWire {
            phase: phase.into(),
            ops: ops.iter().map(|s| s.to_string()).collect(),
            path: path.into(),
            action: action.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_before_blocks_survive() {
        let wire = InterceptionWire {
            emit_events: false,
            rules: vec![
                rule("before", &["create"], "/workspace/a", "allow"),
                rule("AFTER", &["create"], "/workspace/b", "block"),
                rule("", &["create"], "/workspace/c", "mutate_write"),
                rule("Before", &["CREATE", "bogus"], "/workspace/d", "Block"),
                rule("before", &["bogus"], "/workspace/e", "block"),
            ],
        };
        let r = Rules::compile(&wire).expect("compiles").expect("engine");
        assert_eq!(r.blocks.len(), 1);
        assert_eq!(r.blocks[0].ops, vec![Op::Create]);
        assert_eq!(r.blocks[0].path, "/workspace/d");
    }

    #[test]
    fn nothing_to_do_means_no_engine() {
        let wire = InterceptionWire {
            emit_events: false,
            rules: vec![rule("before", &[], "", "allow")],
        };
        assert!(Rules::compile(&wire).expect("compiles").is_none());
        let events = InterceptionWire {
            emit_events: true,
            rules: vec![],
        };
        assert!(Rules::compile(&events).expect("compiles").is_some());
    }

    #[test]
    fn matching_uses_go_path_match() {
        let wire = InterceptionWire {
            emit_events: false,
            rules: vec![rule("before", &[], "/workspace/*.txt", "block")],
        };
        let r = Rules::compile(&wire).expect("compiles").expect("engine");
        assert!(r.blocking(Op::Write, "/workspace/a.txt").is_some());
        assert!(r.blocking(Op::Stat, "/workspace/a.txt").is_some());
        assert!(r.blocking(Op::Write, "/workspace/d/a.txt").is_none());
        assert!(r.blocking(Op::Write, "/workspace/a.bin").is_none());
    }

    #[test]
    fn aliases_parse() {
        assert_eq!(Op::parse("read_dir"), Some(Op::ReadDir));
        assert_eq!(Op::parse("RemoveAll"), Some(Op::RemoveAll));
        assert_eq!(Op::parse("link"), None);
    }

    #[test]
    fn too_many_rules_refused() {
        let wire = InterceptionWire {
            emit_events: false,
            rules: vec![RuleWire::default(); MAX_RULES + 1],
        };
        assert!(matches!(
            Rules::compile(&wire),
            Err(RulesError::TooMany { .. })
        ));
    }
}

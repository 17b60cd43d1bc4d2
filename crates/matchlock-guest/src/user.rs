//! User resolution from the image's `/etc/passwd` and `/etc/group`.
//!
//! # Design
//! Pure parsing over file contents (no NSS, no libc lookups: a static binary cannot load NSS
//! modules and the image's files are the only source of truth). Accepted specs follow Docker:
//! `uid`, `uid:gid`, `name`, `name:group`, with each side numeric or a name. A numeric uid
//! without a passwd entry gets gid = uid and no home. The supplementary groups are every
//! `/etc/group` entry listing the user's name as a member.
//!
//! # Limitations
//! Malformed passwd/group lines are skipped, not reported. Numeric ids must fit `u32`.

#![forbid(unsafe_code)]

use std::path::Path;

/// A resolved identity for a child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (not including `gid`), from `/etc/group`.
    pub groups: Vec<u32>,
    /// Home directory from passwd, if the uid has an entry.
    pub home: Option<String>,
}

impl Identity {
    pub fn root() -> Self {
        Identity {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: Some("/root".to_string()),
        }
    }

    /// `[gid]` followed by the supplementary groups, without duplicates.
    pub fn all_groups(&self) -> Vec<u32> {
        let mut v = vec![self.gid];
        for g in &self.groups {
            if !v.contains(g) {
                v.push(*g);
            }
        }
        v
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found")]
    UnknownUser(String),
    #[error("group {0:?} not found")]
    UnknownGroup(String),
    #[error("invalid user spec {0:?}")]
    BadSpec(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn content_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    content_lines(text)
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(7, ':').collect();
            Some(PasswdEntry {
                name: (*f.first()?).to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    content_lines(text)
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(4, ':').collect();
            Some(GroupEntry {
                name: (*f.first()?).to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `spec` against the contents of passwd and group files. Empty spec means root.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Identity::root());
    }
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(UserError::BadSpec(spec.to_string()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|u| u.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|u| u.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => e.uid,
        (None, Ok(uid)) => uid,
        (None, Err(_)) => return Err(UserError::UnknownUser(user_part.to_string())),
    };
    let gid = match group_part {
        None => entry.map_or(uid, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?
                    .gid
            }
        },
    };
    let supplementary = match entry {
        Some(e) => groups
            .iter()
            .filter(|g| g.members.contains(&e.name) && g.gid != gid)
            .map(|g| g.gid)
            .collect(),
        None => Vec::new(),
    };
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.home.clone()).filter(|h| !h.is_empty()),
    })
}

/// Resolves `spec` using `<root>/etc/passwd` and `<root>/etc/group` (missing files are empty).
pub fn resolve_in(spec: &str, root: &Path) -> Result<Identity, UserError> {
    if spec.trim().is_empty() {
        // Root still gets its passwd home if the image defines one.
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
        let mut id = Identity::root();
        if let Some(e) = parse_passwd(&passwd).into_iter().find(|e| e.uid == 0) {
            id.home = Some(e.home).filter(|h| !h.is_empty());
        }
        return Ok(id);
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    resolve(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
# comment
root:x:0:0:root:/root:/bin/sh

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
app:x:1000:1000:App,,,:/home/app:/bin/bash
broken line
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:app,other
docker:x:999: app
app:x:1000:
nogroup:x:65534:
";

    fn r(spec: &str) -> Result<Identity, UserError> {
        resolve(spec, PASSWD, GROUP)
    }

    #[test]
    fn empty_is_root() {
        assert_eq!(r("").expect("root"), Identity::root());
    }

    #[test]
    fn by_name() {
        let id = r("app").expect("app");
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, vec![10, 999]);
        assert_eq!(id.home.as_deref(), Some("/home/app"));
        assert_eq!(id.all_groups(), vec![1000, 10, 999]);
        let n = r("nobody").expect("nobody");
        assert_eq!((n.uid, n.gid), (65534, 65534));
    }

    #[test]
    fn numeric() {
        let id = r("1000").expect("uid");
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.home.as_deref(), Some("/home/app"));
        let unknown = r("4242").expect("bare uid");
        assert_eq!((unknown.uid, unknown.gid), (4242, 4242));
        assert_eq!(unknown.home, None);
        assert!(unknown.groups.is_empty());
        let pair = r("65534:65534").expect("pair");
        assert_eq!((pair.uid, pair.gid), (65534, 65534));
    }

    #[test]
    fn name_and_group() {
        let id = r("app:wheel").expect("app:wheel");
        assert_eq!((id.uid, id.gid), (1000, 10));
        assert_eq!(id.groups, vec![999]);
        let id = r("daemon:4000").expect("daemon:4000");
        assert_eq!((id.uid, id.gid), (1, 4000));
        let id = r("5000:nogroup").expect("5000:nogroup");
        assert_eq!((id.uid, id.gid), (5000, 65534));
    }

    #[test]
    fn errors() {
        assert_eq!(r("ghost"), Err(UserError::UnknownUser("ghost".into())));
        assert_eq!(
            r("app:ghosts"),
            Err(UserError::UnknownGroup("ghosts".into()))
        );
        assert_eq!(r(":1"), Err(UserError::BadSpec(":1".into())));
        assert_eq!(r("app:"), Err(UserError::BadSpec("app:".into())));
        assert_eq!(
            UserError::UnknownUser("x".into()).to_string(),
            "user \"x\" not found"
        );
    }
}

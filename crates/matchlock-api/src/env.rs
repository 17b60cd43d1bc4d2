//! The CLI's environment syntax (spec §3.9): `KEY=VALUE`, or `KEY` to copy the host's value,
//! on the command line and in env files.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;

/// Longest env-file line accepted.
pub const MAX_ENV_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable name cannot be empty")]
    EmptyName,
    #[error("environment variable name {0:?} must not contain '=' or NUL")]
    BadName(String),
    #[error("environment variable is not set ${0}")]
    NotSet(String),
    #[error("parse env file line {path}:{line}: {reason}")]
    FileLine {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("read env file {path}: {reason}")]
    FileRead { path: String, reason: String },
}

/// Parses one `KEY=VALUE` / `KEY` item; `lookup` reads the host environment.
pub fn parse_env_item(
    item: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, String), EnvError> {
    let (key, value) = match item.split_once('=') {
        Some((k, v)) => (k.trim().to_string(), Some(v.to_string())),
        None => (item.trim().to_string(), None),
    };
    if key.is_empty() {
        return Err(EnvError::EmptyName);
    }
    if key.contains('\0') || key.contains('=') {
        return Err(EnvError::BadName(key));
    }
    if value.as_ref().is_some_and(|v| v.contains('\0')) {
        return Err(EnvError::BadName(key));
    }
    match value {
        Some(v) => Ok((key, v)),
        None => lookup(&key)
            .map(|v| (key.clone(), v))
            .ok_or(EnvError::NotSet(key)),
    }
}

/// Reads an env file: blank and `#` lines skipped, each other line as [`parse_env_item`].
pub fn parse_env_file(
    path: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, EnvError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| EnvError::FileRead {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut reader = std::io::BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut lineno = 0;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_ENV_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| EnvError::FileRead {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        lineno += 1;
        if buf.len() > MAX_ENV_LINE {
            return Err(EnvError::FileLine {
                path: shown,
                line: lineno,
                reason: "line too long".into(),
            });
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let kv = parse_env_item(line, lookup).map_err(|e| EnvError::FileLine {
            path: shown.clone(),
            line: lineno,
            reason: e.to_string(),
        })?;
        out.push(kv);
    }
    Ok(out)
}

/// Env files in order, then `-e` items in order; later wins.
pub fn collect_env(
    files: &[std::path::PathBuf],
    items: &[String],
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, EnvError> {
    let mut env = BTreeMap::new();
    for f in files {
        env.extend(parse_env_file(f, lookup)?);
    }
    for i in items {
        let (k, v) = parse_env_item(i, lookup)?;
        env.insert(k, v);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(k: &str) -> Option<String> {
        (k == "HOSTVAR").then(|| "from-host".to_string())
    }

    #[test]
    fn items() {
        assert_eq!(
            parse_env_item("A=b=c", &host).expect("ok"),
            ("A".into(), "b=c".into())
        );
        assert_eq!(
            parse_env_item("A=", &host).expect("ok"),
            ("A".into(), String::new())
        );
        assert_eq!(parse_env_item("HOSTVAR", &host).expect("ok").1, "from-host");
        assert_eq!(
            parse_env_item("MISSING", &host)
                .expect_err("unset")
                .to_string(),
            "environment variable is not set $MISSING"
        );
        assert_eq!(parse_env_item("=x", &host), Err(EnvError::EmptyName));
    }

    #[test]
    fn file_and_precedence() {
        let dir = std::env::temp_dir().join(format!("ml-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("e.env");
        std::fs::write(&f, "# c\n\nFILE_ONLY=from-file\nHOSTVAR\nSAME=file\n").expect("write");
        let env = collect_env(std::slice::from_ref(&f), &["SAME=flag".into()], &host).expect("env");
        assert_eq!(env["FILE_ONLY"], "from-file");
        assert_eq!(env["HOSTVAR"], "from-host");
        assert_eq!(env["SAME"], "flag");
        std::fs::write(&f, "OK=1\nNOPE\n").expect("write");
        let e = collect_env(std::slice::from_ref(&f), &[], &host).expect_err("missing");
        assert!(
            e.to_string()
                .contains(":2: environment variable is not set $NOPE"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

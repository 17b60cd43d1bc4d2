//! `matchlock allow-list add|delete`: change a running sandbox's egress allow-list.
//!
//! The change is made by the sandbox's owner (through its relay socket), which holds the
//! policy; it applies to new connections and requests at once. Sandboxes started without
//! interception refuse, with the reference's message.

use anyhow::Context;
use clap::{Args, Subcommand};

use super::common;

/// Change the egress allow-list of a running sandbox.
#[derive(Subcommand)]
pub enum AllowListCmd {
    /// Allow more hosts: matchlock allow-list add <id> host1,host2
    Add(AllowListArgs),
    /// Remove hosts: matchlock allow-list delete <id> host1,host2
    #[command(alias = "rm")]
    Delete(AllowListArgs),
}

#[derive(Args)]
pub struct AllowListArgs {
    /// Sandbox ID.
    pub id: String,
    /// Hosts (comma-separated lists accepted).
    #[arg(required = true)]
    pub hosts: Vec<String>,
}

/// Splits, trims and de-duplicates (first occurrence wins) host arguments (spec §1.14).
pub fn parse_hosts(args: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for h in args.iter().flat_map(|a| a.split(',')) {
        let h = h.trim();
        if !h.is_empty() && !out.iter().any(|x| x == h) {
            out.push(h.to_string());
        }
    }
    if out.is_empty() {
        anyhow::bail!("invalid allow-list host: expected one or more hosts (comma-separated)");
    }
    Ok(out)
}

pub fn allow_list(c: AllowListCmd) -> anyhow::Result<()> {
    let (add, a) = match c {
        AllowListCmd::Add(a) => (true, a),
        AllowListCmd::Delete(a) => (false, a),
    };
    let hosts = parse_hosts(&a.hosts)?;
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    let dir = common::running_vm(&state, &a.id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt
        .block_on(matchlock_sandbox::relay::update_allow_list(
            &a.id, &dir, add, hosts,
        ))
        .context("update allow-list")?;
    let id = &a.id;
    match (add, r.changed.is_empty()) {
        (true, false) => println!("Added to {id}: {}", r.changed.join(",")),
        (true, true) => println!("No new hosts were added to {id}"),
        (false, false) => println!("Removed from {id}: {}", r.changed.join(",")),
        (false, true) => println!("No hosts were removed from {id}"),
    }
    if r.allowed_hosts.is_empty() {
        println!("Current allow-list: (empty: all hosts allowed)");
    } else {
        println!("Current allow-list: {}", r.allowed_hosts.join(","));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let h = parse_hosts(&["a.com, b.com".into(), "a.com".into(), " ,".into()]).expect("ok");
        assert_eq!(h, ["a.com", "b.com"]);
        assert!(parse_hosts(&[" , ".into()])
            .expect_err("empty")
            .to_string()
            .contains("expected one or more hosts"));
    }
}

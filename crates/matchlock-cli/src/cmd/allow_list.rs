//! `matchlock allow-list add|delete`: change a running sandbox's egress allow-list.
//!
//! Allow-lists are enforced by the network interception proxy, which this build does not
//! have yet; the command validates its input and the sandbox, then reports that (the
//! reference's message for sandboxes started without interception).

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
    let a = match c {
        AllowListCmd::Add(a) | AllowListCmd::Delete(a) => a,
    };
    parse_hosts(&a.hosts)?;
    let paths = common::paths()?;
    let state = common::state(&paths)?;
    common::running_vm(&state, &a.id)?;
    anyhow::bail!(
        "update allow-list: allow-list updates unavailable: sandbox was started without network interception"
    )
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

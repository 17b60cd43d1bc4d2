//! Commands whose capability has not landed in this build yet. They exist so `--help` lists
//! the whole surface, and they fail with an explanation instead of pretending to work.

use clap::Args;

fn not_yet(what: &str) -> anyhow::Result<()> {
    anyhow::bail!("{what} is not available in this build of matchlock yet")
}

/// Build an image from a Dockerfile (not available yet).
#[derive(Args)]
pub struct BuildArgs {
    /// Build context directory.
    pub context: String,
    #[arg(short = 't', long = "tag")]
    pub tag: Option<String>,
}

/// Forward host TCP ports into a running sandbox (not available yet).
#[derive(Args)]
pub struct PortForwardArgs {
    #[arg(required = true, num_args = 2..)]
    pub args: Vec<String>,
}

/// Serve JSON-RPC on stdin/stdout for the SDKs (not available yet).
#[derive(Args)]
pub struct RpcArgs {}

pub fn build(_a: BuildArgs) -> anyhow::Result<()> {
    not_yet("building images")
}

pub fn port_forward(_a: PortForwardArgs) -> anyhow::Result<()> {
    not_yet("port forwarding")
}

pub fn rpc(_a: RpcArgs) -> anyhow::Result<()> {
    not_yet("the JSON-RPC server")
}

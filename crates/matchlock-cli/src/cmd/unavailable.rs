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

pub fn build(_a: BuildArgs) -> anyhow::Result<()> {
    not_yet("building images")
}

/// Named raw ext4 volumes (not available yet).
#[derive(Args)]
pub struct VolumeArgs {
    /// create, ls, rm or cp, and their arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn volume(_a: VolumeArgs) -> anyhow::Result<()> {
    not_yet("named volumes (`matchlock volume`)")
}

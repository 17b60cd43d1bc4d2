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

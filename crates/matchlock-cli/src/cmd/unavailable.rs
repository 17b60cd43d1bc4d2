//! Commands whose capability has not landed in this build yet. They exist so `--help` lists
//! the whole surface, and they fail with an explanation instead of pretending to work.

use clap::{Args, Subcommand};

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

/// Manage named raw ext4 volumes (not available yet).
///
/// The subcommands exist so that `--help`, completion and the man page show the reference's
/// surface; each fails with "not available" instead of pretending to work.
#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a named volume (not available yet).
    Create {
        /// Volume name.
        name: String,
        /// Size in MB.
        #[arg(long, default_value_t = 10240)]
        size: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List named volumes (not available yet).
    #[command(alias = "list")]
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a named volume (not available yet).
    #[command(alias = "remove")]
    Rm {
        /// Volume name.
        name: String,
    },
    /// Copy a named volume (not available yet).
    #[command(alias = "copy")]
    Cp {
        /// Source volume.
        src: String,
        /// Destination volume (must not exist).
        dest: String,
    },
}

pub fn volume(_c: VolumeCmd) -> anyhow::Result<()> {
    not_yet("named volumes (`matchlock volume`)")
}

//! One module per subcommand.

pub mod common;
pub mod diagnose;
pub mod exec;
pub mod image;
pub mod lifecycle;
pub mod pull;
pub mod run;
pub mod unavailable;

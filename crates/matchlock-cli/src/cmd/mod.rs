//! One module per subcommand.

pub mod allow_list;
pub mod common;
pub mod completion;
pub mod diagnose;
pub mod exec;
pub mod image;
pub mod lifecycle;
pub mod port_forward;
pub mod pull;
pub mod rpc;
pub mod run;
pub mod unavailable;
pub mod volume;

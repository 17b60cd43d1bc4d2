//! The guest network's policy: which destinations the host lets a sandbox reach, and how
//! secrets are kept out of the VM.
//!
//! # Design
//! Every guest flow will end in the sandbox owner's userspace network stack (DESIGN §8) and
//! be re-originated from the host only after this policy says yes. The policy is decided on
//! the host, on host-resolved addresses: [`policy::Policy::check_connect`] is asked with the
//! address actually about to be connected to, so a DNS answer that changes between lookup
//! and connect (rebinding) cannot reach a blocked range. [`secrets`] owns the placeholder
//! scheme: the guest only ever holds `SANDBOX_SECRET_<32 hex>`; the real value is swapped in
//! on the host, only toward the secret's hosts, and a placeholder headed anywhere else is
//! refused.
//!
//! # Limitations
//! This crate is the policy only: the userspace TCP/IP stack, DNS, HTTP/TLS interception and
//! hook rules that enforce it are not built yet, so no sandbox has a network today.

#![forbid(unsafe_code)]

pub mod policy;
pub mod secrets;

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
//! [`stack`] is that userspace stack (smoltcp on the VM's virtio-net through a QEMU unix
//! stream netdev, framed by `link`): it terminates every guest TCP flow and re-originates it from the host
//! only after the policy allows the address; [`dns`] answers the guest's DNS queries.
//! [`intercept`] serves guest HTTP (80) and TLS (443) flows the stack hands over: requests
//! are judged by their own Host, secrets are substituted or refused, and the host re-sends
//! them upstream; [`events`] is the network event shape both report through.
//!
//! [`hooks`] is the hook-rule engine (spec §7.7.1) the interceptor applies to requests and
//! responses.
//!
//! [`icmp`] relays the guest's ICMP / ICMPv6 echo requests beyond the gateway, once the
//! stack's policy check allowed the address pinged, through unprivileged ping sockets.
//!
//! [`tlssniff`] recognises a TLS ClientHello in a raw flow's first bytes, so that under
//! interception TLS on any port (after the policy allowed its address) is intercepted
//! like port 443.
//!
//! # Limitations
//! Plain HTTP is intercepted on port 80 only; other non-TLS flows are judged by their IP
//! literal.

#![forbid(unsafe_code)]

pub mod answered;
pub mod dns;
pub mod events;
pub mod hooks;
pub mod icmp;
pub mod intercept;
mod link;
pub mod policy;
pub mod secrets;
pub mod stack;
pub mod tlssniff;
pub mod vhost;
mod vhost_shim;

/// An error and its sources on one line.
pub(crate) struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

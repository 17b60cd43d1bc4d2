//! The `[LOCAL_PORT:]REMOTE_PORT` syntax of port forwards (spec §3.10), shared by the CLI
//! (`run -p`, `port-forward`), the RPC server and the SDKs.

use super::PortMapping;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PortSpecError {
    #[error("invalid port-forward spec format: {0:?} (expected [LOCAL_PORT:]REMOTE_PORT)")]
    Format(String),
    #[error("invalid port {0}: must be in range 1-65535")]
    Port(String),
}

fn parse_port(s: &str) -> Result<u16, PortSpecError> {
    let s = s.trim();
    match s.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(PortSpecError::Port(s.into())),
    }
}

/// Parses `[LOCAL_PORT:]REMOTE_PORT`; a single port forwards to the same port.
pub fn parse_port_spec(spec: &str) -> Result<PortMapping, PortSpecError> {
    let s = spec.trim();
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [remote] => {
            let p = parse_port(remote)?;
            Ok(PortMapping {
                local_port: p,
                remote_port: p,
            })
        }
        [local, remote] => Ok(PortMapping {
            local_port: parse_port(local)?,
            remote_port: parse_port(remote)?,
        }),
        _ => Err(PortSpecError::Format(s.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let m = |l, r| PortMapping {
            local_port: l,
            remote_port: r,
        };
        assert_eq!(parse_port_spec("8080"), Ok(m(8080, 8080)));
        assert_eq!(parse_port_spec(" 18080:80 "), Ok(m(18080, 80)));
        assert_eq!(
            parse_port_spec("0").expect_err("zero").to_string(),
            "invalid port 0: must be in range 1-65535"
        );
        assert_eq!(
            parse_port_spec("70000"),
            Err(PortSpecError::Port("70000".into()))
        );
        assert_eq!(
            parse_port_spec("1:2:3"),
            Err(PortSpecError::Format("1:2:3".into()))
        );
        assert!(parse_port_spec("a:80").is_err());
    }
}

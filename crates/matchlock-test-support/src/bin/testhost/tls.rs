//! The throwaway test CA and the server configurations of the TLS ports.

use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// A CA made for this run, its leaf for the test names, and a self-signed leaf for the same
/// names that no one trusts.
pub struct TestCerts {
    ca_pem: String,
    leaf: (CertificateDer<'static>, Vec<u8>),
    untrusted: (CertificateDer<'static>, Vec<u8>),
}

fn leaf_params(names: &[String]) -> anyhow::Result<CertificateParams> {
    let mut sans = Vec::new();
    for n in names {
        sans.push(n.clone());
        if n.parse::<std::net::IpAddr>().is_err() {
            sans.push(format!("*.{n}"));
        }
    }
    let mut params = CertificateParams::new(sans).context("leaf names")?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl TestCerts {
    pub fn generate(names: &[String]) -> anyhow::Result<TestCerts> {
        let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Matchlock throwaway test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().context("CA key")?;
        let ca_cert = ca.self_signed(&ca_key).context("CA certificate")?;
        let leaf_key = KeyPair::generate().context("leaf key")?;
        let leaf = leaf_params(names)?
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .context("leaf certificate")?;
        let rogue_key = KeyPair::generate().context("untrusted key")?;
        let rogue = leaf_params(names)?
            .self_signed(&rogue_key)
            .context("untrusted certificate")?;
        Ok(TestCerts {
            ca_pem: ca_cert.pem(),
            leaf: (leaf.der().clone(), leaf_key.serialize_der()),
            untrusted: (rogue.der().clone(), rogue_key.serialize_der()),
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn trusted(&self) -> anyhow::Result<Arc<ServerConfig>> {
        server_config(&self.leaf)
    }

    pub fn untrusted(&self) -> anyhow::Result<Arc<ServerConfig>> {
        server_config(&self.untrusted)
    }
}

fn server_config(
    (cert, key): &(CertificateDer<'static>, Vec<u8>),
) -> anyhow::Result<Arc<ServerConfig>> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .context("TLS certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

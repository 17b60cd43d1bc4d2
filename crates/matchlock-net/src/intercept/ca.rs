//! The per-sandbox interception CA (spec §7.4) and the leaf certificates it signs for the
//! names the guest connects to.
//!
//! # Design
//! The CA lives in memory only: its key is generated when the [`Ca`] is made and is never
//! serialised anywhere but into the signatures it makes; the guest receives the certificate
//! alone ([`Ca::pem`]). ECDSA P-256 rather than the reference's RSA-2048: key generation
//! and handshakes are an order of magnitude cheaper and every mainstream client accepts it.
//! Constraints as the reference: `CA:true, pathlen:0`, key usage CertSign|CRLSign, validity
//! now − 5 min … + 10 years, random serial. Leaves carry one SAN (the DNS name, or the IP
//! address when the guest sent no SNI), EKU serverAuth, validity now − 5 min … + 1 year,
//! and are served as the chain `[leaf, CA]`.
//!
//! # Limitations
//! The leaf cache holds at most [`MAX_LEAVES`] names and is emptied when full (simpler than
//! LRU; a guest cycling through names only costs itself signing time). Leaves are not
//! renewed within a sandbox's life, so a sandbox running longer than a year would see them
//! expire.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::{Duration, OffsetDateTime};

/// Most leaf certificates kept at once.
pub const MAX_LEAVES: usize = 1024;

/// Failures making the CA or a leaf.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generate the interception CA key")]
    CaKey(#[source] rcgen::Error),
    #[error("self-sign the interception CA")]
    CaSign(#[source] rcgen::Error),
    #[error("invalid server name {name:?} for a certificate")]
    LeafName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("generate a leaf key")]
    LeafKey(#[source] rcgen::Error),
    #[error("sign the leaf certificate for {name:?}")]
    LeafSign {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("load the leaf key for {name:?}")]
    LeafLoad {
        name: String,
        #[source]
        source: rustls::Error,
    },
}

/// A CA and its leaf cache.
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn serial() -> SerialNumber {
    // Positive and below 2^62, as the reference.
    let n: u64 = rand::random::<u64>() >> 2;
    SerialNumber::from_slice(&n.max(1).to_be_bytes())
}

impl Ca {
    /// A fresh CA whose keys sign with `provider`.
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::CaKey)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Matchlock");
        dn.push(DnType::CommonName, "Matchlock Sandbox MITM CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3653);
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(CaError::CaSign)?;
        Ok(Ca {
            key,
            cert,
            provider,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate in PEM, for the guest's trust store.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate in DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The leaf for `name` (a DNS name or an IP literal), from the cache or freshly signed.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let mut cache = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = cache.get(name) {
            return Ok(k.clone());
        }
        let key = self.sign_leaf(name)?;
        if cache.len() >= MAX_LEAVES {
            cache.clear();
        }
        cache.insert(name.to_string(), key.clone());
        Ok(key)
    }

    fn sign_leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let mut params = CertificateParams::default();
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into().map_err(|source| CaError::LeafName {
                name: name.to_string(),
                source,
            })?),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(365);
        params.serial_number = Some(serial());
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::LeafKey)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|source| CaError::LeafSign {
                name: name.to_string(),
                source,
            })?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|source| CaError::LeafLoad {
                name: name.to_string(),
                source,
            })?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.der()],
            signing,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_cached_and_bounded() {
        let ca = Ca::new(Arc::new(rustls::crypto::ring::default_provider())).expect("ca");
        assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let a = ca.leaf("a.example").expect("leaf");
        let again = ca.leaf("a.example").expect("leaf");
        assert!(Arc::ptr_eq(&a, &again), "second lookup is cached");
        assert_eq!(a.cert.len(), 2, "chain is [leaf, CA]");
        ca.leaf("192.0.2.1").expect("IP leaf");
        assert!(
            ca.leaf("caf\u{e9}.example").is_err(),
            "non-ASCII names are refused"
        );
        for i in 0..MAX_LEAVES + 1 {
            ca.leaf(&format!("n{i}.example")).expect("leaf");
        }
        let n = ca.leaves.lock().expect("lock").len();
        assert!(n <= MAX_LEAVES, "{n} leaves cached");
    }
}

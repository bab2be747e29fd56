//! The broker's TLS identity: a self-signed certificate created on first start
//! in the data dir, and its fingerprint (SHA-256 of the SubjectPublicKeyInfo).

use std::path::Path;

use keyferry_common::identity::Fingerprint;
use keyferry_common::io::fs::{Place, write_private};
use keyferry_common::io::tls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::BrokerError;

const CERT_FILE: &str = "broker-cert.der";
const KEY_FILE: &str = "broker-key.der";

/// The broker's certificate and private key.
#[derive(Debug)]
pub struct BrokerCert {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its private key (PKCS#8 DER).
    pub key: PrivateKeyDer<'static>,
    /// Fingerprint agents pin.
    pub fingerprint: Fingerprint,
}

impl BrokerCert {
    /// Loads the certificate from `dir`, creating one on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, BrokerError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BrokerError::DataDir { path, source }
        };
        if !cert_path.exists() {
            let made = rcgen::generate_simple_self_signed(vec![tls::SERVER_NAME.to_owned()])
                .map_err(|e| BrokerError::Cert(e.to_string()))?;
            // Key first: a certificate without its key is useless, the reverse is harmless.
            write_private(&key_path, &made.signing_key.serialize_der(), Place::New)
                .map_err(io(&key_path))?;
            write_private(&cert_path, made.cert.der(), Place::New).map_err(io(&cert_path))?;
        }
        let cert = CertificateDer::from(std::fs::read(&cert_path).map_err(io(&cert_path))?);
        let key_meta = std::fs::metadata(&key_path).map_err(io(&key_path))?;
        use std::os::unix::fs::PermissionsExt as _;
        if key_meta.permissions().mode() & 0o077 != 0 {
            return Err(BrokerError::Cert(format!(
                "{} is accessible by other users; run `chmod 600` on it",
                key_path.display()
            )));
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            std::fs::read(&key_path).map_err(io(&key_path))?,
        ));
        let fingerprint = tls::cert_fingerprint(&cert)
            .map_err(|e| BrokerError::Cert(format!("{}: {e}", cert_path.display())))?;
        Ok(Self {
            cert,
            key,
            fingerprint,
        })
    }
}

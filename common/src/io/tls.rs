//! TLS 1.3 configurations for the broker and the agents, and the agents'
//! pinning certificate verifier (PROTOCOL.md §2.4).
//!
//! The broker's certificate is self-signed; agents do not use a CA. The verifier
//! compares the SHA-256 of the certificate's SubjectPublicKeyInfo with the pin
//! (or records it on first use) **and** still verifies the TLS 1.3 handshake
//! signature with rustls' own verification and the provider's algorithms, so a
//! server that presents the right certificate without holding its key fails.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, ServerConfig, SignatureScheme,
};

use crate::identity::Fingerprint;

/// The server name agents use in the TLS handshake (not verified: the pin is).
pub const SERVER_NAME: &str = "keyferry-broker";

/// The one crypto provider: ring (it is already in the tree through rcgen).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The fingerprint of a certificate's SubjectPublicKeyInfo.
pub fn cert_fingerprint(cert: &CertificateDer<'_>) -> Result<Fingerprint, Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    Ok(Fingerprint::of_spki(
        parsed.subject_public_key_info().as_ref(),
    ))
}

/// The broker's TLS 1.3 configuration (no client certificates: agents
/// authenticate inside the session, bound to it by an exporter). No
/// session resumption and no 0-RTT data: the agents' authentication rests
/// on every connection having a fresh exporter (PROTOCOL.md §2.4), which
/// replayable early data would not.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// What the pinning verifier saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// No certificate was checked (the handshake failed earlier).
    NotSeen,
    /// The certificate matched the expected fingerprint, or there was none expected.
    Seen(Fingerprint),
    /// The certificate did not match.
    Mismatch {
        /// What was expected.
        expected: Fingerprint,
        /// What the server presented.
        presented: Fingerprint,
    },
}

/// A certificate verifier that pins the server's key instead of trusting a CA.
#[derive(Debug)]
pub struct PinningVerifier {
    expected: Option<Fingerprint>,
    outcome: Mutex<PinOutcome>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinningVerifier {
    /// Requires `expected`, or records whatever is presented if `None` (first use).
    pub fn new(expected: Option<Fingerprint>) -> Arc<Self> {
        Arc::new(Self {
            expected,
            outcome: Mutex::new(PinOutcome::NotSeen),
            algorithms: provider().signature_verification_algorithms,
        })
    }

    /// What the last handshake presented.
    pub fn outcome(&self) -> PinOutcome {
        *crate::sync::lock(&self.outcome)
    }

    fn set(&self, o: PinOutcome) {
        *crate::sync::lock(&self.outcome) = o;
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let presented = cert_fingerprint(end_entity)?;
        match self.expected {
            Some(expected) if expected != presented => {
                self.set(PinOutcome::Mismatch {
                    expected,
                    presented,
                });
                Err(Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            _ => {
                self.set(PinOutcome::Seen(presented));
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Only TLS 1.3 is configured; a TLS 1.2 signature is never acceptable.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An agent's TLS 1.3 configuration with the pinning verifier: a full
/// handshake every time (no resumption, no 0-RTT data; see
/// [`server_config`]).
pub fn client_config(verifier: Arc<PinningVerifier>) -> Result<ClientConfig, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

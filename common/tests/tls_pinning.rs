//! The agents' pinning verifier still verifies the TLS 1.3 handshake signature:
//! a server that presents the pinned certificate but signs the handshake with
//! another key is refused, with a pin and on first use alike.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::sync::Arc;

use keyferry_common::io::tls::{self, PinOutcome, PinningVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// A one-connection TLS 1.3 server presenting `cert` and signing with `key`.
async fn serve_once(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> String {
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(CertifiedKey::new(
            vec![cert],
            signer,
        )))));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await;
    });
    addr
}

async fn connect(addr: &str, verifier: Arc<PinningVerifier>) -> Result<(), rustls::Error> {
    let config = tls::client_config(verifier).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(tls::SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| rustls::Error::General(e.to_string()))
}

fn cert_and_keys() -> (
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
    PrivateKeyDer<'static>,
) {
    let real = rcgen::generate_simple_self_signed(vec![tls::SERVER_NAME.to_owned()]).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    (
        real.cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(real.signing_key.serialize_der())),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(other.serialize_der())),
    )
}

#[tokio::test]
async fn the_right_certificate_with_a_handshake_signed_by_another_key_is_refused() {
    let (cert, real_key, other_key) = cert_and_keys();
    let pinned = tls::cert_fingerprint(&cert).unwrap();

    // Control: the honest server passes, with the pin and on first use.
    let addr = serve_once(cert.clone(), real_key.clone_key()).await;
    connect(&addr, PinningVerifier::new(Some(pinned)))
        .await
        .unwrap();
    let addr = serve_once(cert.clone(), real_key).await;
    let first_use = PinningVerifier::new(None);
    connect(&addr, Arc::clone(&first_use)).await.unwrap();
    assert_eq!(first_use.outcome(), PinOutcome::Seen(pinned));

    // The pinned certificate, but CertificateVerify signed by another key.
    let addr = serve_once(cert.clone(), other_key.clone_key()).await;
    let verifier = PinningVerifier::new(Some(pinned));
    let err = connect(&addr, Arc::clone(&verifier)).await.unwrap_err();
    // The certificate itself matched the pin: only the signature check caught it.
    assert_eq!(verifier.outcome(), PinOutcome::Seen(pinned), "{err}");

    let addr = serve_once(cert, other_key).await;
    assert!(
        connect(&addr, PinningVerifier::new(None)).await.is_err(),
        "first use verifies the signature too"
    );
}

#[tokio::test]
async fn another_certificate_is_a_mismatch_naming_both() {
    let (cert, key, _) = cert_and_keys();
    let (other_cert, _, _) = cert_and_keys();
    let addr = serve_once(cert.clone(), key).await;
    let expected = tls::cert_fingerprint(&other_cert).unwrap();
    let verifier = PinningVerifier::new(Some(expected));
    assert!(connect(&addr, Arc::clone(&verifier)).await.is_err());
    assert_eq!(
        verifier.outcome(),
        PinOutcome::Mismatch {
            expected,
            presented: tls::cert_fingerprint(&cert).unwrap()
        }
    );
}

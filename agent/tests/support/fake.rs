//! A bare TLS server that stands where a broker stands and does whatever a
//! test's `serve` does with each connection (speak part of the protocol,
//! misbehave): for tests of what an agent does against a broker that is not
//! one. It runs on its own runtime, stopped when [`Fake`] drops.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keyferry_common::io::connection::Connection;
use keyferry_common::io::tls;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A connection the fake broker accepted, after TLS.
pub type FakeConn = Connection<TlsStream<TcpStream>>;

/// The fake broker: its address, and the runtime serving it.
pub struct Fake {
    /// `127.0.0.1:port`.
    pub addr: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl Fake {
    /// Listens on 127.0.0.1 with a fresh certificate and hands every
    /// connection, once TLS is up, to `serve`.
    pub fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let made = rcgen::generate_simple_self_signed(vec![tls::SERVER_NAME.to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let config = tls::server_config(made.cert.der().clone(), key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serve = Arc::new(serve);
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, serve) = (acceptor.clone(), Arc::clone(&serve));
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(Connection::new(tls)).await;
                    }
                });
            }
        });
        Self { addr, rt: Some(rt) }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

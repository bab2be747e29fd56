//! One agent connection, from its first byte to its end: TLS or a data
//! connection ([`crate::data`]), authentication ([`auth`]), then the session
//! of its role: a sender ([`sender`]: lookups, one offer, its transfer) or a
//! receiver ([`receiver`]: its long-lived control connection, on which it
//! answers offers and gets its tickets). An offer's place under the limits
//! is [`place`]'s.
//!
//! Until it authenticated, a newer connection from the same address may cut it
//! ([`ConnGuard::evicted`]); once the broker drains for shutdown, control
//! sessions end.

mod auth;
mod deliver;
mod place;
mod receiver;
pub(crate) mod routed;
mod sender;
pub(crate) mod start;
mod stored;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyferry_common::identity::Fingerprint;
use keyferry_common::io::connection::{ConnError, Connection};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, Role};
use tokio::net::TcpStream;

use crate::conns::ConnGuard;
use crate::data;
use crate::error::SessionError;
use crate::metrics::Handshake;
use crate::shutdown::Shutdown;
use crate::state::State;

/// A connection after TLS, as the broker holds it.
pub type BrokerConn = Connection<tokio_rustls::server::TlsStream<TcpStream>>;

/// An authenticated agent.
#[derive(Debug)]
struct Agent {
    name: AgentName,
    spki: Vec<u8>,
    fingerprint: Fingerprint,
}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves one accepted TCP connection until it ends: TLS for agents, anything
/// else must be a data connection with a ticket.
pub async fn handle(
    state: Arc<State>,
    tcp: TcpStream,
    mut guard: ConnGuard,
) -> Result<(), SessionError> {
    let mut shutdown = state.shutdown();
    let deadline = tokio::time::Instant::now() + state.limits.handshake_timeout;
    let first_byte = async {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Err(_) => {
                state.metrics.handshake_failed(Handshake::Timeout);
                Err(SessionError::Tls("timed out".into()))
            }
            Ok(Err(e)) => Err(ConnError::Io(e).into()),
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(_)) => Ok(Some((tcp, first[0] == TLS_HANDSHAKE))),
        }
    };
    let evicted = || {
        state.metrics.handshake_failed(Handshake::Evicted);
        SessionError::Refused(
            "a newer connection from the same address took its place before it authenticated"
                .into(),
        )
    };
    let first = tokio::select! {
        r = first_byte => r?,
        () = guard.evicted() => return Err(evicted()),
        () = shutdown.draining() => return Ok(()),
    };
    let Some((tcp, tls)) = first else {
        return Ok(());
    };
    if !tls {
        return Box::pin(data::admit(state, tcp, guard, deadline)).await;
    }
    // Told to the agent in its `Welcome` (PROTOCOL.md §2.7).
    let seen = tcp
        .peer_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
        .unwrap_or_default();
    // Each phase is boxed: a task is as large as its largest state, and an
    // idle receiver should not carry the handshake's or a sender's.
    let authenticated = tokio::select! {
        r = Box::pin(auth::authenticate(&state, tcp, deadline)) => r?,
        () = guard.evicted() => return Err(evicted()),
        () = shutdown.draining() => return Ok(()),
    };
    let Some((conn, agent, role)) = authenticated else {
        return Ok(());
    };
    guard.admit();
    match role {
        Role::Sender => {
            let mut conn = conn;
            conn.writer.write(&Message::Welcome { seen }).await?;
            Box::pin(sender::session(&state, conn, agent, shutdown)).await
        }
        Role::Receiver => {
            let welcome = Message::Welcome { seen };
            Box::pin(receiver::session(&state, conn, agent, welcome, shutdown)).await
        }
    }
}

/// Tells the peer why it is refused, closes, and returns the error to log.
async fn refuse(conn: &mut BrokerConn, code: ErrorCode, detail: String) -> SessionError {
    let _ = conn
        .writer
        .write(&Message::Error {
            code,
            detail: detail.clone(),
        })
        .await;
    let _ = conn.writer.shutdown().await;
    SessionError::Refused(detail)
}

/// Tells the peer why its bytes were refused (if the connection still works)
/// and turns the failure into the session's error.
async fn bad_input(conn: &mut BrokerConn, e: ConnError) -> SessionError {
    match e {
        ConnError::Frame(f) => refuse(conn, ErrorCode::Protocol, format!("bad frame: {f}")).await,
        ConnError::Timeout(d) => {
            refuse(
                conn,
                ErrorCode::Protocol,
                format!("silent for {} s", d.as_secs()),
            )
            .await
        }
        other => other.into(),
    }
}

/// The next message (waiting at most `limit`), with bad frames and timeouts
/// answered by an `Error`; `None` when the peer closed, or the broker drains.
async fn next(
    conn: &mut BrokerConn,
    limit: Option<Duration>,
    shutdown: &mut Shutdown,
) -> Result<Option<Message>, SessionError> {
    let read = async {
        match limit {
            Some(d) => conn.reader.read_timeout(d).await,
            None => conn.reader.read().await,
        }
    };
    let read = tokio::select! {
        r = read => r,
        () = shutdown.draining() => return Ok(None),
    };
    match read {
        Ok(m) => Ok(m),
        Err(e) => Err(bad_input(conn, e).await),
    }
}

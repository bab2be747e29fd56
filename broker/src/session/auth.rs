//! Authenticating an agent (PROTOCOL.md §2.4): TLS 1.3, `Hello` both ways,
//! and the agent's RSA-PSS signature over the TLS exporter, its name, role
//! and fingerprint and the broker's fingerprint, which the agent sends right
//! behind its `Hello`. Then the access policy and the name binding: the
//! first key to register a name owns it, any other key is refused.

use std::sync::Arc;

use keyferry_common::PROTOCOL_VERSION;
use keyferry_common::auth;
use keyferry_common::identity::PublicKey;
use keyferry_common::io::connection::Connection;
use keyferry_common::wire::message::{ErrorCode, Message, Role};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Agent, BrokerConn, bad_input, refuse};
use crate::error::SessionError;
use crate::metrics::Handshake;
use crate::registry::Binding;
use crate::state::State;

/// TLS, `Hello` and `Auth`, all before `deadline`; `None` if the peer left
/// quietly.
pub(super) async fn authenticate(
    state: &Arc<State>,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Option<(BrokerConn, Agent, Role)>, SessionError> {
    let limits = &state.limits;
    let failed = |why| state.metrics.handshake_failed(why);
    let tls = match tokio::time::timeout_at(deadline, state.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            failed(Handshake::Tls);
            return Err(SessionError::Tls(e.to_string()));
        }
        Err(_) => {
            failed(Handshake::Timeout);
            return Err(SessionError::Tls("timed out".into()));
        }
    };
    let mut exporter = [0u8; auth::EXPORTER_LEN];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, auth::EXPORTER_LABEL, None)
        .map_err(|e| SessionError::Tls(e.to_string()))?;
    let mut conn = Connection::new(tls);
    conn.reader.set_max(limits.max_control_frame);

    let hello = tokio::time::timeout_at(deadline, conn.reader.read()).await;
    match hello {
        Ok(Ok(Some(Message::Hello { version }))) if version == PROTOCOL_VERSION => {}
        Ok(Ok(Some(Message::Hello { version }))) => {
            failed(Handshake::Version);
            return Err(refuse(
                &mut conn,
                ErrorCode::Version,
                keyferry_common::version_mismatch(version, PROTOCOL_VERSION),
            )
            .await);
        }
        Ok(Ok(_)) => {
            failed(Handshake::Protocol);
            return Err(refuse(&mut conn, ErrorCode::Protocol, "expected Hello".into()).await);
        }
        Ok(Err(e)) => {
            failed(Handshake::Protocol);
            return Err(e.into());
        }
        Err(_) => {
            failed(Handshake::Timeout);
            return Err(refuse(&mut conn, ErrorCode::Protocol, "handshake timed out".into()).await);
        }
    }
    conn.writer
        .write(&Message::Hello {
            version: PROTOCOL_VERSION,
        })
        .await?;

    let auth_msg = match tokio::time::timeout_at(deadline, conn.reader.read()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => {
            failed(Handshake::Protocol);
            return Err(bad_input(&mut conn, e).await);
        }
        Err(_) => {
            failed(Handshake::Timeout);
            return Err(refuse(&mut conn, ErrorCode::Protocol, "handshake timed out".into()).await);
        }
    };
    let Message::Auth {
        name,
        role,
        spki,
        signature,
    } = auth_msg
    else {
        failed(Handshake::Protocol);
        return Err(refuse(&mut conn, ErrorCode::Protocol, "expected Auth".into()).await);
    };
    let key = match PublicKey::from_spki_der(&spki) {
        Ok(k) => k,
        Err(e) => {
            failed(Handshake::Signature);
            return Err(refuse(
                &mut conn,
                ErrorCode::AuthFailed,
                format!("key refused: {e}"),
            )
            .await);
        }
    };
    let signed = auth::message(
        &exporter,
        &name,
        role,
        &key.fingerprint(),
        &state.fingerprint,
    );
    if key.verify(auth::CONTEXT, &signed, &signature).is_err() {
        warn!(agent = %name, "authentication signature did not verify");
        failed(Handshake::Signature);
        return Err(refuse(
            &mut conn,
            ErrorCode::AuthFailed,
            "authentication failed".into(),
        )
        .await);
    }
    if !state.policy.allows(&name, &key.fingerprint()) {
        warn!(agent = %name, fingerprint = %key.fingerprint(), "refused by the access policy");
        failed(Handshake::Policy);
        return Err(refuse(
            &mut conn,
            ErrorCode::Policy,
            format!(
                "{name} with key {} is not on this broker's allowlist",
                key.fingerprint()
            ),
        )
        .await);
    }
    let binding = match &state.cluster {
        // The cluster decides names; this broker's database is its cache.
        Some(cluster) => {
            let bound = crate::cluster::names::bind(cluster, &state.registry, &name, &spki).await;
            if let Ok((_, Some(key))) = &bound {
                let (cache_state, cache_name, key) = (Arc::clone(state), name.clone(), key.clone());
                let remembered = tokio::task::spawn_blocking(move || {
                    cache_state.registry.remember(&cache_name, &key)
                })
                .await;
                if !matches!(remembered, Ok(Ok(()))) {
                    warn!(agent = %name, "the registry cache could not be written");
                }
            }
            bound.map(|(binding, _)| binding)
        }
        None => {
            // A durable write: off the reactor.
            let (bind_state, bind_name, bind_spki) =
                (Arc::clone(state), name.clone(), spki.clone());
            tokio::task::spawn_blocking(move || bind_state.registry.bind(&bind_name, &bind_spki))
                .await
                .map_err(|e| SessionError::Refused(e.to_string()))?
                .map_err(|e| {
                    warn!(error = %e, "registry database error");
                    "broker database error".to_owned()
                })
        }
    };
    match binding {
        Ok(Binding::New) => {
            info!(agent = %name, fingerprint = %key.fingerprint(), "agent registered")
        }
        Ok(Binding::Known) => {}
        Ok(Binding::Taken) => {
            warn!(agent = %name, fingerprint = %key.fingerprint(), "name claimed by another key refused");
            failed(Handshake::NameTaken);
            return Err(refuse(
                &mut conn,
                ErrorCode::NameTaken,
                format!(
                    "the name {name} is registered to another key; choose another name with --name"
                ),
            )
            .await);
        }
        Err(detail) => {
            warn!(agent = %name, %detail, "name binding could not be checked");
            failed(Handshake::Registry);
            return Err(refuse(&mut conn, ErrorCode::Protocol, detail).await);
        }
    }
    // `Welcome` is the role session's to send: a receiver gets it only once
    // its name is free.
    let agent = Agent {
        name,
        spki,
        fingerprint: key.fingerprint(),
    };
    Ok(Some((conn, agent, role)))
}

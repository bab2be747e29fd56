//! One connection: TLS, `Hello`, authentication, then the session of its role.
//!
//! Authentication: the broker sends a fresh nonce; the agent signs (RSA-PSS)
//! the TLS exporter for that nonce, the nonce, its name, role and fingerprint and
//! the broker's fingerprint. The broker binds the name to the key on first
//! registration and refuses any other key for it afterwards.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keyferry_common::PROTOCOL_VERSION;
use keyferry_common::auth;
use keyferry_common::connection::{ConnError, Connection};
use keyferry_common::crypto::random_array;
use keyferry_common::identity::{Fingerprint, PublicKey};
use keyferry_common::ids::TransferId;
use keyferry_common::message::{ErrorCode, Message, Role};
use keyferry_common::name::AgentName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::data;
use crate::registry::{Binding, OfferLimit, Outcome, Registry};
use crate::relay::relay;
use crate::server::{ConnGuard, Shared};

/// A connection after TLS, as the broker holds it.
pub type BrokerConn = Connection<tokio_rustls::server::TlsStream<TcpStream>>;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// TLS failed or timed out.
    #[error("TLS handshake: {0}")]
    Tls(String),
    /// The connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// We refused the peer (it was told why).
    #[error("refused: {0}")]
    Refused(String),
}

async fn refuse(conn: &mut BrokerConn, code: ErrorCode, detail: String) -> HandlerError {
    let _ = conn
        .writer
        .write(&Message::Error {
            code,
            detail: detail.clone(),
        })
        .await;
    let _ = conn.writer.shutdown().await;
    HandlerError::Refused(detail)
}

/// Tells the peer why its bytes were refused (if the connection still works)
/// and turns the failure into the handler's error.
async fn bad_input(conn: &mut BrokerConn, e: ConnError) -> HandlerError {
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

/// The next message, with bad frames and timeouts answered by an `Error`.
async fn next(
    conn: &mut BrokerConn,
    limit: Option<std::time::Duration>,
) -> Result<Option<Message>, HandlerError> {
    let read = match limit {
        Some(d) => conn.reader.read_timeout(d).await,
        None => conn.reader.read().await,
    };
    match read {
        Ok(m) => Ok(m),
        Err(e) => Err(bad_input(conn, e).await),
    }
}

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
/// else must be a data connection with a ticket ([`crate::data`]). Until it
/// authenticated, a newer connection from the same address may cut it
/// ([`ConnGuard::evicted`]).
pub async fn handle(
    shared: Arc<Shared>,
    tcp: TcpStream,
    mut guard: ConnGuard,
) -> Result<(), HandlerError> {
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let handshake = async {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Err(_) => Err(HandlerError::Tls("timed out".into())),
            Ok(Err(e)) => Err(ConnError::Io(e).into()),
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(_)) if first[0] == TLS_HANDSHAKE => Ok(Some((tcp, true))),
            Ok(Ok(_)) => Ok(Some((tcp, false))),
        }
    };
    let evicted = || {
        HandlerError::Refused(
            "a newer connection from the same address took its place before it authenticated"
                .into(),
        )
    };
    let first = tokio::select! {
        r = handshake => r?,
        () = guard.evicted() => return Err(evicted()),
    };
    let Some((tcp, tls)) = first else {
        return Ok(());
    };
    if !tls {
        return data::admit(shared, tcp, guard, deadline).await;
    }
    let authenticated = tokio::select! {
        r = authenticate(&shared, tcp, deadline) => r?,
        () = guard.evicted() => return Err(evicted()),
    };
    let Some((conn, agent, role)) = authenticated else {
        return Ok(());
    };
    guard.admit();
    match role {
        Role::Sender => sender_session(&shared, conn, agent).await,
        Role::Receiver => receiver_session(&shared, conn, agent).await,
        Role::Data => data_session(&shared, conn, agent).await,
    }
}

/// TLS, `Hello`, the challenge and `Auth`, all before `deadline`; `None` if
/// the peer left quietly.
async fn authenticate(
    shared: &Shared,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Option<(BrokerConn, Agent, Role)>, HandlerError> {
    let limits = &shared.limits;
    let tls = tokio::time::timeout_at(deadline, shared.acceptor.accept(tcp))
        .await
        .map_err(|_| HandlerError::Tls("timed out".into()))?
        .map_err(|e| HandlerError::Tls(e.to_string()))?;
    let nonce: [u8; 32] = random_array();
    let mut exporter = [0u8; auth::EXPORTER_LEN];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, auth::EXPORTER_LABEL, Some(&nonce))
        .map_err(|e| HandlerError::Tls(e.to_string()))?;
    let mut conn = Connection::new(tls);
    conn.reader.set_max(limits.max_control_frame);

    let hello = tokio::time::timeout_at(deadline, conn.reader.read()).await;
    match hello {
        Ok(Ok(Some(Message::Hello { version }))) if version == PROTOCOL_VERSION => {}
        Ok(Ok(Some(Message::Hello { version }))) => {
            return Err(refuse(
                &mut conn,
                ErrorCode::Version,
                format!("protocol version {version} is not supported; this broker speaks {PROTOCOL_VERSION}"),
            )
            .await);
        }
        Ok(Ok(_)) => {
            return Err(refuse(&mut conn, ErrorCode::Protocol, "expected Hello".into()).await);
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(refuse(&mut conn, ErrorCode::Protocol, "handshake timed out".into()).await);
        }
    }
    conn.writer
        .write(&Message::Hello {
            version: PROTOCOL_VERSION,
        })
        .await?;
    conn.writer.write(&Message::Challenge { nonce }).await?;

    let auth_msg = match tokio::time::timeout_at(deadline, conn.reader.read()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(bad_input(&mut conn, e).await),
        Err(_) => {
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
        return Err(refuse(&mut conn, ErrorCode::Protocol, "expected Auth".into()).await);
    };
    let key = match PublicKey::from_spki_der(&spki) {
        Ok(k) => k,
        Err(e) => {
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
        &nonce,
        &name,
        role,
        &key.fingerprint(),
        &shared.fingerprint,
    );
    if key.verify(auth::CONTEXT, &signed, &signature).is_err() {
        warn!(agent = %name, "authentication signature did not verify");
        return Err(refuse(
            &mut conn,
            ErrorCode::AuthFailed,
            "authentication failed".into(),
        )
        .await);
    }
    if !shared.policy.allows(&name, &key.fingerprint()) {
        warn!(agent = %name, fingerprint = %key.fingerprint(), "refused by the access policy");
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
    let registry = Arc::clone(&shared.registry);
    let (bind_name, bind_spki) = (name.clone(), spki.clone());
    let binding = tokio::task::spawn_blocking(move || registry.bind(&bind_name, &bind_spki))
        .await
        .map_err(|e| HandlerError::Refused(e.to_string()))?;
    match binding {
        Ok(Binding::New) => {
            info!(agent = %name, fingerprint = %key.fingerprint(), "agent registered")
        }
        Ok(Binding::Known) => {}
        Ok(Binding::Taken) => {
            warn!(agent = %name, fingerprint = %key.fingerprint(), "name claimed by another key refused");
            return Err(refuse(
                &mut conn,
                ErrorCode::NameTaken,
                format!(
                    "the name {name} is registered to another key; choose another name with --name"
                ),
            )
            .await);
        }
        Err(e) => {
            warn!(error = %e, "registry database error");
            return Err(refuse(
                &mut conn,
                ErrorCode::Protocol,
                "broker database error".into(),
            )
            .await);
        }
    }
    conn.writer.write(&Message::Welcome).await?;
    let agent = Agent {
        name,
        spki,
        fingerprint: key.fingerprint(),
    };
    Ok(Some((conn, agent, role)))
}

/// Releases an offer's concurrent-transfer slot when the offer ends.
struct OfferSlot<'a>(&'a Registry, &'a AgentName);

impl Drop for OfferSlot<'_> {
    fn drop(&mut self) {
        self.0.offer_ended(self.1);
    }
}

struct SenderCount<'a>(&'a Shared, AgentName);

impl Drop for SenderCount<'_> {
    fn drop(&mut self) {
        self.0.registry.sender_connected(&self.1, false);
    }
}

async fn sender_session(
    shared: &Shared,
    mut conn: BrokerConn,
    agent: Agent,
) -> Result<(), HandlerError> {
    let registry = &shared.registry;
    registry.sender_connected(&agent.name, true);
    let _count = SenderCount(shared, agent.name.clone());
    loop {
        let Some(msg) = next(&mut conn, Some(shared.limits.idle_timeout)).await? else {
            return Ok(());
        };
        match msg {
            Message::List => {
                conn.writer
                    .write(&Message::Online {
                        agents: registry.list(),
                    })
                    .await?
            }
            Message::Lookup { name } => {
                let reply = match registry.key_of(&name) {
                    Ok(Some(spki)) if registry.is_receiving(&name) => {
                        Message::PeerKey { name, spki }
                    }
                    Ok(Some(_)) => Message::Error {
                        code: ErrorCode::PeerOffline,
                        detail: format!("{name} is not connected as a receiver"),
                    },
                    Ok(None) => Message::Error {
                        code: ErrorCode::UnknownPeer,
                        detail: format!(
                            "no agent named {name} has ever registered with this broker"
                        ),
                    },
                    Err(e) => {
                        warn!(error = %e, "registry database error");
                        Message::Error {
                            code: ErrorCode::Protocol,
                            detail: "broker database error".into(),
                        }
                    }
                };
                conn.writer.write(&reply).await?;
            }
            Message::Offer { to, offer } => {
                let Ok(fields) = offer.parse() else {
                    return Err(
                        refuse(&mut conn, ErrorCode::Protocol, "malformed offer".into()).await,
                    );
                };
                if fields.sender != agent.name
                    || fields.sender_fp != agent.fingerprint
                    || fields.receiver != to
                {
                    warn!(agent = %agent.name, "offer names another sender or receiver");
                    return Err(refuse(
                        &mut conn,
                        ErrorCode::Protocol,
                        "the offer must name this connection's agent and key as its sender".into(),
                    )
                    .await);
                }
                let tid = fields.transfer_id;
                let limits = &shared.limits;
                if let Err(limit) = registry.take_offer_slot(
                    &agent.name,
                    limits.offers_per_minute,
                    limits.max_transfers_per_agent,
                ) {
                    let detail = match limit {
                        OfferLimit::Rate => {
                            format!("more than {} offers in a minute", limits.offers_per_minute)
                        }
                        OfferLimit::Concurrent => {
                            format!(
                                "more than {} transfers at once",
                                limits.max_transfers_per_agent
                            )
                        }
                    };
                    warn!(agent = %agent.name, %detail, "offer refused by rate limit");
                    return Err(refuse(&mut conn, ErrorCode::RateLimited, detail).await);
                }
                let _slot = OfferSlot(registry, &agent.name);
                let offered = Message::Offered {
                    from: agent.name.clone(),
                    spki: agent.spki.clone(),
                    offer,
                };
                let Some(answer) = registry.offer(tid, &agent.name, &to, offered) else {
                    conn.writer
                        .write(&Message::Error {
                            code: ErrorCode::PeerOffline,
                            detail: format!(
                                "{to} is not connected as a receiver, or cannot take offers now"
                            ),
                        })
                        .await?;
                    continue;
                };
                info!(transfer = %tid, from = %agent.name, to = %to, "transfer offered");
                match tokio::time::timeout(shared.limits.answer_timeout, answer).await {
                    Err(_) => {
                        registry.cancel(&tid);
                        info!(transfer = %tid, "receiver did not answer in time");
                        return Err(refuse(
                            &mut conn,
                            ErrorCode::PeerOffline,
                            format!("{to} did not answer the offer"),
                        )
                        .await);
                    }
                    Ok(Err(_)) => {
                        info!(transfer = %tid, "receiver left before answering");
                        return Err(refuse(
                            &mut conn,
                            ErrorCode::PeerOffline,
                            format!("{to} disconnected"),
                        )
                        .await);
                    }
                    Ok(Ok(Outcome::Refused(reason))) => {
                        info!(transfer = %tid, ?reason, "transfer refused by receiver");
                        conn.writer
                            .write(&Message::Refuse {
                                transfer_id: tid,
                                reason,
                            })
                            .await?;
                    }
                    Ok(Ok(Outcome::Accepted { accept, data })) => {
                        let result = start_transfer(shared, conn, *data, tid, accept).await;
                        registry.transfer_ended(&to);
                        return result;
                    }
                }
            }
            other => {
                let what = format!("unexpected {} from a sender", variant(&other));
                return Err(refuse(&mut conn, ErrorCode::Protocol, what).await);
            }
        }
    }
}

/// Sends the accept and the tickets, waits for both data connections, relays.
async fn start_transfer(
    shared: &Shared,
    mut conn: BrokerConn,
    mut data: BrokerConn,
    tid: TransferId,
    accept: Vec<u8>,
) -> Result<(), HandlerError> {
    let Some(mut issued) = shared.tickets.issue(tid) else {
        let detail = format!("transfer {tid} is already under way");
        let _ = refuse(&mut data, ErrorCode::Protocol, detail.clone()).await;
        return Err(refuse(&mut conn, ErrorCode::Protocol, detail).await);
    };
    conn.writer
        .write(&Message::Accept {
            transfer_id: tid,
            accept,
        })
        .await?;
    conn.writer
        .write(&Message::Ticket {
            transfer_id: tid,
            ticket: issued.sender_ticket,
        })
        .await?;
    data.writer
        .write(&Message::Ticket {
            transfer_id: tid,
            ticket: issued.receiver_ticket,
        })
        .await?;
    let limit = shared.limits.handshake_timeout;
    let Ok(Some((sender, receiver))) = tokio::time::timeout(limit, issued.arrivals()).await else {
        info!(transfer = %tid, "data connections did not arrive in time");
        return Ok(());
    };
    drop(issued);
    // The TLS connections have done their part; the agents close theirs too.
    drop((conn, data));
    info!(transfer = %tid, "transfer started");
    let report = relay(sender, receiver, tid, shared.limits.idle_timeout).await;
    let seconds = format!("{:.3}", report.elapsed.as_secs_f64());
    match report.result {
        Ok(()) => info!(transfer = %tid, bytes = report.bytes, seconds, "transfer finished"),
        Err(why) => info!(transfer = %tid, bytes = report.bytes, seconds, %why, "transfer failed"),
    }
    Ok(())
}

fn variant(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Offer { .. } => "Offer",
        Message::Accept { .. } => "Accept",
        Message::Refuse { .. } => "Refuse",
        Message::KeyUpdate { .. } => "KeyUpdate",
        Message::Chunk { .. } => "Chunk",
        Message::Trailer { .. } => "Trailer",
        Message::Receipt { .. } => "Receipt",
        Message::Abort { .. } => "Abort",
        Message::Challenge { .. } => "Challenge",
        Message::Auth { .. } => "Auth",
        Message::Welcome => "Welcome",
        Message::Error { .. } => "Error",
        Message::Lookup { .. } => "Lookup",
        Message::PeerKey { .. } => "PeerKey",
        Message::Offered { .. } => "Offered",
        Message::List => "List",
        Message::Online { .. } => "Online",
        Message::Ticket { .. } => "Ticket",
        Message::Redeem { .. } => "Redeem",
    }
}

async fn receiver_session(
    shared: &Shared,
    mut conn: BrokerConn,
    agent: Agent,
) -> Result<(), HandlerError> {
    let registry = &shared.registry;
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(32);
    if !registry.add_receiver(&agent.name, conn_id, tx) {
        return Err(refuse(
            &mut conn,
            ErrorCode::ReceiverConnected,
            format!("a receiver named {} is already connected", agent.name),
        )
        .await);
    }
    info!(agent = %agent.name, "receiver online");
    let result = async {
        loop {
            tokio::select! {
                Some(out) = rx.recv() => conn.writer.write(&out).await?,
                msg = next(&mut conn, None) => match msg? {
                    None => return Ok(()),
                    Some(Message::Refuse { transfer_id, reason }) => {
                        // Only the receiver the offer named may answer it.
                        let _ = registry.answer(&transfer_id, &agent.name, Outcome::Refused(reason));
                    }
                    Some(Message::List) => conn.writer.write(&Message::Online { agents: registry.list() }).await?,
                    Some(other) => {
                        let what = format!("unexpected {} from a receiver", variant(&other));
                        return Err(refuse(&mut conn, ErrorCode::Protocol, what).await);
                    }
                },
            }
        }
    }
    .await;
    registry.remove_receiver(&agent.name, conn_id);
    info!(agent = %agent.name, "receiver offline");
    result
}

async fn data_session(
    shared: &Shared,
    mut conn: BrokerConn,
    agent: Agent,
) -> Result<(), HandlerError> {
    let first = conn
        .reader
        .read_timeout(shared.limits.handshake_timeout)
        .await?;
    let Some(Message::Accept {
        transfer_id,
        accept,
    }) = first
    else {
        return Err(refuse(
            &mut conn,
            ErrorCode::Protocol,
            "a data connection starts with Accept".into(),
        )
        .await);
    };
    let outcome = Outcome::Accepted {
        accept,
        data: Box::new(conn),
    };
    match shared.registry.answer(&transfer_id, &agent.name, outcome) {
        Ok(_) => Ok(()),
        Err(Outcome::Accepted { data, .. }) => {
            let mut conn = *data;
            Err(refuse(
                &mut conn,
                ErrorCode::UnknownTransfer,
                format!("no transfer {transfer_id} awaits {}", agent.name),
            )
            .await)
        }
        Err(Outcome::Refused(_)) => Ok(()),
    }
}

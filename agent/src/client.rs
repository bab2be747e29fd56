//! Connecting to the broker: TCP, TLS 1.3 with the broker's pinned certificate,
//! then one flight of `Hello` and the authentication (a signature bound to
//! the TLS session), and the broker's `Hello` and `Welcome` back.

use std::sync::Arc;
use std::time::Duration;

use keyferry_common::PROTOCOL_VERSION;
use keyferry_common::auth;
use keyferry_common::identity::{Fingerprint, Identity};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::{ConnError, Connection, FrameReader, FrameWriter};
use keyferry_common::io::lanes::Pipe;
use keyferry_common::io::tls::{self, PinOutcome, PinningVerifier};
use keyferry_common::name::AgentName;
use keyferry_common::text::escape;
use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, ErrorCode, Message, Role, ticket_address_ok};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::direct::seen::Seen;
use crate::error::AgentError;
use crate::home::{Home, now_unix};
use crate::relay_lanes::{self, Lanes, Leg, Opened};
use crate::trust::pins::{PinCheck, PinError};

/// A connection to the broker after TLS.
pub type AgentConn = Connection<tokio_rustls::client::TlsStream<TcpStream>>;

/// A transfer's plain data connection, to the broker (PROTOCOL.md §2.5) or
/// straight to the other agent over one or several TCP connections (§2.7):
/// the stream on it is sealed end to end.
pub type DataConn = Connection<Pipe>;

/// How long connecting may take in all: TCP, TLS, `Hello`, the challenge and
/// authentication, under one deadline (a broker that keeps talking without
/// finishing the handshake is cut off by it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Who we are and where the broker is.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Broker address.
    pub broker: String,
    /// A fingerprint the broker must have (`--broker-fingerprint`).
    pub broker_fingerprint: Option<Fingerprint>,
    /// Our home directory.
    pub home: Home,
    /// Our name.
    pub name: AgentName,
    /// Our identity.
    pub identity: Arc<Identity>,
    /// How the broker sees our connections (its `Welcome`).
    pub seen: Seen,
}

/// Maps a broker `Error` message to the agent's error. The detail is the
/// broker's text, printed later: escaped here (PROTOCOL.md §8), so a broker
/// cannot put control sequences on the user's terminal.
pub fn broker_error(code: ErrorCode, detail: String) -> AgentError {
    let detail = escape(&detail);
    match code {
        ErrorCode::NameTaken
        | ErrorCode::AuthFailed
        | ErrorCode::Policy
        | ErrorCode::ReceiverConnected => AgentError::NameRefused(detail),
        // One rule, whatever the broker's version: its own version read from
        // its words where they name it ("… the broker version <v>: …" since
        // version 2, "… this broker speaks <v>" in version 1), and the line
        // shown as this agent words it, with no prefix; any other wording in
        // the generic line.
        ErrorCode::Version => match broker_version(&detail) {
            Some(broker) => AgentError::Version { broker },
            None => AgentError::VersionRefused(detail),
        },
        ErrorCode::StoreFull => AgentError::StoreRefused(detail),
        _ => AgentError::BrokerRefused(detail),
    }
}

/// The broker's protocol version, as its `Error{Version}` detail names it.
fn broker_version(detail: &str) -> Option<u16> {
    let after = detail
        .split_once("and the broker version ")
        .map(|(_, rest)| rest)
        .or_else(|| detail.rsplit_once("this broker speaks ").map(|(_, v)| v))?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A lost or failed broker connection.
pub fn conn_error(ctx: &Ctx, e: ConnError) -> AgentError {
    AgentError::BrokerUnreachable {
        addr: ctx.broker.clone(),
        detail: format!("connection lost ({e})"),
    }
}

/// Connects, pins or checks the broker, and authenticates for `role`, all
/// within [`CONNECT_TIMEOUT`].
pub async fn connect(ctx: &Ctx, role: Role) -> Result<AgentConn, AgentError> {
    connect_then(ctx, role, None).await
}

/// [`connect`], sending `then` in the same flight as the authentication
/// (PROTOCOL.md §2.4): its answer comes right behind the `Welcome`, one
/// round trip sooner than if it waited for it.
pub async fn connect_then(
    ctx: &Ctx,
    role: Role,
    then: Option<&Message>,
) -> Result<AgentConn, AgentError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_within(ctx, role, then))
        .await
        .unwrap_or_else(|_| {
            Err(AgentError::BrokerUnreachable {
                addr: ctx.broker.clone(),
                detail: format!(
                    "the broker did not complete the handshake (TLS, hello, authentication) \
                     within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            })
        })
}

async fn connect_within(
    ctx: &Ctx,
    role: Role,
    then: Option<&Message>,
) -> Result<AgentConn, AgentError> {
    let unreachable = |detail: String| AgentError::BrokerUnreachable {
        addr: ctx.broker.clone(),
        detail,
    };
    let pins = ctx.home.known_brokers();
    let pinned = pins.get(&ctx.broker)?.map(|p| p.fingerprint);
    let expected = ctx.broker_fingerprint.or(pinned);

    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&ctx.broker))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let _ = keyferry_common::io::tcp::keep_alive(&tcp);
    let verifier = PinningVerifier::new(expected);
    let config = tls::client_config(Arc::clone(&verifier))?;
    let server_name = ServerName::try_from(tls::SERVER_NAME)
        .map_err(|_| AgentError::Protocol("the broker's TLS server name is invalid"))?;
    let handshake = TlsConnector::from(Arc::new(config)).connect(server_name, tcp);
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(t)) => t,
        outcome => {
            if let PinOutcome::Mismatch {
                expected,
                presented,
            } = verifier.outcome()
            {
                return Err(AgentError::BrokerMismatch {
                    addr: ctx.broker.clone(),
                    expected,
                    presented,
                    file: pins.path().to_owned(),
                });
            }
            return Err(unreachable(match outcome {
                Ok(Err(e)) => format!("TLS handshake failed: {e}"),
                _ => "TLS handshake timed out".into(),
            }));
        }
    };
    let PinOutcome::Seen(broker_fp) = verifier.outcome() else {
        return Err(unreachable("the broker presented no certificate".into()));
    };
    // Both a pin (if any) and --broker-fingerprint (if given) must agree.
    let check = match ctx.broker_fingerprint {
        Some(required) => pins.require(&ctx.broker, required, broker_fp, now_unix()),
        None => pins.check_or_pin(&ctx.broker, broker_fp, now_unix()),
    };
    match check {
        Ok(PinCheck::NewlyPinned(_)) if ctx.broker_fingerprint.is_none() => {
            crate::output::err_line(&format!(
                "NEW KEY for broker {} {broker_fp} — first contact, verify out of band",
                ctx.broker
            ));
        }
        Ok(_) => {}
        Err(PinError::Mismatch {
            pinned,
            presented,
            file,
            ..
        }) => {
            return Err(AgentError::BrokerMismatch {
                addr: ctx.broker.clone(),
                expected: pinned,
                presented,
                file,
            });
        }
        Err(e) => return Err(e.into()),
    }

    let mut tls = tls;
    let leftover = hello_and_auth(ctx, &mut tls, broker_fp, (role, then)).await?;
    Ok(Connection::with_buffer(tls, leftover))
}

async fn hello_and_auth(
    ctx: &Ctx,
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    broker_fp: Fingerprint,
    (role, then): (Role, Option<&Message>),
) -> Result<Vec<u8>, AgentError> {
    let unreachable = |detail: &str| AgentError::BrokerUnreachable {
        addr: ctx.broker.clone(),
        detail: detail.to_owned(),
    };
    let lost = |e| conn_error(ctx, e);
    let mut exporter = [0u8; auth::EXPORTER_LEN];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, auth::EXPORTER_LABEL, None)
        .map_err(AgentError::Tls)?;
    let identity = Arc::clone(&ctx.identity);
    let message = auth::message(
        &exporter,
        &ctx.name,
        role,
        &identity.fingerprint(),
        &broker_fp,
    );
    let signature =
        tokio::task::spawn_blocking(move || identity.sign(auth::CONTEXT, &message)).await?;
    // One flight, written at once: `Hello`, `Auth` and what the caller sends
    // next (PROTOCOL.md §2.4).
    let mut flight = Vec::new();
    let auth = Message::Auth {
        name: ctx.name.clone(),
        role,
        spki: ctx.identity.public().spki_der().to_vec(),
        signature,
    };
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
    };
    for msg in [Some(&hello), Some(&auth), then].into_iter().flatten() {
        flight.extend(message::encode(msg, MAX_FRAME_LEN).map_err(|e| lost(e.into()))?);
    }
    FrameWriter::new(&mut *tls, MAX_FRAME_LEN)
        .write_frame(&flight)
        .await
        .map_err(lost)?;
    let mut reader = FrameReader::new(&mut *tls, MAX_FRAME_LEN);
    match reader.read_timeout(CONNECT_TIMEOUT).await.map_err(lost)? {
        Some(Message::Hello { version }) if version == PROTOCOL_VERSION => {}
        Some(Message::Hello { version }) => return Err(AgentError::Version { broker: version }),
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        Some(_) => {
            return Err(AgentError::Protocol(
                "the broker sent an unexpected message",
            ));
        }
        None => return Err(unreachable("the broker closed the connection")),
    }
    match reader.read_timeout(CONNECT_TIMEOUT).await.map_err(lost)? {
        Some(Message::Welcome { seen }) => ctx.seen.set(&seen),
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        Some(_) => {
            return Err(AgentError::Protocol(
                "the broker sent an unexpected message",
            ));
        }
        None => return Err(unreachable("the broker closed the connection")),
    }
    // A receiver may already have an offer waiting behind the Welcome: keep it.
    Ok(reader.into_parts().1)
}

/// A broker's ticket for one data connection, and where to open it.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The one-time ticket.
    pub ticket: [u8; 32],
    /// `HOST:PORT` to connect to, or empty for the broker itself.
    pub address: String,
}

/// Waits on an authenticated connection for the broker's ticket for `tid`.
pub async fn await_ticket(
    ctx: &Ctx,
    conn: &mut AgentConn,
    tid: TransferId,
) -> Result<Ticket, AgentError> {
    match conn.reader.read_timeout(CONNECT_TIMEOUT).await {
        Ok(Some(Message::Ticket {
            transfer_id,
            ticket,
            address,
        })) if transfer_id == tid => Ok(Ticket { ticket, address }),
        Ok(Some(Message::Error { code, detail })) => Err(broker_error(code, detail)),
        Ok(Some(Message::Abort { reason, .. })) => Err(AgentError::ReceiverAborted(reason)),
        Ok(Some(_)) => Err(AgentError::Protocol(
            "the broker sent no ticket for the data connection",
        )),
        Ok(None) => Err(conn_error(ctx, ConnError::Truncated)),
        Err(e) => Err(conn_error(ctx, e)),
    }
}

/// Opens the plain data connection of transfer `tid` with the broker's
/// ticket: to the broker itself, or to the address the ticket names (another
/// broker of a cluster; the stream is sealed end to end either way).
pub async fn open_data(ctx: &Ctx, tid: TransferId, ticket: Ticket) -> Result<DataConn, AgentError> {
    open_upload(ctx, &[(tid, ticket)]).await
}

/// Opens one data connection and redeems every ticket on it (a sender's
/// upload to several receivers: PROTOCOL.md §2.5). Tickets that all name one
/// address go there; tickets naming several (receivers on several brokers of
/// a cluster, §2.6) go to this agent's own broker, its own tickets first,
/// and that broker feeds the others.
pub async fn open_upload(
    ctx: &Ctx,
    tickets: &[(TransferId, Ticket)],
) -> Result<DataConn, AgentError> {
    open_upload_on(ctx, tickets, None).await
}

/// [`open_upload`] on `early`, a connection to this agent's broker opened
/// before the tickets came, if it has one and the tickets are all for that
/// broker (PROTOCOL.md §2.5); else on a new connection.
pub async fn open_upload_on(
    ctx: &Ctx,
    tickets: &[(TransferId, Ticket)],
    early: Option<Opened>,
) -> Result<DataConn, AgentError> {
    open_upload_lanes(ctx, tickets, early, (Lanes::One, Leg::Sender))
        .await
        .map(|(conn, _)| conn)
}

/// [`open_upload_on`], where one ticket may take several connections, as
/// `lanes` says ([`crate::relay_lanes`]), for the side `leg`; returns how
/// many carry the stream.
pub async fn open_upload_lanes(
    ctx: &Ctx,
    tickets: &[(TransferId, Ticket)],
    early: Option<Opened>,
    (lanes, leg): (Lanes, Leg),
) -> Result<(DataConn, u8), AgentError> {
    let Some((_, first)) = tickets.first() else {
        return Err(AgentError::Internal("an upload without tickets".into()));
    };
    let mut tickets = tickets.to_vec();
    let mut to = first.address.clone();
    if tickets.iter().any(|(_, t)| t.address != to) {
        tickets.sort_by_key(|(_, t)| !t.address.is_empty());
        to = String::new();
    }
    let early = early.filter(|_| to.is_empty());
    let addr = if to.is_empty() {
        ctx.broker.clone()
    } else if ticket_address_ok(&to) {
        to
    } else {
        return Err(AgentError::Protocol(
            "the broker's ticket names an invalid address",
        ));
    };
    let unreachable = |detail: String| AgentError::BrokerUnreachable {
        addr: addr.clone(),
        detail: format!("data connection: {detail}"),
    };
    let lanes = if tickets.len() == 1 {
        lanes
    } else {
        Lanes::One
    };
    let mut opened = match early {
        Some(opened) => opened,
        None => relay_lanes::connect(&addr, lanes)
            .await
            .map_err(|e| unreachable(e.to_string()))?,
    };
    if lanes == Lanes::One {
        opened.more.clear();
    }
    if let [(tid, t)] = &tickets[..]
        && !opened.more.is_empty()
    {
        let (pipe, n) = relay_lanes::redeem(opened, *tid, t.ticket, leg)
            .await
            .map_err(|e| conn_error(ctx, e))?;
        return Ok((Connection::new(pipe), n));
    }
    let tcp = opened.first;
    let _ = tcp.set_nodelay(true);
    let _ = keyferry_common::io::tcp::keep_alive(&tcp);
    let mut conn = Connection::new(Pipe::Tcp(tcp));
    for (tid, t) in &tickets {
        conn.writer
            .write(&Message::Redeem {
                transfer_id: *tid,
                ticket: t.ticket,
            })
            .await
            .map_err(|e| conn_error(ctx, e))?;
    }
    Ok((conn, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_refusal_names_both_versions_whichever_broker_sent_it() {
        let v = PROTOCOL_VERSION;
        // A version 1 broker's words.
        let e = broker_error(
            ErrorCode::Version,
            format!("protocol version {v} is not supported; this broker speaks 1"),
        );
        assert_eq!(
            e.to_string(),
            format!(
                "this agent speaks keyferry protocol version {v} and the broker version 1: \
                 upgrade the broker"
            )
        );
        assert_eq!(e.exit_code(), 1);
        // A broker of version 2 or later: the same line, no prefix.
        for (broker, upgrade) in [(v - 1, "the broker"), (v + 1, "the agent")] {
            let words = keyferry_common::version_mismatch(v, broker);
            let e = broker_error(ErrorCode::Version, words.clone());
            assert_eq!(e.to_string(), words);
            assert!(e.to_string().ends_with(upgrade), "{e}");
        }
        // Anything else: still says what to do.
        let e = broker_error(ErrorCode::Version, "no".into());
        assert!(e.to_string().contains("upgrade the broker"), "{e}");
    }

    #[test]
    fn a_brokers_words_reach_the_terminal_escaped() {
        // Clear the screen, move the cursor, ring the bell: none of it is
        // printed as such, whatever the code.
        let hostile = "bad\x1b[2J\x1b[H\x07 name\u{202e}";
        for code in [
            ErrorCode::NameTaken,
            ErrorCode::Version,
            ErrorCode::Policy,
            ErrorCode::Protocol,
        ] {
            let shown = broker_error(code, hostile.into()).to_string();
            assert!(!shown.chars().any(char::is_control), "{code:?}: {shown:?}");
            assert!(!shown.contains('\u{202e}'), "{code:?}: {shown:?}");
            assert!(shown.contains("bad\\u{1b}[2J"), "{code:?}: {shown:?}");
        }
    }
}

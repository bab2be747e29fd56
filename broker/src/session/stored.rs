//! A sender's requests about stored transfers (PROTOCOL.md §2.8): a prekey
//! bundle of an offline receiver (`FetchPrekey`), storing a sealed transfer
//! for it (`Store`: checked against the connection's own name and key, the
//! offer rate and the mailbox's limits before a byte moves; then the
//! upload on a data connection of its own), the sender's receipts
//! (`Receipts`), and withdrawing one still waiting (`Withdraw`).

use keyferry_common::handshake::SignedOffer;
use keyferry_common::handshake::stored::parse_stored;
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, StoredEntry};
use tracing::{info, warn};

use super::place::{Over, cluster_count};
use super::{Agent, BrokerConn, place, refuse};
use crate::cluster::names;
use crate::cluster::rates::Counted;
use crate::error::SessionError;
use crate::mailbox::{State as Kept, Storage, StoredMeta, WithdrawError};
use crate::state::State;

/// Most entries a `ReceiptList` carries (the newest).
const MOST_LISTED: usize = 64;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error(code: ErrorCode, detail: String) -> Message {
    Message::Error { code, detail }
}

/// This broker's mailbox (its own, or its cluster's), or why there is none.
fn mailbox(state: &State) -> Result<&Storage, Message> {
    state.mailbox.as_ref().ok_or_else(|| {
        let detail = if state.cluster.is_some() {
            "this broker keeps no mailbox (its cluster's could not be opened)"
        } else {
            "this broker keeps no mailbox (its data dir cannot hold one)"
        };
        error(ErrorCode::StoreFull, detail.into())
    })
}

/// The receiver's key, as this broker (or, in a cluster, the cluster; its
/// cache here while it is away) has it bound.
async fn key_of(state: &State, name: &AgentName) -> Result<Vec<u8>, Message> {
    let found = match &state.cluster {
        Some(cluster) => names::key_of(cluster, &state.registry, name).await.key,
        None => state.registry.key_of(name).map_err(|e| e.to_string()),
    };
    match found {
        Ok(Some(spki)) => Ok(spki),
        Ok(None) => Err(error(
            ErrorCode::UnknownPeer,
            format!("no agent named {name} has ever registered with this broker"),
        )),
        Err(e) => {
            warn!(error = %e, "registry database error");
            Err(error(ErrorCode::Protocol, "broker database error".into()))
        }
    }
}

/// `FetchPrekey{name}`: the receiver's key and one of its bundles.
pub(super) async fn fetch(state: &State, agent: &Agent, name: AgentName) -> Message {
    let result = async {
        let mailbox = mailbox(state)?;
        let spki = key_of(state, &name).await?;
        // Counted across the cluster too, so that asking every broker in
        // turn drains no more one-time prekeys than asking one.
        let rate = mailbox.limits().fetches_per_minute;
        if let Err(over) = cluster_count(state, Counted::PrekeyFetches, &agent.name, rate).await {
            let detail = match over {
                Over::Full => format!(
                    "too many prekey fetches through the brokers of this cluster (at most \
                     {rate} a minute); retry in a minute"
                ),
                Over::Contended => format!(
                    "too many prekey fetches at once through the brokers of this cluster (at \
                     most {rate} a minute)"
                ),
            };
            return Err(error(ErrorCode::RateLimited, detail));
        }
        // None that expires within a day is handed out (the sender would
        // refuse it).
        super::deliver::drop_stale_prekeys(mailbox, &name).await;
        let now = std::time::Instant::now();
        let taken = mailbox.take_prekey(&agent.name, &name, now).await;
        match taken {
            Ok(Some(prekey)) => Ok(Message::Prekey {
                name: name.clone(),
                spki,
                bundle: prekey.bundle,
            }),
            Ok(None) => Err(error(
                ErrorCode::StoreFull,
                format!(
                    "{name} has left no prekeys at this broker (it has not been online here \
                     since it could), so nothing can be stored for it"
                ),
            )),
            Err(crate::mailbox::TakeError::Limited(l)) => {
                Err(error(ErrorCode::RateLimited, format!("{l}")))
            }
            Err(e) => Err(error(ErrorCode::Protocol, e.to_string())),
        }
    }
    .await;
    result.unwrap_or_else(|e| e)
}

/// `Store{to, offer, size}`: checked, then the ticket for the upload, the
/// upload, and `Stored` on its data connection. The session ends with it.
pub(super) async fn store(
    state: &State,
    mut conn: BrokerConn,
    agent: &Agent,
    (to, offer, size): (AgentName, SignedOffer, u64),
) -> Result<(), SessionError> {
    let mailbox = match mailbox(state) {
        Ok(m) => m.clone(),
        Err(Message::Error { code, detail }) => return Err(refuse(&mut conn, code, detail).await),
        Err(_) => return Ok(()),
    };
    let Ok(fields) = parse_stored(&offer) else {
        return Err(refuse(
            &mut conn,
            ErrorCode::Protocol,
            "malformed stored offer".into(),
        )
        .await);
    };
    if fields.sender != agent.name || fields.sender_fp != agent.fingerprint || fields.receiver != to
    {
        let detail = "the stored offer must name this connection's agent and key as its sender, \
                      and the receiver it is stored for"
            .into();
        return Err(refuse(&mut conn, ErrorCode::Protocol, detail).await);
    }
    let spki = match key_of(state, &to).await {
        Ok(spki) => spki,
        Err(Message::Error { code, detail }) => return Err(refuse(&mut conn, code, detail).await),
        Err(_) => return Ok(()),
    };
    if Fingerprint::of_spki(&spki) != fields.receiver_fp {
        let detail = format!("the stored offer is sealed to another key than {to}'s");
        return Err(refuse(&mut conn, ErrorCode::Protocol, detail).await);
    }
    let (tid, sid) = (fields.transfer_id, fields.stream_id);
    // Sealed to the receiver's last-resort bundle (for the log only).
    let last_resort = mailbox
        .last_resort(&to)
        .await
        .ok()
        .flatten()
        .and_then(|b| keyferry_common::handshake::prekey::own_bundle(&b).ok())
        .is_some_and(|b| b.id == fields.bundle_id);
    let _slot = match place::offer_place(state, &agent.name, sid).await {
        Ok(slot) => slot,
        Err(detail) => return Err(refuse(&mut conn, ErrorCode::RateLimited, detail).await),
    };
    let meta = StoredMeta {
        id: tid,
        from: agent.name.clone(),
        to: to.clone(),
        sender_spki: agent.spki.clone(),
        offer_body: offer.body,
        offer_signature: offer.signature,
        size,
        stored_at: 0,
        expires: 0,
        last_resort,
        order: 0,
    };
    let upload = match mailbox.reserve(meta, unix_now()).await {
        Ok(u) => u,
        Err(refusal) => {
            info!(transfer = %tid, from = %agent.name, %to, %refusal, "stored transfer refused");
            return Err(refuse(&mut conn, ErrorCode::StoreFull, refusal.to_string()).await);
        }
    };
    let within = state.limits.handshake_timeout;
    let Some((ticket, arrival)) = state.handoffs.issue(tid, within) else {
        return Err(refuse(
            &mut conn,
            ErrorCode::Protocol,
            "a transfer of that id is waiting already".into(),
        )
        .await);
    };
    conn.writer
        .write(&Message::Ticket {
            transfer_id: tid,
            ticket,
            address: String::new(),
        })
        .await?;
    let data = match tokio::time::timeout(within, arrival).await {
        Ok(Ok(data)) => data,
        _ => {
            return Err(SessionError::Refused(
                "the sender never opened its upload".into(),
            ));
        }
    };
    drop(conn);
    let idle = state.limits.idle_timeout;
    let meters = state.metrics.meters(crate::metrics::Path::Stored);
    match crate::stored::take_upload(data, upload, (tid, sid), idle, meters).await {
        Ok(meta) => {
            info!(transfer = %tid, from = %agent.name, to = %meta.to, expires = meta.expires, last_resort = meta.last_resort, "transfer stored for an offline receiver");
            state.couriers.kick(&meta.to);
            Ok(())
        }
        Err(why) => Err(SessionError::Refused(format!(
            "stored upload of {tid} failed: {why}"
        ))),
    }
}

/// `Receipts`: the sender's stored transfers, newest first.
pub(super) async fn receipts(state: &State, agent: &Agent) -> Message {
    let mailbox = match mailbox(state) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let mut records = match mailbox.receipts(&agent.name, unix_now()).await {
        Ok(records) => records,
        Err(e) => {
            warn!(error = %e, "mailbox: receipts unreadable");
            return error(ErrorCode::Protocol, "the mailbox could not be read".into());
        }
    };
    records.sort_by_key(|r| std::cmp::Reverse(r.stored_at));
    records.truncate(MOST_LISTED);
    let mut entries = Vec::with_capacity(records.len());
    let mut keys = std::collections::HashMap::new();
    for r in records {
        if !keys.contains_key(&r.to) {
            let spki = key_of(state, &r.to).await.unwrap_or_default();
            keys.insert(r.to.clone(), spki);
        }
        let spki = keys.get(&r.to).cloned().unwrap_or_default();
        entries.push({
            let (state_byte, at, receipt) = match r.state {
                Kept::Waiting { expires } => (0, expires, Vec::new()),
                Kept::Delivered { receipt, at } => (1, at, receipt),
                Kept::Refused { receipt, at } => (2, at, receipt),
                Kept::Expired { at } => (3, at, Vec::new()),
                Kept::Withdrawn { at } => (4, at, Vec::new()),
            };
            StoredEntry {
                transfer_id: r.id,
                to: r.to,
                size: r.size,
                stored_at: r.stored_at,
                state: state_byte,
                at,
                receipt,
                spki,
            }
        });
    }
    Message::ReceiptList { entries }
}

/// `Withdraw{tid}`.
pub(super) async fn withdraw(state: &State, agent: &Agent, tid: TransferId) -> Message {
    let mailbox = match mailbox(state) {
        Ok(m) => m,
        Err(e) => return e,
    };
    match mailbox.withdraw(&agent.name, &tid, unix_now()).await {
        Ok(()) => {
            info!(transfer = %tid, from = %agent.name, "stored transfer withdrawn");
            Message::Withdrawn { transfer_id: tid }
        }
        Err(e @ (WithdrawError::NotWaiting { .. } | WithdrawError::Delivering { .. })) => {
            error(ErrorCode::UnknownTransfer, e.to_string())
        }
        Err(e) => error(ErrorCode::Protocol, e.to_string()),
    }
}

//! Offers between brokers of a cluster (PROTOCOL.md §2.6). The sender's
//! broker finds the receiver's broker in the presence bucket and sends it
//! the offer by NATS request/reply ([`offer`]); the receiver's broker pushes
//! it on the receiver's control connection, relays the answer, and on accept
//! issues both tickets itself, returns the sender's with its advertised
//! address, and relays the transfer when both data connections arrive
//! ([`serve`]). The offer and accept bytes cross NATS as the agents made
//! them; the file's bytes never do.

use std::time::Duration;

use async_nats::RequestErrorKind;
use keyferry_common::identity::PublicKey;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, SignedOffer, ticket_address_ok};
use tracing::{info, warn};

use super::start::{self, ReceiverLink};
use super::{Agent, place};
use crate::cluster::wire::{RoutedAnswer, RoutedOffer, decode, encode};
use crate::cluster::{Cluster, check_id};
use crate::metrics::Path;
use crate::registry::Unreachable;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::transfers::Answer;

/// Time on top of the answer timeout for the request to cross the cluster.
const ROUTE_SLACK: Duration = Duration::from_secs(5);

fn failed(code: ErrorCode, detail: String) -> RoutedAnswer {
    RoutedAnswer::Failed { code, detail }
}

/// The sender's broker: sends `offer` to the broker holding `to` and
/// returns its answer (as a failure when it cannot be had).
pub(super) async fn offer(
    state: &State,
    cluster: &Cluster,
    agent: &Agent,
    to: &AgentName,
    offer: SignedOffer,
) -> RoutedAnswer {
    let offline = |detail: String| failed(ErrorCode::PeerOffline, detail);
    let holder = match cluster.locate(to).await {
        Ok(Some(p)) if p.broker != cluster.member().id && check_id(&p.broker).is_ok() => p.broker,
        Ok(_) => {
            return offline(format!(
                "{to} is not connected as a receiver to any broker of this cluster"
            ));
        }
        Err(e) => {
            return offline(format!(
                "{to} is not connected to this broker, and the cluster cannot tell where it is ({e})"
            ));
        }
    };
    let routed = RoutedOffer {
        to: to.clone(),
        from: agent.name.clone(),
        spki: agent.spki.clone(),
        offer,
    };
    let request = async_nats::Request::new()
        .payload(encode(&routed).into())
        .timeout(Some(state.limits.answer_timeout + ROUTE_SLACK));
    let subject = Cluster::subject(&holder, "offer");
    match cluster.client().send_request(subject, request).await {
        Ok(reply) => match decode::<RoutedAnswer>(&reply.payload) {
            Some(RoutedAnswer::Accepted { address, .. }) if !ticket_address_ok(&address) => {
                warn!(broker = %holder, "routed accept with an invalid address");
                failed(
                    ErrorCode::Protocol,
                    format!("broker {holder} of this cluster advertises an invalid address"),
                )
            }
            Some(answer) => answer,
            None => failed(
                ErrorCode::Protocol,
                format!("broker {holder} of this cluster sent a malformed answer"),
            ),
        },
        Err(e) if e.kind() == RequestErrorKind::NoResponders => offline(format!(
            "{to} is connected to broker {holder} of this cluster, which does not answer (stopped?)"
        )),
        Err(e) if e.kind() == RequestErrorKind::TimedOut => {
            offline(format!("{to} did not answer the offer"))
        }
        Err(e) => offline(format!(
            "the offer could not be sent to broker {holder} of this cluster: {e}"
        )),
    }
}

/// The receiver's broker: serves one routed offer, replying through
/// `reply`, then relays the transfer if it was accepted.
pub async fn serve(
    state: &State,
    cluster: &Cluster,
    payload: &[u8],
    reply: async_nats::Subject,
    shutdown: Shutdown,
) {
    let send = |answer: RoutedAnswer| {
        let client = cluster.client().clone();
        let reply = reply.clone();
        async move {
            if let Err(e) = client.publish(reply, encode(&answer).into()).await {
                warn!(error = %e, "answer to a routed offer could not be sent");
            }
        }
    };
    let Some(routed) = decode::<RoutedOffer>(payload) else {
        warn!("malformed routed offer from the cluster");
        return send(failed(ErrorCode::Protocol, "malformed routed offer".into())).await;
    };
    let Ok(fields) = routed.offer.parse() else {
        return send(failed(ErrorCode::Protocol, "malformed offer".into())).await;
    };
    let key_matches =
        PublicKey::from_spki_der(&routed.spki).is_ok_and(|k| k.fingerprint() == fields.sender_fp);
    if fields.sender != routed.from || fields.receiver != routed.to || !key_matches {
        warn!(from = %routed.from, "routed offer names another sender, receiver or key");
        return send(failed(
            ErrorCode::Protocol,
            "the offer must name its sender's agent and key".into(),
        ))
        .await;
    }
    // This broker's access policy holds for whoever reaches its receivers.
    if !state.policy.allows(&routed.from, &fields.sender_fp) {
        warn!(from = %routed.from, "routed offer from an agent not on this broker's allowlist");
        return send(failed(
            ErrorCode::Policy,
            format!(
                "{} is not on the allowlist of broker {}, which holds the receiver",
                routed.from,
                cluster.member().id
            ),
        ))
        .await;
    }
    let (tid, sid, to) = (fields.transfer_id, fields.stream_id, routed.to);
    let limits = &state.limits;
    let at = format!(" through broker {}", cluster.member().id);
    let slot = match place::offer_slot(state, &routed.from, sid, &at) {
        // Counted in the cluster too while its relay runs here.
        Ok(slot) => place::cluster_slot(state, &routed.from, sid, slot, false).await,
        Err(detail) => return send(failed(ErrorCode::RateLimited, detail)).await,
    };
    let slot = match slot {
        Ok(slot) => slot,
        Err(detail) => return send(failed(ErrorCode::RateLimited, detail)).await,
    };
    let offered = Message::Offered {
        from: routed.from.clone(),
        spki: routed.spki,
        offer: routed.offer,
    };
    let offline = || {
        failed(
            ErrorCode::PeerOffline,
            format!("{to} is not connected as a receiver"),
        )
    };
    let Some(answer) = state.transfers.offer(tid, &to) else {
        return send(failed(
            ErrorCode::Protocol,
            format!("transfer {tid} is already offered"),
        ))
        .await;
    };
    if let Err(Unreachable::Offline | Unreachable::Full) = state.registry.push(&to, offered) {
        state.transfers.cancel(&tid);
        return send(offline()).await;
    }
    info!(transfer = %tid, from = %routed.from, to = %to, "transfer offered through the cluster");
    let answer = match tokio::time::timeout(limits.answer_timeout, answer).await {
        Err(_) => {
            state.transfers.cancel(&tid);
            return send(failed(
                ErrorCode::PeerOffline,
                format!("{to} did not answer the offer"),
            ))
            .await;
        }
        Ok(Err(_)) => {
            return send(failed(ErrorCode::PeerOffline, format!("{to} disconnected"))).await;
        }
        Ok(Ok(a)) => a,
    };
    let (accept, queue) = match answer {
        Answer::Refused(reason) => return send(RoutedAnswer::Refused(reason)).await,
        Answer::Accepted { accept, receiver } => (accept, receiver),
    };
    let _incoming = state.transfers.relaying(&to);
    let mut receiver = ReceiverLink::new(queue, tid);
    let issued = match start::issue(state, &mut receiver, (tid, sid), &routed.from) {
        Ok(issued) => issued,
        Err((code, detail)) => return send(failed(code, detail)).await,
    };
    send(RoutedAnswer::Accepted {
        accept,
        ticket: issued.sender_ticket,
        address: cluster.member().advertise.clone(),
    })
    .await;
    let ids = (tid, sid);
    start::relay_when_connected(state, issued, ids, Path::Routed, shutdown, receiver).await;
    drop(slot);
}

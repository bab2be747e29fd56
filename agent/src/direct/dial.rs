//! The sender's side of a direct connection (PROTOCOL.md §2.7): every
//! address the receiver's accept names is dialled at once, each with a
//! fresh challenge; the first whose listener answers with the receiver's
//! proof over it gets our proof and carries the stream. A listener that
//! cannot prove itself (someone else holding that address, a port reused)
//! learns nothing it could use elsewhere: our proof goes only to the one
//! that proved itself, and covers its own fresh challenge. On a long path
//! more connections go to the same address ([`super::lanes`]), dialled as
//! soon as the first one's connect shows the round trip, beside its proof;
//! they carry the stream only if that first listener proved itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::crypto::random_array;
use keyferry_common::handshake::direct::{Challenges, DirectTerms, verify_receiver};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::Connection;
use keyferry_common::wire::message::Message;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::lanes::{self, Probe};
use super::punch::{PunchPort, SENDER_WINDOW};
use super::{DIAL_TIMEOUT, PROOF_TIMEOUT};
use crate::client::DataConn;

/// Largest answer on a direct connection before it is proved (a
/// `DirectChallenge` is 65 bytes).
const MAX_ANSWER_FRAME: usize = 96;

/// Dials the receiver's candidates (loopback ones only if `loopback`: the
/// broker is on this machine too) and returns the first connection whose
/// listener proved itself, after sending our proof on it; or why none
/// worked (one reason per address). Each listening address is dialled once
/// from a port of the system's choice; each simultaneous-open address from
/// our `punch` port (named in the terms) if it is of its family, until the
/// simultaneous open's window ends (PROTOCOL.md §2.7), else once too.
/// Through a listening address the stream then takes as many connections
/// as [`crate::streams::count`] says for the round trip its connect took
/// (`streams`: `--streams`); returns it and that number.
pub async fn dial(
    terms: &DirectTerms,
    key: &Arc<MacKey>,
    tid: TransferId,
    (loopback, streams): (bool, Option<u8>),
    punch: Option<PunchPort>,
) -> Result<(DataConn, u8), String> {
    let deadline = tokio::time::Instant::now() + SENDER_WINDOW;
    let punch = punch.map(Arc::new);
    // (address, our punch port to dial it from, whether it is a
    // simultaneous-open address: those take one connection, never lanes)
    let listening = terms.dialable().map(|a| (a, None, false));
    let punched = terms
        .punch_dialable()
        .map(|a| (a, punch.as_ref().filter(|p| p.reaches(&a)).cloned(), true));
    let mut attempts = JoinSet::new();
    let mut seen = Vec::new();
    // Only the first attempt whose connect completes dials further
    // connections early: the receiver proves at most 16 at once, and lanes
    // to several of its addresses would crowd out the winner's.
    let claimed = Arc::new(AtomicBool::new(false));
    for (addr, from, simultaneous) in listening
        .chain(punched)
        .filter(|(a, _, _)| loopback || !a.ip().is_loopback())
    {
        // Each address once (`::ffff:X` is X).
        if seen.contains(&addr) {
            continue;
        }
        seen.push(addr);
        let (key, claimed) = (Arc::clone(key), Arc::clone(&claimed));
        attempts.spawn(async move {
            let asked = Instant::now();
            let tcp = match from {
                Some(p) => p.connect(addr, deadline).await,
                None => tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| "no answer".to_owned())
                    .and_then(|r| r.map_err(|e| e.to_string())),
            };
            // The connect took a round trip: the further connections are
            // dialled now, beside this one's proof (aborted with `more` if
            // it does not win). A simultaneous open's mapping takes one.
            let rtt = asked.elapsed();
            let n = if simultaneous {
                1
            } else {
                crate::streams::count(rtt, streams, crate::streams::DIRECT)
            };
            let mut more = JoinSet::new();
            if tcp.is_ok() && n > 1 && !claimed.swap(true, Ordering::Relaxed) {
                let key = Arc::clone(&key);
                more.spawn(async move { lanes::open_more(addr, &key, tid, (n - 1, rtt)).await });
            }
            let proved = match tcp {
                Ok(tcp) => one(tcp, &key, tid).await,
                Err(e) => Err(e),
            };
            (addr, proved, (n, rtt, more))
        });
    }
    if attempts.is_empty() {
        return Err("the receiver announced no address this agent may dial".into());
    }
    let mut why = Vec::new();
    while let Some(joined) = attempts.join_next().await {
        match joined {
            Ok((addr, Ok((conn, c)), (n, rtt, mut more))) => {
                // Only the winner hears our proof; the others are dropped.
                // A winner that was not the first to connect dials its
                // further connections now.
                let more = match more.join_next().await {
                    Some(Ok(proved)) => proved,
                    Some(Err(_)) => Vec::new(),
                    None if n > 1 => lanes::open_more(addr, key, tid, (n - 1, rtt)).await,
                    None => Vec::new(),
                };
                match lanes::join(conn, &c, more, key, tid).await {
                    Ok(joined) => return Ok(joined),
                    Err(e) => why.push(format!("{addr}: {e}")),
                }
            }
            Ok((addr, Err(e), _)) => why.push(format!("{addr}: {e}")),
            Err(e) => why.push(e.to_string()),
        }
    }
    Err(why.join("; "))
}

/// One connection: send our challenge, check the listener's proof over both
/// challenges (within [`PROOF_TIMEOUT`]).
pub(super) async fn one(
    tcp: TcpStream,
    key: &MacKey,
    tid: TransferId,
) -> Result<(Probe, Challenges), String> {
    let _ = keyferry_common::io::tcp::direct(&tcp);
    let mut conn = Connection::new(tcp);
    conn.reader.set_max(MAX_ANSWER_FRAME);
    let ours = random_array();
    let hello = Message::DirectHello {
        transfer_id: tid,
        nonce: ours,
    };
    conn.writer.write(&hello).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(PROOF_TIMEOUT, conn.reader.read()).await {
        Ok(Ok(Some(Message::DirectChallenge { nonce, proof }))) => {
            let c = Challenges {
                sender: ours,
                receiver: nonce,
            };
            match verify_receiver(key, &tid, &c, &proof) {
                Ok(()) => Ok((conn, c)),
                Err(_) => Err("the listener there is not the receiver".into()),
            }
        }
        Ok(Ok(Some(_))) => Err("the listener there is not the receiver".into()),
        Ok(Ok(None)) => Err("closed without proving itself".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no proof in time".into()),
    }
}

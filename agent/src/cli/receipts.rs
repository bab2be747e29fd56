//! `agent --receipts` and `agent --withdraw ID`: what became of this agent's
//! stored transfers (PROTOCOL.md §2.8). A delivered or refused one comes with
//! the receiver's signed receipt, checked here with the receiver's key — the
//! one the broker names, which must be the key this agent pinned for that
//! receiver — and, for a delivery, against the SHA-256 this agent recorded
//! when it stored the transfer. The broker's word alone is never shown as a
//! delivery.

use std::time::Duration;

use keyferry_common::handshake::receipt::{Outcome, StoredReceipt};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::TransferId;
use keyferry_common::text::escape;
use keyferry_common::wire::message::{Message, Role, StoredEntry};
use serde::Serialize;

use crate::client::{Ctx, broker_error, conn_error, connect_then};
use crate::error::AgentError;
use crate::mailbox::outbox::Outbox;
use crate::output::say;

/// `secs` (Unix) as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let rem = secs % 86400;
    let (y, m, d) = crate::logline::civil(secs / 86400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One stored transfer, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Line {
    transfer_id: String,
    to: String,
    /// waiting, delivered, refused, expired, withdrawn.
    state: &'static str,
    bytes: u64,
    stored: u64,
    /// When it expires (waiting) or ended.
    at: u64,
    /// For delivered and refused: whether the receipt verified with the
    /// receiver's pinned key (and, delivered, matches what was sent).
    verified: Option<bool>,
    /// Delivered: the SHA-256 the receipt confirms.
    sha256: Option<String>,
    /// Refused: the receiver's reason; unverified: why not.
    why: Option<String>,
}

/// Checks one entry's receipt: its outcome, or why it cannot be trusted.
fn check(ctx: &Ctx, outbox: Option<&Outbox>, e: &StoredEntry) -> Result<Outcome, String> {
    if e.receipt.is_empty() {
        return Err(format!(
            "{} signed no receipt (it could not verify the offer it was given, or took it for \
             a replay)",
            e.to
        ));
    }
    let key = PublicKey::from_spki_der(&e.spki).map_err(|e| format!("unusable key: {e}"))?;
    let pins = ctx.home.known_peers();
    match pins.get(e.to.as_str()) {
        Ok(Some(pin)) if pin.fingerprint == key.fingerprint() => {}
        Ok(_) => {
            return Err(format!(
                "the broker names key {} for {}, not the key pinned when it was stored",
                key.fingerprint(),
                e.to
            ));
        }
        Err(e) => return Err(e.to_string()),
    }
    let r = StoredReceipt::verify(&e.receipt, &key)
        .map_err(|_| "the receipt does not verify with the receiver's pinned key".to_owned())?;
    if r.transfer_id != e.transfer_id || r.sender_fp != ctx.identity.fingerprint() {
        return Err("the receipt is for another transfer".into());
    }
    let ours = outbox.and_then(|o| o.get(&e.transfer_id.to_string()));
    // Stored for that receiver and that key, as this home recorded it.
    if let Some(sent) = &ours
        && (sent.to != e.to.as_str() || sent.fingerprint != key.fingerprint().to_string())
    {
        return Err("the receipt names another receiver or key than it was stored for".into());
    }
    if let Outcome::Delivered { digest } = &r.outcome {
        match ours {
            Some(sent) if sent.sha256 == hex::encode(digest) => {}
            Some(_) => return Err("the receipt confirms another SHA-256 than was sent".into()),
            None => return Err("no record of this transfer in this home to check it with".into()),
        }
    }
    Ok(r.outcome)
}

fn describe(ctx: &Ctx, outbox: Option<&Outbox>, e: &StoredEntry) -> Line {
    let (state, verified, sha256, why) = match e.state {
        0 => ("waiting", None, None, None),
        1 | 2 => match check(ctx, outbox, e) {
            Ok(Outcome::Delivered { digest }) => {
                ("delivered", Some(true), Some(hex::encode(digest)), None)
            }
            Ok(Outcome::Refused { why }) => ("refused", Some(true), None, Some(escape(&why))),
            Err(why) => (
                if e.state == 1 { "delivered" } else { "refused" },
                Some(false),
                None,
                Some(why),
            ),
        },
        3 => ("expired", None, None, None),
        _ => ("withdrawn", None, None, None),
    };
    // The broker knows the upload's bound; the record here, the data's size.
    let bytes = outbox
        .and_then(|o| o.get(&e.transfer_id.to_string()))
        .map_or(e.size, |s| s.bytes);
    Line {
        transfer_id: e.transfer_id.to_string(),
        to: e.to.to_string(),
        state,
        bytes,
        stored: e.stored_at,
        at: e.at,
        verified,
        sha256,
        why,
    }
}

fn text(l: &Line) -> String {
    let head = format!(
        "{} {} to {} ({} bytes, stored {})",
        l.state,
        l.transfer_id,
        l.to,
        l.bytes,
        utc(l.stored)
    );
    match (l.state, l.verified) {
        ("waiting", _) => format!("{head}: expires {}", utc(l.at)),
        ("delivered", Some(true)) => format!(
            "{head}: delivered {}, receipt verified, sha256 {}",
            utc(l.at),
            l.sha256.as_deref().unwrap_or_default()
        ),
        ("refused", Some(true)) => format!(
            "{head}: refused {}: {}",
            utc(l.at),
            l.why.as_deref().unwrap_or_default()
        ),
        (_, Some(false)) => format!(
            "{head}: the broker says {}, but NOT VERIFIED: {}",
            l.state,
            l.why.as_deref().unwrap_or_default()
        ),
        ("expired", _) => format!("{head}: expired {} undelivered; deleted", utc(l.at)),
        _ => format!("{head}: withdrawn {}", utc(l.at)),
    }
}

/// `--receipts`.
pub async fn receipts(ctx: &Ctx, json: bool) -> Result<(), AgentError> {
    let mut conn = connect_then(ctx, Role::Sender, Some(&Message::Receipts)).await?;
    let entries = match conn.reader.read_timeout(Duration::from_secs(30)).await {
        Ok(Some(Message::ReceiptList { entries })) => entries,
        Ok(Some(Message::Error { code, detail })) => return Err(broker_error(code, detail)),
        Ok(_) => return Err(AgentError::Protocol("the broker did not list the receipts")),
        Err(e) => return Err(conn_error(ctx, e)),
    };
    let outbox = Outbox::open(ctx.home.dir()).ok();
    if entries.is_empty() && !json {
        say!("no stored transfers at this broker");
    }
    for e in &entries {
        let line = describe(ctx, outbox.as_ref(), e);
        if json {
            let out =
                serde_json::to_string(&line).map_err(|e| AgentError::Internal(e.to_string()))?;
            say!("{out}");
        } else {
            say!("{}", text(&line));
        }
    }
    Ok(())
}

/// `--withdraw ID`.
pub async fn withdraw(ctx: &Ctx, id: &str) -> Result<(), AgentError> {
    let tid = hex::decode(id)
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(TransferId)
        .ok_or_else(|| {
            AgentError::Usage(format!(
                "--withdraw takes a transfer id of 32 hex digits, not {}",
                escape(id)
            ))
        })?;
    let msg = Message::Withdraw { transfer_id: tid };
    let mut conn = connect_then(ctx, Role::Sender, Some(&msg)).await?;
    match conn.reader.read_timeout(Duration::from_secs(30)).await {
        Ok(Some(Message::Withdrawn { transfer_id })) if transfer_id == tid => {
            if let Ok(o) = Outbox::open(ctx.home.dir()) {
                o.forget(&tid.to_string());
            }
            say!("withdrew {tid}: deleted at the broker, it will not be delivered");
            Ok(())
        }
        Ok(Some(Message::Error { code, detail })) => Err(broker_error(code, detail)),
        Ok(_) => Err(AgentError::Protocol(
            "the broker did not answer the withdrawal",
        )),
        Err(e) => Err(conn_error(ctx, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_515_200 + 3661), "2026-12-06 01:01:01 UTC");
    }
}

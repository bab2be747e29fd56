//! What the receiver prints for each offer it handled: a line (on stdout for
//! what it received, on stderr for a refusal or a failure), or with `--json`
//! one JSON object per event on stdout (`received`, `message`, `failed`,
//! `refused`; the failure lines stay on stderr too). Each failure maps to the
//! exit code a `--once` receiver ends with.

use std::path::PathBuf;

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::text::escape;
use keyferry_common::wire::message::AbortReason;
use serde::Serialize;

use super::Failure;
use crate::direct::Path;
use crate::error::exit;
use crate::output::{err_line, say};

/// What a verified transfer left, as the store built it.
#[derive(Debug)]
pub(super) struct Placed {
    pub what: What,
    /// Plaintext bytes in all.
    pub bytes: u64,
    /// SHA-256 of the plaintext.
    pub sha256: [u8; 32],
    /// Whether the receiver computed `sha256` (else the sender signed it:
    /// `--trust-sender-hash`).
    pub own_hash: bool,
    /// Bytes an earlier attempt had left verified (0 if none).
    pub resumed_from: u64,
    /// Session keys the stream used (1 + key updates).
    pub session_keys: u64,
}

/// What was received.
#[derive(Debug)]
pub(super) enum What {
    /// A text message.
    Message(String),
    /// A chat stream that ended (its lines were shown as they came).
    Chat,
    /// Files and directories, each top-level item under its final path.
    Items {
        items: Vec<(String, PathBuf)>,
        files: usize,
        single_file: bool,
    },
    /// One file written to standard output (`--stdout`).
    Stdout { name: String },
}

/// One item of a `received` event.
#[derive(Debug, Serialize)]
struct Item<'a> {
    name: &'a str,
    path: String,
}

/// One event, as `--json` prints it.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event<'a> {
    Received {
        transfer_id: String,
        from: &'a str,
        /// The (first) top-level item's name.
        file: &'a str,
        /// Where it was placed (`-` for standard output).
        path: String,
        /// Every top-level item.
        items: Vec<Item<'a>>,
        files: usize,
        bytes: u64,
        sha256: String,
        /// `receiver` (computed here) or `sender` (as it signed it).
        sha256_by: &'static str,
        seconds: f64,
        session_keys: u64,
        resumed_from: u64,
        /// Which path the stream came over: `direct` or `relay`.
        via: Path,
        /// Sent while this receiver was offline, and kept by the broker.
        stored: bool,
    },
    Message {
        transfer_id: String,
        from: &'a str,
        text: &'a str,
        bytes: u64,
        sha256: String,
        sha256_by: &'static str,
        seconds: f64,
        session_keys: u64,
        via: Path,
        stored: bool,
    },
    Failed {
        transfer_id: String,
        from: &'a str,
        reason: &'a str,
        exit_code: u8,
    },
    Refused {
        /// `null` for an offer too short to name its transfer.
        transfer_id: Option<String>,
        from: &'a str,
        reason: &'a str,
        exit_code: u8,
    },
}

fn print_json(event: &Event<'_>) {
    // Serialising these plain structs cannot fail; if it ever did, the
    // event would be missing, never a half line.
    if let Ok(line) = serde_json::to_string(event) {
        say!("{line}");
    }
}

/// The exit code a `--once` receiver ends with after `failure`: 8 for an
/// offer it refused, 9 for data that did not verify or broke a rule, 1 for a
/// transfer cut short (the sender, the broker or the disk went away).
pub(super) fn exit_code(failure: &Failure) -> u8 {
    match failure {
        Failure::Refused(..) => exit::REFUSED,
        Failure::Failed(
            AbortReason::VerificationFailed | AbortReason::Policy | AbortReason::Source,
            _,
        ) => exit::VERIFICATION_FAILED,
        Failure::Failed(..) => exit::OTHER,
    }
}

/// Reports a verified transfer.
pub(super) fn received(
    tid: TransferId,
    from: &AgentName,
    p: &Placed,
    (seconds, via, stored): (f64, Path, bool),
    json: bool,
) {
    let shown_via = if stored {
        format!("{via}, stored while this receiver was offline")
    } else {
        via.to_string()
    };
    let sha = hex::encode(p.sha256);
    let sha256_by = if p.own_hash { "receiver" } else { "sender" };
    // A hash taken from the sender says so.
    let shown_sha = if p.own_hash {
        sha.clone()
    } else {
        format!("{sha} (the sender's)")
    };
    let resumed = if p.resumed_from > 0 {
        format!(", resumed at byte {}", p.resumed_from)
    } else {
        String::new()
    };
    let (transfer_id, from) = (tid.to_string(), from.as_str());
    match &p.what {
        // Its lines were shown as they came.
        What::Chat => {}
        What::Message(text) if json => print_json(&Event::Message {
            transfer_id,
            from,
            text,
            bytes: p.bytes,
            sha256: sha,
            sha256_by,
            seconds,
            session_keys: p.session_keys,
            via,
            stored,
        }),
        What::Message(text) => {
            say!(
                "message ({} bytes, {shown_via}): {} from {from}",
                p.bytes,
                escape(text)
            )
        }
        What::Items {
            items,
            files,
            single_file,
        } => {
            if json {
                let first = items.first();
                print_json(&Event::Received {
                    transfer_id,
                    from,
                    file: first.map_or("", |(n, _)| n.as_str()),
                    path: first.map_or_else(String::new, |(_, p)| p.display().to_string()),
                    items: items
                        .iter()
                        .map(|(name, path)| Item {
                            name,
                            path: path.display().to_string(),
                        })
                        .collect(),
                    files: *files,
                    bytes: p.bytes,
                    sha256: sha,
                    sha256_by,
                    seconds,
                    session_keys: p.session_keys,
                    resumed_from: p.resumed_from,
                    via,
                    stored,
                });
                return;
            }
            let what = match &items[..] {
                [(one, _)] if *single_file => escape(one),
                _ => format!("{} item(s), {files} file(s)", items.len()),
            };
            let shown: Vec<String> = items.iter().map(|(_, p)| p.display().to_string()).collect();
            say!(
                "received {what} ({} bytes, sha256 {shown_sha}{resumed}, {shown_via}) -> {} from {from}",
                p.bytes,
                shown.join(", ")
            );
        }
        // Standard output carries the data: the report goes to stderr.
        What::Stdout { name } => err_line(&format!(
            "received {} ({} bytes, sha256 {shown_sha}, {via}) -> standard output from {from}",
            escape(name),
            p.bytes
        )),
    }
}

/// Reports an offer refused before anything was accepted (`tid` is `None`
/// for an offer too short to name its transfer; it is not answered).
pub(super) fn refused(tid: Option<TransferId>, from: &AgentName, why: &str, json: bool) {
    match tid {
        Some(tid) => err_line(&format!("refused transfer {tid} from {from}: {why}")),
        None => err_line(&format!("ignored an offer from {from}: {why}")),
    }
    if json {
        print_json(&Event::Refused {
            transfer_id: tid.map(|t| t.to_string()),
            from: from.as_str(),
            reason: why,
            exit_code: exit::REFUSED,
        });
    }
}

/// Reports a transfer that failed after it was accepted.
pub(super) fn failed(tid: TransferId, from: &AgentName, failure: &Failure, kept: &str, json: bool) {
    let why = match failure {
        Failure::Refused(_, why) | Failure::Failed(_, why) => why,
    };
    err_line(&format!("transfer {tid} from {from} failed: {why}; {kept}"));
    if json {
        print_json(&Event::Failed {
            transfer_id: tid.to_string(),
            from: from.as_str(),
            reason: why,
            exit_code: exit_code(failure),
        });
    }
}

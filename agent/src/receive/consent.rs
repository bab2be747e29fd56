//! Who may send to this receiver, and asking its user (PROTOCOL.md §3.3
//! step 5a, §6.5): a policy by name (`--accept-from NAME,…`), by pin
//! (`--accept-from known`), everyone (`--yes`, or no terminal), or — the
//! default on a terminal — the question, asked once the manifest verified
//! and before a byte is written: who offers (name, fingerprint, first
//! contact or pinned) and what (the top-level names, escaped; how many
//! files; the size). A first contact is pinned only after a yes. Nothing
//! here holds a socket: the question goes to the stream's task
//! ([`Asked`]), which puts it to the user and tells the sender to proceed.

use std::time::Duration;

use keyferry_common::handshake::Kind;
use keyferry_common::identity::Fingerprint;
use keyferry_common::manifest::{EntryKind, Manifest};
use keyferry_common::name::AgentName;
use keyferry_common::text::escape;
use keyferry_common::wire::message::{AbortReason, RefuseReason};
use tokio::sync::{mpsc, oneshot};

use super::Failure;
use super::filename::TopLevel;
use crate::home::now_unix;
use crate::progress::human_bytes;
use crate::prompt::Answer;
use crate::trust::pins::{PinCheck, PinError, PinStore};

/// Longest a user may be given to answer: the broker ends a relay that is
/// silent for 120 s, and the sender waits this plus a margin.
pub const MAX_ASK: Duration = Duration::from_secs(100);

/// Who may send to this receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Ask the user at the terminal, who has this long to answer.
    Ask(Duration),
    /// Only these senders (`--accept-from NAME,…`), without asking.
    Only(Vec<AgentName>),
    /// Only senders whose key is pinned already (`--accept-from known`).
    Known,
    /// Anyone the broker admits (`--yes`, or no terminal to ask on).
    Anyone,
}

impl Policy {
    /// Whether `from` (pinned or a first contact) may offer at all: checked
    /// before anything is decrypted, so a refusal costs no RSA work.
    pub(super) fn admits(&self, from: &AgentName, pinned: bool) -> Result<(), Failure> {
        match self {
            Self::Only(names) if !names.contains(from) => Err(Failure::Refused(
                RefuseReason::NotListed,
                format!("{from} is not among the senders --accept-from names"),
            )),
            Self::Known if !pinned => Err(Failure::Refused(
                RefuseReason::NotKnown,
                format!(
                    "{from} is a first contact, and --accept-from known takes pinned senders only"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether this receiver's user named `from` (a larger RSA budget).
    pub fn names(&self, from: &AgentName) -> bool {
        matches!(self, Self::Only(names) if names.contains(from))
    }

    /// How long the user has to answer, if the user is asked.
    pub fn asks(&self) -> Option<Duration> {
        match self {
            Self::Ask(t) => Some(*t),
            _ => None,
        }
    }
}

/// Parses `--accept-from`: `known`, or names separated by commas.
pub fn parse_accept_from(s: &str) -> Result<Policy, String> {
    if s == "known" {
        return Ok(Policy::Known);
    }
    let names = s
        .split(',')
        .map(|n| AgentName::new(n.trim()).map_err(|e| format!("{n:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Policy::Only(names))
}

/// A question on its way to the user, and where the answer goes.
#[derive(Debug)]
pub struct Asked {
    /// The line to show.
    pub question: String,
    /// How long the user has.
    pub within: Duration,
    /// The answer.
    pub answer: oneshot::Sender<Answer>,
}

/// What the opening thread needs to ask about one transfer.
#[derive(Debug)]
pub struct Consent {
    /// The sender, as verified.
    pub from: AgentName,
    /// Its key.
    pub fp: Fingerprint,
    /// Whether its key is still to be pinned (a first contact): only after a yes.
    pub first_contact: bool,
    /// The pin file.
    pub pins: PinStore,
    /// How long the user has.
    pub within: Duration,
    /// Where questions go (the stream's task).
    pub asks: mpsc::Sender<Asked>,
}

impl Consent {
    /// Asks the user about `m` (blocking: the opening thread's). A yes pins
    /// a first contact; a no, or no answer, refuses the transfer with
    /// nothing written and nothing pinned.
    pub(super) fn ask(
        &self,
        kind: Kind,
        declared: u64,
        m: &Manifest,
        tops: &[TopLevel],
    ) -> Result<(), Failure> {
        let question = question(
            &self.from,
            &self.fp,
            self.first_contact,
            kind,
            declared,
            m,
            tops,
        );
        let (tx, rx) = oneshot::channel();
        let asked = Asked {
            question,
            within: self.within,
            answer: tx,
        };
        let gone = || {
            Failure::Failed(
                AbortReason::PeerGone,
                "the transfer ended while asking".into(),
            )
        };
        self.asks.blocking_send(asked).map_err(|_| gone())?;
        match rx.blocking_recv().map_err(|_| gone())? {
            Answer::Yes => self.pin(),
            Answer::No => Err(Failure::Failed(
                AbortReason::Declined,
                format!("declined (the offer from {})", self.from),
            )),
            Answer::NoAnswer => Err(Failure::Failed(
                AbortReason::NoAnswer,
                format!("no answer within {} s; refused", self.within.as_secs()),
            )),
        }
    }

    /// Pins a first contact's key, now that the user took its transfer.
    fn pin(&self) -> Result<(), Failure> {
        if !self.first_contact {
            return Ok(());
        }
        let policy = |e: PinError| Failure::Failed(AbortReason::Policy, e.to_string());
        match self
            .pins
            .check_or_pin(self.from.as_str(), self.fp, now_unix())
        {
            Ok(PinCheck::NewlyPinned(_)) => {
                crate::output::err_line(&format!(
                    "NEW KEY for {} {} — first contact, verify out of band",
                    self.from, self.fp
                ));
                Ok(())
            }
            Ok(PinCheck::Known(_)) => Ok(()),
            Err(e) => Err(policy(e)),
        }
    }
}

/// The question, e.g. `alice (SHA256:…, first contact) offers photos/ (3
/// files, 47.7 MiB). Accept? [y/N]`. Every name is escaped.
pub fn question(
    from: &AgentName,
    fp: &Fingerprint,
    first_contact: bool,
    kind: Kind,
    declared: u64,
    m: &Manifest,
    tops: &[TopLevel],
) -> String {
    let who = format!(
        "{from} ({fp}, {})",
        if first_contact {
            "first contact"
        } else {
            "pinned"
        }
    );
    if kind == Kind::Message {
        return format!("{who} sends a message ({declared} bytes). Show it? [y/N]");
    }
    let dirs: Vec<&str> = m
        .entries
        .iter()
        .filter(|e| e.path.len() == 1 && e.kind == EntryKind::Dir)
        .map(|e| e.path[0].as_str())
        .collect();
    const SHOWN: usize = 5;
    let mut names: Vec<String> = tops
        .iter()
        .take(SHOWN)
        .map(|t| {
            let slash = if dirs.contains(&t.name.as_str()) {
                "/"
            } else {
                ""
            };
            format!("{}{slash}", escape(&t.name))
        })
        .collect();
    if tops.len() > SHOWN {
        names.push(format!("and {} more", tops.len() - SHOWN));
    }
    let files = m
        .entries
        .iter()
        .filter(|e| e.kind != EntryKind::Dir)
        .count();
    let size = if m.size_known() {
        human_bytes(declared)
    } else {
        format!("from a pipe, at most {}", human_bytes(declared))
    };
    let count = if files == 1 {
        "1 file".to_owned()
    } else {
        format!("{files} files")
    };
    format!(
        "{who} offers {} ({count}, {size}). Accept? [y/N]",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use keyferry_common::manifest::Entry;

    use super::*;

    fn name(s: &str) -> AgentName {
        AgentName::new(s).unwrap()
    }

    fn entry(path: &[&str], kind: EntryKind) -> Entry {
        Entry {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            kind,
            meta: None,
        }
    }

    fn top(s: &str) -> TopLevel {
        TopLevel {
            name: s.into(),
            stored: s.into(),
        }
    }

    #[test]
    fn the_question_says_who_offers_what_and_escapes_names() {
        let m = Manifest {
            entries: vec![
                entry(&["photos"], EntryKind::Dir),
                entry(&["photos", "a.jpg"], EntryKind::File { size: 1 << 20 }),
                entry(&["photos", "b.jpg"], EntryKind::File { size: 2 << 20 }),
                entry(&["x\u{202e}gpj.exe"], EntryKind::File { size: 3 }),
            ],
        };
        let fp = Fingerprint([0; 32]);
        let q = question(
            &name("alice"),
            &fp,
            true,
            Kind::Files,
            (3 << 20) + 3,
            &m,
            &[top("photos"), top("x\u{202e}gpj.exe")],
        );
        assert_eq!(
            q,
            format!(
                "alice ({fp}, first contact) offers photos/, x\\u{{202e}}gpj.exe (3 files, \
                 3.00 MiB). Accept? [y/N]"
            )
        );
        let text = question(
            &name("bob"),
            &fp,
            false,
            Kind::Message,
            24,
            &Manifest::default(),
            &[],
        );
        assert_eq!(
            text,
            format!("bob ({fp}, pinned) sends a message (24 bytes). Show it? [y/N]")
        );
    }

    #[test]
    fn policies_by_name_and_by_pin() {
        let only = parse_accept_from("alice, bob").unwrap();
        assert_eq!(only, Policy::Only(vec![name("alice"), name("bob")]));
        assert!(only.admits(&name("alice"), false).is_ok());
        assert!(matches!(
            only.admits(&name("carol"), true),
            Err(Failure::Refused(RefuseReason::NotListed, _))
        ));
        assert!(only.names(&name("bob")) && !only.names(&name("carol")));
        let known = parse_accept_from("known").unwrap();
        assert!(known.admits(&name("carol"), true).is_ok());
        assert!(matches!(
            known.admits(&name("carol"), false),
            Err(Failure::Refused(RefuseReason::NotKnown, _))
        ));
        assert!(parse_accept_from("Alice").is_err());
        assert!(parse_accept_from("alice,,bob").is_err());
        assert_eq!(
            Policy::Ask(Duration::from_secs(60)).asks(),
            Some(Duration::from_secs(60))
        );
        assert!(Policy::Anyone.admits(&name("x"), false).is_ok());
    }
}

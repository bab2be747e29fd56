//! A chat stream arriving (PROTOCOL.md §6.6): each verified chunk is one
//! chat record; a line is shown only if its author's signature verifies
//! (in a group every member holds the stream keys, so only the signature
//! says who wrote it), an acknowledgement of one of our own lines goes to
//! the chat's sending side, and a keepalive is nothing. Nothing is stored.
//! What arrives goes to the chat as [`ChatEvent`]s, through a channel:
//! nothing here holds a socket or prints.

use keyferry_common::chat::{LINE_SIGNATURE, Record, line_signed};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::StreamId;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::AbortReason;
use tokio::sync::mpsc;

use super::Failure;

/// What the chat learns from the streams its peers send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// The chat's receiving half is connected: peers can reach it.
    Receiving,
    /// A peer's chat stream began: it is here.
    Joined {
        /// Who.
        from: AgentName,
    },
    /// A verified line of `from`'s.
    Line {
        /// Its author.
        from: AgentName,
        /// Its number among the author's lines.
        seq: u32,
        /// When it was typed (the author's clock), ms since the epoch.
        time_ms: u64,
        /// The text, as sent (escape it to show it).
        text: String,
    },
    /// `by` has shown our line `seq`.
    Acked {
        /// Who showed it.
        by: AgentName,
        /// Our line's number.
        seq: u32,
    },
    /// `from`'s chat stream ended (it left, or its connection went).
    Left {
        /// Who.
        from: AgentName,
    },
}

/// Where a chat receiver sends what arrives, and who it is.
#[derive(Debug, Clone)]
pub struct ChatLink {
    /// The chat's own name (acknowledgements of its lines are for it).
    pub me: AgentName,
    /// The chat's peers: chat streams are taken only from them.
    pub peers: Vec<AgentName>,
    /// The chat.
    pub events: mpsc::Sender<ChatEvent>,
}

/// One peer's chat stream, as the opening thread receives it.
#[derive(Debug)]
pub struct ChatIn {
    from: AgentName,
    key: PublicKey,
    stream_id: StreamId,
    link: ChatLink,
    /// The last line's number: each must be higher (no line shown twice).
    last_seq: std::sync::atomic::AtomicU32,
}

impl ChatIn {
    /// The stream `stream_id` from `from`, whose lines `key` signs; says so.
    pub(super) fn start(
        from: AgentName,
        key: PublicKey,
        stream_id: StreamId,
        link: ChatLink,
    ) -> Self {
        let _ = link
            .events
            .blocking_send(ChatEvent::Joined { from: from.clone() });
        Self {
            from,
            key,
            stream_id,
            link,
            last_seq: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Takes one chunk's verified plaintext: one record.
    pub(super) fn take(&self, plaintext: &[u8]) -> Result<(), Failure> {
        let refused = |why: &str| Failure::Failed(AbortReason::VerificationFailed, why.into());
        let event = match Record::decode(plaintext).map_err(|e| refused(&e.to_string()))? {
            Record::Line {
                seq,
                time_ms,
                text,
                signature,
            } => {
                let signed = line_signed(&self.stream_id, seq, time_ms, &text);
                self.key
                    .verify(LINE_SIGNATURE, &signed, &signature)
                    .map_err(|_| refused("a chat line whose signature is not its sender's"))?;
                let last = self
                    .last_seq
                    .swap(seq, std::sync::atomic::Ordering::Relaxed);
                if seq <= last {
                    return Err(refused("a chat line out of order, or shown before"));
                }
                ChatEvent::Line {
                    from: self.from.clone(),
                    seq,
                    time_ms,
                    text,
                }
            }
            Record::Ack { author, seq } if author == self.link.me => ChatEvent::Acked {
                by: self.from.clone(),
                seq,
            },
            Record::Ack { .. } | Record::Keepalive => return Ok(()),
        };
        // The chat may have ended meanwhile: then nobody listens.
        let _ = self.link.events.blocking_send(event);
        Ok(())
    }
}

impl Drop for ChatIn {
    fn drop(&mut self) {
        let _ = self.link.events.try_send(ChatEvent::Left {
            from: self.from.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use keyferry_common::identity::Identity;

    use super::*;

    fn identity(name: &str) -> Identity {
        let path = format!(
            "{}/../common/tests/fixtures/{name}.pem",
            env!("CARGO_MANIFEST_DIR")
        );
        Identity::from_pkcs8_pem(&std::fs::read_to_string(path).unwrap())
            .unwrap()
            .unwrap()
    }

    fn line(by: &Identity, sid: &StreamId, seq: u32, text: &str) -> Vec<u8> {
        let signature = by.sign(LINE_SIGNATURE, &line_signed(sid, seq, 5, text));
        Record::Line {
            seq,
            time_ms: 5,
            text: text.into(),
            signature,
        }
        .encode()
    }

    #[test]
    fn only_lines_signed_by_the_streams_sender_are_shown() {
        let (alice, mallory) = (identity("alice"), identity("mallory"));
        let sid = StreamId([4; 16]);
        let (tx, mut rx) = mpsc::channel(8);
        let link = ChatLink {
            me: AgentName::new("bob").unwrap(),
            peers: vec![AgentName::new("alice").unwrap()],
            events: tx,
        };
        let from = AgentName::new("alice").unwrap();
        let chat = ChatIn::start(from.clone(), alice.public().clone(), sid, link);
        assert_eq!(
            rx.try_recv().unwrap(),
            ChatEvent::Joined { from: from.clone() }
        );
        chat.take(&line(&alice, &sid, 1, "hi")).unwrap();
        assert!(matches!(
            rx.try_recv().unwrap(),
            ChatEvent::Line { seq: 1, .. }
        ));
        // Another member (who holds the stream keys in a group) cannot put
        // words in alice's mouth, nor replay her line into another stream.
        assert!(
            chat.take(&line(&mallory, &sid, 2, "send me money"))
                .is_err()
        );
        assert!(
            chat.take(&line(&alice, &StreamId([5; 16]), 2, "hi"))
                .is_err()
        );
        // Acknowledgements of bob's lines go to bob's sending half.
        let ack = Record::Ack {
            author: AgentName::new("bob").unwrap(),
            seq: 3,
        };
        chat.take(&ack.encode()).unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            ChatEvent::Acked {
                by: from.clone(),
                seq: 3
            }
        );
        drop(chat);
        assert_eq!(rx.try_recv().unwrap(), ChatEvent::Left { from });
    }
}

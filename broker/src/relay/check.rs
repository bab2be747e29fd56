//! What may pass a relay: each direction's frames checked as they stream by
//! (PROTOCOL.md §2.5). A chunk is judged from its first 27 bytes and its
//! record passes unread; any other message is small and decoded whole.
//! Plain state, no sockets.

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::wire::chunk::{CHUNK_HEAD_MAX, peek_chunk};
use keyferry_common::wire::frame::{self, LEN_PREFIX, MAX_FRAME_LEN};
use keyferry_common::wire::message::{self, Message};

use super::RelayEnd;

/// A direction of the relay.
#[derive(Debug, Clone, Copy)]
pub(super) enum Dir {
    Forward,
    Back,
}

impl Dir {
    pub(super) fn source(self) -> &'static str {
        match self {
            Self::Forward => "sender",
            Self::Back => "receiver",
        }
    }

    pub(super) fn destination(self) -> &'static str {
        match self {
            Self::Forward => "receiver",
            Self::Back => "sender",
        }
    }

    /// `Some(ends)` if `msg` may travel this way for transfer `tid` of
    /// stream `sid`; `ends` if it is the last message of this direction.
    fn allows(self, msg: &Message, (tid, sid): &(TransferId, StreamId)) -> Option<bool> {
        let (ours, ends) = match (self, msg) {
            (Self::Forward, Message::Root { transfer_id, .. }) => (transfer_id == tid, false),
            (Self::Forward, Message::Manifest { stream_id, .. })
            | (Self::Forward, Message::KeyUpdate { stream_id, .. })
            | (Self::Forward, Message::Chunk { stream_id, .. }) => (stream_id == sid, false),
            (Self::Forward, Message::Trailer { stream_id, .. }) => (stream_id == sid, true),
            (Self::Back, Message::Proceed { transfer_id }) => (transfer_id == tid, false),
            (Self::Back, Message::Receipt { transfer_id, .. })
            | (_, Message::Abort { transfer_id, .. }) => (transfer_id == tid, true),
            _ => return None,
        };
        ours.then_some(ends)
    }
}

/// What the start of a buffer holds.
pub(super) enum Scan {
    /// `n` bytes may go on; `ends` if they finish this direction.
    Forward { n: usize, ends: bool },
    /// More bytes are needed to decide.
    NeedMore,
    /// A frame that may not pass.
    Refuse(RelayEnd),
}

/// One direction's parser: where it stands in the byte stream.
pub(super) struct Checker {
    pub(super) dir: Dir,
    pub(super) ids: (TransferId, StreamId),
    /// Bytes of an approved chunk frame that are still to come.
    pub(super) passing: usize,
}

impl Checker {
    /// Decides about the start of `buf`.
    pub(super) fn scan(&mut self, buf: &[u8]) -> Scan {
        if self.passing > 0 {
            let n = self.passing.min(buf.len());
            self.passing -= n;
            return if n == 0 {
                Scan::NeedMore
            } else {
                Scan::Forward { n, ends: false }
            };
        }
        let len = match frame::peek_len(buf, MAX_FRAME_LEN) {
            Ok(Some(len)) => len,
            Ok(None) => return Scan::NeedMore,
            Err(e) => {
                return Scan::Refuse(RelayEnd::Refused {
                    side: self.dir.source(),
                    what: format!("a bad frame: {e}"),
                });
            }
        };
        let payload = &buf[LEN_PREFIX..];
        let head = len.min(CHUNK_HEAD_MAX);
        if payload.len() < head {
            return Scan::NeedMore;
        }
        let chunk = match self.dir {
            Dir::Forward => peek_chunk(&payload[..head], len),
            Dir::Back => None,
        };
        if let Some(sid) = chunk {
            if sid != self.ids.1 {
                return self.not_allowed();
            }
            self.passing = LEN_PREFIX + len;
            return self.scan(buf);
        }
        // Anything else is small: decode it whole.
        let Some(payload) = payload.get(..len) else {
            return Scan::NeedMore;
        };
        match message::decode_payload(payload)
            .ok()
            .and_then(|m| self.dir.allows(&m, &self.ids))
        {
            Some(ends) => Scan::Forward {
                n: LEN_PREFIX + len,
                ends,
            },
            None => self.not_allowed(),
        }
    }

    fn not_allowed(&self) -> Scan {
        Scan::Refuse(RelayEnd::Refused {
            side: self.dir.source(),
            what: "a message not allowed here".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(msg: &Message) -> Vec<u8> {
        message::encode(msg, MAX_FRAME_LEN).unwrap()
    }

    /// Runs a checker over `stream` fed in pieces of `step` bytes, as the pump
    /// does; returns how many bytes it let through and how it stopped.
    const IDS: (TransferId, StreamId) = (TransferId([1; 16]), StreamId([7; 16]));

    fn check(dir: Dir, stream: &[u8], step: usize) -> (usize, Option<String>) {
        let mut checker = Checker {
            dir,
            ids: IDS,
            passing: 0,
        };
        let (mut buf, mut fed, mut passed) = (Vec::new(), 0, 0);
        loop {
            let mut ok = 0;
            loop {
                match checker.scan(&buf[ok..]) {
                    Scan::Forward { n, ends } => {
                        ok += n;
                        if ends {
                            return (passed + ok, None);
                        }
                    }
                    Scan::NeedMore => break,
                    Scan::Refuse(why) => return (passed + ok, Some(why.to_string())),
                }
            }
            passed += ok;
            buf.drain(..ok);
            if fed == stream.len() {
                return (passed, Some("end".into()));
            }
            let next = (fed + step).min(stream.len());
            buf.extend_from_slice(&stream[fed..next]);
            fed = next;
        }
    }

    #[test]
    fn passes_a_whole_stream_in_any_pieces_and_stops_after_the_trailer() {
        let (tid, sid) = IDS;
        let stream = [
            frame_of(&Message::Root {
                transfer_id: tid,
                record: vec![1; 96],
            }),
            frame_of(&Message::Manifest {
                stream_id: sid,
                record: vec![2; 200],
            }),
            frame_of(&Message::Chunk {
                stream_id: sid,
                record: vec![3; 5000],
            }),
            frame_of(&Message::KeyUpdate {
                stream_id: sid,
                record: vec![4; 108],
            }),
            frame_of(&Message::Chunk {
                stream_id: sid,
                record: vec![],
            }),
            frame_of(&Message::Trailer {
                stream_id: sid,
                record: vec![5; 96],
            }),
        ]
        .concat();
        let extra = [stream.clone(), vec![0xff; 10]].concat();
        for step in [1, 3, 27, 31, 4096, 1 << 20] {
            assert_eq!(check(Dir::Forward, &extra, step), (stream.len(), None));
        }
    }

    #[test]
    fn refuses_what_may_not_pass_and_forwards_nothing_of_it() {
        let (tid, sid) = IDS;
        let (other_t, other_s) = (TransferId([2; 16]), StreamId([2; 16]));
        let good = frame_of(&Message::Chunk {
            stream_id: sid,
            record: vec![3; 300],
        });
        let bad: Vec<(Dir, Vec<u8>)> = vec![
            (
                Dir::Forward,
                frame_of(&Message::Chunk {
                    stream_id: other_s,
                    record: vec![3; 300],
                }),
            ),
            // Another transfer's root, another stream's manifest: a broker
            // bug or a sender that mixes streams.
            (
                Dir::Forward,
                frame_of(&Message::Root {
                    transfer_id: other_t,
                    record: vec![1; 96],
                }),
            ),
            (
                Dir::Forward,
                frame_of(&Message::Manifest {
                    stream_id: other_s,
                    record: vec![1; 96],
                }),
            ),
            // The stream id where a transfer id belongs (they differ).
            (
                Dir::Forward,
                frame_of(&Message::Root {
                    transfer_id: TransferId(sid.0),
                    record: vec![1; 96],
                }),
            ),
            (
                Dir::Back,
                frame_of(&Message::Chunk {
                    stream_id: sid,
                    record: vec![3; 300],
                }),
            ),
            (
                Dir::Back,
                frame_of(&Message::Receipt {
                    transfer_id: other_t,
                    tag: [0; 32],
                }),
            ),
            (
                Dir::Forward,
                frame_of(&Message::Receipt {
                    transfer_id: tid,
                    tag: [0; 32],
                }),
            ),
            (Dir::Forward, frame_of(&Message::List)),
            (Dir::Forward, frame_of(&Message::Ping { nonce: 1 })),
            // A chunk whose record length disagrees with the frame.
            (Dir::Forward, {
                let mut f = good.clone();
                f[LEN_PREFIX + 17] ^= 1;
                f
            }),
            (Dir::Forward, vec![0, 0, 0, 0]),
            (Dir::Forward, u32::MAX.to_be_bytes().to_vec()),
        ];
        for (i, (dir, frame)) in bad.into_iter().enumerate() {
            let stream = [good.clone(), frame.clone()].concat();
            let ahead = if matches!(dir, Dir::Forward) {
                good.len()
            } else {
                0
            };
            let stream = if matches!(dir, Dir::Forward) {
                stream
            } else {
                frame
            };
            for step in [1, 64, 1 << 20] {
                let (passed, why) = check(dir, &stream, step);
                assert_eq!(passed, ahead, "case {i} {dir:?} step {step}");
                assert!(
                    why.is_some_and(|w| w != "end"),
                    "case {i} {dir:?} step {step}"
                );
            }
        }
    }
}

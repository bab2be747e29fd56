//! The head of a stream: the root sealed for this receiver, which gives the
//! stream keys, and the manifest, which says where the data starts (0, or
//! exactly the offset this receiver offered to resume from) and what it is.

use super::{Live, RecvError, RecvStream, State};
use crate::crypto::keys::{SessionKey, StreamRoot};
use crate::crypto::seal;
use crate::schedule::derive_stream_keys;
use crate::wire::record::{
    KEY_CT_LEN, MAX_MANIFEST, MalformedRecord, manifest_ad, manifest_hash, parse_root,
    parse_sealed, root_ad,
};

impl RecvStream {
    /// Opens the stream root sealed for this receiver.
    pub fn open_root(&mut self, bytes: &[u8]) -> Result<(), RecvError> {
        self.guarded(|s| {
            if s.state != State::AwaitRoot {
                return Err(RecvError::AfterEnd);
            }
            let sealed = parse_root(bytes)?;
            let ad = root_ad(&s.pair.transfer_id, &s.pair.stream_id);
            let plain = zeroize::Zeroizing::new(
                seal::open(
                    &s.pair.root,
                    &ad,
                    &sealed.iv,
                    &sealed.ciphertext,
                    &sealed.tag,
                    KEY_CT_LEN,
                )
                .map_err(|_| RecvError::Auth)?,
            );
            let root: [u8; 32] = plain.as_slice().try_into().map_err(|_| RecvError::Auth)?;
            let root = StreamRoot::from_bytes(root);
            let keys = derive_stream_keys(&root, &s.pair.stream_id);
            let session = SessionKey::from_bytes(*keys.epoch0.expose());
            let epoch_key = session.epoch_key(&s.pair.stream_id, 0);
            s.live = Some(Live {
                keys,
                session,
                epoch_key,
            });
            s.state = State::AwaitManifest;
            Ok(())
        })
    }

    /// Opens the manifest: `u64 resume_from ‖ body`. `resume_from` must be 0
    /// or exactly the offset this receiver offered to resume from (and then
    /// the body must be the manifest it holds).
    pub fn open_manifest(&mut self, bytes: &[u8]) -> Result<(u64, Vec<u8>), RecvError> {
        self.guarded(|s| {
            let live = match (s.state, &s.live) {
                (State::AwaitManifest, Some(live)) => live,
                (State::AwaitRoot, _) => return Err(RecvError::Early("manifest")),
                _ => return Err(RecvError::AfterEnd),
            };
            let sealed = parse_sealed(bytes, MAX_MANIFEST + 8 + 16, "manifest")?;
            let plain = seal::open(
                &live.keys.manifest,
                &manifest_ad(&s.pair.stream_id),
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
                MAX_MANIFEST + 8 + 16,
            )
            .map_err(|_| RecvError::Auth)?;
            let (head, body) = plain
                .split_first_chunk::<8>()
                .ok_or(MalformedRecord("manifest"))?;
            if body.len() > MAX_MANIFEST {
                return Err(MalformedRecord("manifest").into());
            }
            let resume_from = u64::from_be_bytes(*head);
            let hash = manifest_hash(body);
            // A resumed stream's hash (if the receiver takes one) runs on
            // from the prefix's, as it was read back.
            match &s.expect.resume {
                _ if resume_from == 0 => {}
                Some(r) if r.offset == resume_from && r.manifest_hash == hash => {
                    if let Some(h) = &mut s.hasher {
                        *h = r.hasher.clone();
                    }
                }
                _ => {
                    return Err(RecvError::BadResume {
                        offered_by_sender: resume_from,
                    });
                }
            }
            if resume_from > s.expect.declared {
                return Err(RecvError::Length {
                    declared: s.expect.declared,
                });
            }
            s.start = resume_from;
            s.total = resume_from;
            s.manifest_hash = hash;
            s.state = State::Streaming;
            Ok((resume_from, body.to_vec()))
        })
    }
}

//! Refusing replayed offers: every transfer id seen inside the time window.
//!
//! An offer outside the window is refused as stale by
//! [`keyferry_common::handshake::verify_offer`], so remembering ids for the
//! window is enough. The memory is bounded: when full of live entries it refuses new
//! offers rather than forget one (fail closed).

use std::collections::HashMap;

use keyferry_common::ids::TransferId;
use thiserror::Error;

/// An offer whose transfer id was seen inside the window (or that cannot be
/// remembered because the memory is full of live ids).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("replayed offer: this transfer id was already seen")]
pub struct Replayed;

/// Most transfer ids remembered at once.
pub const MAX_REMEMBERED: usize = 100_000;

/// The transfer ids seen recently, each with the time after which it may be forgotten.
#[derive(Debug)]
pub struct ReplayGuard {
    window_secs: u64,
    seen: HashMap<TransferId, u64>,
}

impl ReplayGuard {
    /// A guard for offers whose time must lie within `window_secs` of now.
    pub fn new(window_secs: u64) -> Self {
        Self {
            window_secs,
            seen: HashMap::new(),
        }
    }

    /// Records `id` (from an offer dated `offer_time`); refuses it if already seen.
    pub fn check_and_insert(
        &mut self,
        id: TransferId,
        offer_time: u64,
        now_unix: u64,
    ) -> Result<(), Replayed> {
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen.retain(|_, &mut until| until >= now_unix);
        }
        if self.seen.contains_key(&id) || self.seen.len() >= MAX_REMEMBERED {
            return Err(Replayed);
        }
        // Past offer_time + window the offer is stale anyway; keep it until
        // then, measured on the later of both clocks.
        let until = offer_time.max(now_unix).saturating_add(self.window_secs);
        self.seen.insert(id, until);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_use_of_an_id_is_refused() {
        let mut g = ReplayGuard::new(300);
        let id = TransferId([1; 16]);
        g.check_and_insert(id, 1000, 1000).unwrap();
        assert_eq!(g.check_and_insert(id, 1000, 1200), Err(Replayed));
        g.check_and_insert(TransferId([2; 16]), 1000, 1000).unwrap();
    }

    #[test]
    fn a_verified_offer_seen_twice_is_a_replay() {
        use keyferry_common::handshake::{Kind, OfferParams, Terms, make_offer, verify_offer};
        use keyferry_common::identity::Identity;
        use keyferry_common::ids::StreamId;
        use keyferry_common::name::AgentName;
        const NOW: u64 = 1_800_000_000;
        const WINDOW: u64 = 300;
        let fixture = |name: &str| {
            let path = format!(
                "{}/../common/tests/fixtures/{name}.pem",
                env!("CARGO_MANIFEST_DIR")
            );
            Identity::from_pkcs8_pem(&std::fs::read_to_string(path).unwrap())
                .unwrap()
                .unwrap()
        };
        let name = |s: &str| AgentName::new(s).unwrap();
        let (alice, bob) = (fixture("alice"), fixture("bob"));
        let (_, offer) = make_offer(OfferParams {
            identity: &alice,
            sender: name("alice"),
            receiver: name("bob"),
            receiver_key: bob.public(),
            stream_id: StreamId::random(),
            terms: Terms {
                kind: Kind::Files,
                size: 3000,
                size_known: true,
                resumes: None,
                receivers: 1,
            },
            now_unix: NOW,
        })
        .unwrap();
        let mut guard = ReplayGuard::new(WINDOW);
        let v = verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW,
        )
        .unwrap();
        guard
            .check_and_insert(v.fields().transfer_id, v.fields().time, NOW)
            .unwrap();
        assert_eq!(
            guard.check_and_insert(v.fields().transfer_id, v.fields().time, NOW + 5),
            Err(Replayed)
        );
    }
}

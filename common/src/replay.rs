//! Refusing replayed offers: every transfer id seen inside the time window.
//!
//! An offer outside the window is refused as stale by
//! [`crate::handshake::verify_offer`], so remembering ids for the window is
//! enough. The memory is bounded: when full of live entries it refuses new
//! offers rather than forget one (fail closed).

use std::collections::HashMap;

use crate::handshake::HandshakeError;
use crate::ids::TransferId;

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
    ) -> Result<(), HandshakeError> {
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen.retain(|_, &mut until| until >= now_unix);
        }
        if self.seen.contains_key(&id) || self.seen.len() >= MAX_REMEMBERED {
            return Err(HandshakeError::Replay);
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
        assert_eq!(
            g.check_and_insert(id, 1000, 1200),
            Err(HandshakeError::Replay)
        );
        g.check_and_insert(TransferId([2; 16]), 1000, 1000).unwrap();
    }
}

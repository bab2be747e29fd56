//! Budgets for RSA private-key operations (PROTOCOL.md §9): in total, per
//! sender key, and stricter for keys first pinned in the last 24 hours.
//!
//! The `rsa` crate's private-key operations leak timing (RUSTSEC-2023-0071). An
//! attacker who can make a receiver decrypt many chosen ciphertexts could learn
//! about its key; signed offers make each attempt cost a registered identity, and
//! these budgets bound how many attempts any one identity, new identities, and
//! everyone together get. New identities are cheap to make, so together they
//! may use only a share of the total: a crowd of fresh keys cannot lock out
//! senders that have been pinned for longer than a day.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use keyferry_common::identity::Fingerprint;

/// Window the budgets count over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Decryptions per window for everyone together.
pub const TOTAL_PER_WINDOW: usize = 120;
/// Of [`TOTAL_PER_WINDOW`], how many keys pinned in the last 24 h (first
/// contacts included) may use together; the rest is kept for older keys.
pub const NEW_KEYS_PER_WINDOW: usize = 60;
/// Decryptions per window for one sender key pinned more than 24 h ago.
pub const PER_KEY_PER_WINDOW: usize = 30;
/// Decryptions per window for one sender key pinned in the last 24 h.
pub const NEW_KEY_PER_WINDOW: usize = 6;
/// How long a key counts as new.
pub const NEW_KEY_AGE_SECS: u64 = 24 * 3600;

/// Sliding-window counters of RSA decryptions.
#[derive(Debug, Default)]
pub struct RsaBudget {
    total: VecDeque<Instant>,
    new_keys: VecDeque<Instant>,
    per_key: HashMap<Fingerprint, VecDeque<Instant>>,
}

fn prune(q: &mut VecDeque<Instant>, now: Instant) {
    while q
        .front()
        .is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW)
    {
        q.pop_front();
    }
}

impl RsaBudget {
    /// A fresh budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one decryption for `key` (first pinned `key_age_secs` ago) if the
    /// budgets allow it; otherwise says how long until they will (the oldest
    /// decryption that fills a budget leaves the window then).
    pub fn try_take(
        &mut self,
        key: Fingerprint,
        key_age_secs: u64,
        now: Instant,
    ) -> Result<(), Duration> {
        prune(&mut self.total, now);
        prune(&mut self.new_keys, now);
        self.per_key.retain(|_, q| {
            prune(q, now);
            !q.is_empty()
        });
        let new = key_age_secs < NEW_KEY_AGE_SECS;
        let limit = if new {
            NEW_KEY_PER_WINDOW
        } else {
            PER_KEY_PER_WINDOW
        };
        // Each budget that is full, with when its oldest entry leaves it.
        let full = |q: &VecDeque<Instant>, most: usize| {
            (q.len() >= most).then(|| {
                q.front()
                    .map_or(Duration::ZERO, |&t| WINDOW.saturating_sub(now - t))
            })
        };
        let empty = VecDeque::new();
        let own = self.per_key.get(&key).unwrap_or(&empty);
        let wait = [
            full(&self.total, TOTAL_PER_WINDOW),
            full(own, limit),
            if new {
                full(&self.new_keys, NEW_KEYS_PER_WINDOW)
            } else {
                None
            },
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        self.total.push_back(now);
        if new {
            self.new_keys.push_back(now);
        }
        self.per_key.entry(key).or_default().push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_get_less_and_the_window_slides() {
        let mut b = RsaBudget::new();
        let t = Instant::now();
        let new = Fingerprint([1; 32]);
        for _ in 0..NEW_KEY_PER_WINDOW {
            assert!(b.try_take(new, 10, t).is_ok());
        }
        assert_eq!(b.try_take(new, 10, t), Err(WINDOW));
        let old = Fingerprint([2; 32]);
        for _ in 0..PER_KEY_PER_WINDOW {
            assert!(b.try_take(old, NEW_KEY_AGE_SECS, t).is_ok());
        }
        assert!(b.try_take(old, NEW_KEY_AGE_SECS, t).is_err());
        assert!(b.try_take(new, 10, t + WINDOW).is_ok());
    }

    #[test]
    fn a_refusal_says_when_the_oldest_decryption_leaves_the_window() {
        let mut b = RsaBudget::new();
        let t = Instant::now();
        let new = Fingerprint([3; 32]);
        for i in 0..NEW_KEY_PER_WINDOW as u64 {
            assert!(b.try_take(new, 10, t + Duration::from_secs(i)).is_ok());
        }
        // The first went at t: at t + 20 s it leaves the window 40 s later.
        let later = t + Duration::from_secs(20);
        assert_eq!(b.try_take(new, 10, later), Err(Duration::from_secs(40)));
        // And then there is room for exactly one.
        let then = t + WINDOW;
        assert!(b.try_take(new, 10, then).is_ok());
        assert_eq!(b.try_take(new, 10, then), Err(Duration::from_secs(1)));
    }

    #[test]
    fn many_fresh_identities_cannot_lock_out_a_long_pinned_sender() {
        let mut b = RsaBudget::new();
        let t = Instant::now();
        // Twenty identities first seen minutes ago spend what they can.
        let mut granted = 0;
        for i in 0..20u8 {
            for _ in 0..NEW_KEY_PER_WINDOW {
                granted += usize::from(b.try_take(Fingerprint([i; 32]), 60, t).is_ok());
            }
        }
        assert_eq!(granted, NEW_KEYS_PER_WINDOW);
        // A sender pinned for two days still gets its whole per-key budget.
        let old = Fingerprint([0xee; 32]);
        for _ in 0..PER_KEY_PER_WINDOW {
            assert!(b.try_take(old, 2 * NEW_KEY_AGE_SECS, t).is_ok());
        }
        assert!(b.try_take(old, 2 * NEW_KEY_AGE_SECS, t).is_err());
    }

    #[test]
    fn the_total_caps_many_identities() {
        let mut b = RsaBudget::new();
        let t = Instant::now();
        let mut granted = 0;
        for i in 0..=255u8 {
            if b.try_take(Fingerprint([i; 32]), NEW_KEY_AGE_SECS, t)
                .is_ok()
            {
                granted += 1;
            }
        }
        assert_eq!(granted, TOTAL_PER_WINDOW);
    }
}

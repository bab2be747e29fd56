//! How long a relayed transfer has been quiet: the time since a byte last
//! moved in either of its directions. A relay waits for a direction's next
//! bytes only as long as the whole transfer may stay quiet (the broker's
//! `--idle-timeout`): a receiver says nothing while a long stream comes in
//! (its receipt follows the trailer), and it is not silent while it does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The clock of one transfer's relay, shared by its directions.
#[derive(Debug)]
pub struct Quiet {
    start: Instant,
    /// Milliseconds from `start` to the last byte moved.
    last: AtomicU64,
}

impl Default for Quiet {
    fn default() -> Self {
        Self::new()
    }
}

impl Quiet {
    /// A transfer whose relay begins now (which counts as a byte moved).
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// A byte moved just now, in either direction.
    pub fn moved(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since a byte last moved.
    pub fn elapsed(&self) -> Duration {
        let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(last)
    }

    /// `fut`'s output, or `None` once the transfer has been quiet for
    /// `idle` without it completing. `fut` is polled throughout and dropped
    /// only then, so a read that is not cancel-safe may wait here.
    pub async fn within<F: Future>(&self, idle: Duration, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            let left = idle.saturating_sub(self.elapsed());
            match tokio::time::timeout(left, &mut fut).await {
                Ok(out) => return Some(out),
                Err(_) if self.elapsed() >= idle => return None,
                // The other direction moved meanwhile: wait on.
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_lasts_while_the_other_direction_moves_and_ends_when_nothing_does() {
        let quiet = Quiet::new();
        let idle = Duration::from_secs(10);
        // Nothing moves: the wait ends after `idle`.
        let began = Instant::now();
        assert!(
            quiet
                .within(idle, std::future::pending::<()>())
                .await
                .is_none()
        );
        assert_eq!(began.elapsed(), idle);
        // The other direction moves every 6 s for 30 s: the wait goes on
        // until 10 s after its last byte.
        let quiet = Quiet::new();
        let began = Instant::now();
        let other = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                quiet.moved();
            }
        };
        let (waited, ()) = tokio::join!(quiet.within(idle, std::future::pending::<()>()), other);
        assert!(waited.is_none());
        assert_eq!(began.elapsed(), Duration::from_secs(40));
        // What completes in time is returned.
        let quiet = Quiet::new();
        let soon = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            7
        };
        assert_eq!(quiet.within(idle, soon).await, Some(7));
    }
}

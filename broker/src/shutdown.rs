//! The shutdown signal every connection task selects on (as mini-redis has
//! it): the phase the broker is in, and the token whose last clone tells the
//! server that every task ended.

use tokio::sync::{mpsc, watch};

/// Where the broker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// No longer accepting: control connections end, running transfers go on.
    Draining,
    /// The grace period is over: every transfer still running is cut.
    Cut,
}

/// One task's view of the shutdown signal (as mini-redis has it).
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: watch::Receiver<Phase>,
}

impl Shutdown {
    /// Follows `phase`.
    pub fn new(phase: watch::Receiver<Phase>) -> Self {
        Self { phase }
    }

    async fn reached(&mut self, phase: Phase) {
        // An error means the server is gone: that is a shutdown too.
        let _ = self.phase.wait_for(|p| *p >= phase).await;
    }

    /// Resolves once the broker stopped serving (control sessions end).
    pub async fn draining(&mut self) {
        self.reached(Phase::Draining).await;
    }

    /// Resolves once running transfers must be cut.
    pub async fn cut(&mut self) {
        self.reached(Phase::Cut).await;
    }
}

/// Held by every connection task; the server knows all of them ended when the
/// last one is dropped.
#[derive(Debug, Clone)]
pub struct Alive(
    #[allow(dead_code, reason = "held only for its drop")] pub(crate) mpsc::Sender<()>,
);

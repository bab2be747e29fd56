//! A spawned task tied to its owner: aborted when the handle is dropped, so a
//! listener's accept loop ends (and frees its port) with whatever holds it.

/// Aborts its task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

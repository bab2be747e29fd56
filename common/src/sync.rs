//! The one lock helper both binaries use.

use std::sync::{Mutex, MutexGuard};

/// Locks `m` even if a thread panicked while holding it: every structure kept
/// under these locks stays consistent between statements, so its data is
/// still good.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

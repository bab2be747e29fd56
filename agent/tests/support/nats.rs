//! A NATS server (with JetStream) for the cluster tests, started on a free
//! loopback port with its own store directory, stopped by PID when dropped.
//!
//! Where the binary comes from, and what happens without one, is
//! [`super::nats_bin`] (shared with the broker's own cluster tests).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::nats_bin::server_bin;
use super::{Broker, Proc, TempDir, WAIT, broker_bin, last_word};

/// A running `nats-server -js`.
pub struct Nats {
    pub proc: Proc,
    pub port: u16,
    pub store: TempDir,
    bin: PathBuf,
}

impl Nats {
    /// Starts a server on a free port; `None` when the tests skip.
    pub fn start() -> Option<Self> {
        let bin = server_bin()?;
        Some(Self::start_on(bin, TempDir::new("nats"), None))
    }

    fn start_on(bin: PathBuf, store: TempDir, port: Option<u16>) -> Self {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut cmd = Command::new(&bin);
            cmd.args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(port.map_or_else(|| "-1".to_owned(), |p| p.to_string()))
                .arg("-sd")
                .arg(store.path());
            let mut proc = Proc::spawn(cmd);
            let mut listening = None;
            while Instant::now() < deadline && listening.is_none() {
                listening = proc
                    .stderr
                    .drain()
                    .iter()
                    .find(|l| l.contains("Listening for client connections on"))
                    .cloned();
                if listening.is_none() && proc.child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(line) = listening {
                let port = last_word(&line)
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                return Self {
                    proc,
                    port,
                    store,
                    bin,
                };
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, by PID) and starts it again on the same
    /// port and store: what was on disk survives.
    pub fn restart(self) -> Self {
        let Self {
            mut proc,
            port,
            store,
            bin,
        } = self;
        proc.kill();
        Self::start_on(bin, store, Some(port))
    }
}

impl Nats {
    /// Starts a server again on `port` and `store` after its process
    /// `proc` was killed (a test that holds the parts meanwhile).
    pub fn restart_parts(proc: Proc, port: u16, store: TempDir) -> Self {
        drop(proc);
        Self::start_on(server_bin().unwrap(), store, Some(port))
    }
}

impl Broker {
    /// A broker on a free port joined to the cluster at `nats`.
    pub fn in_cluster(nats: &Nats, id: &str) -> Self {
        Self::start_with(
            TempDir::new("cluster-broker"),
            &["--cluster", &nats.url(), "--broker-id", id],
        )
    }
}

/// Runs `broker --cluster URL --list-brokers`; its output.
pub fn list_brokers(nats: &Nats) -> String {
    let out = Command::new(broker_bin())
        .args(["--cluster", &nats.url(), "--list-brokers"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

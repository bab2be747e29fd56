//! Test support, as mini-redis' `tests/server.rs` has it: a [`Broker`] run
//! in-process on `127.0.0.1:0` with its own data dir, its log lines captured,
//! and agents driven through the agent library (real TLS, real TCP on
//! loopback, real files) with the RSA fixtures of `common/tests/fixtures/`.
//! Every wait has a deadline.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use keyferry_agent::AgentError;
use keyferry_agent::client::{AgentConn, Ctx, connect};
use keyferry_agent::home::Home as AgentHome;
use keyferry_agent::receive::{RecvOptions, receive};
use keyferry_agent::send::{Payload, Report, SendOptions, send};
use keyferry_broker::{AccessPolicy, Broker, Limits};
use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, Role};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(60);

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "keyferry-broker-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A task of the test may still be writing here (an agent topping up
        // its prekeys): a removal that raced it is tried again.
        for _ in 0..5 {
            if std::fs::remove_dir_all(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The broker's log lines, captured (every test runs in its own process
/// under nextest, so one global subscriber per process is enough).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn global() -> Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let _ = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_target(false)
                .try_init();
            logs
        })
        .clone()
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub async fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.text().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {limit:?}; logs:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A broker served in-process by [`Broker::run`] on `127.0.0.1:0`.
pub struct TestBroker {
    pub addr: String,
    pub fingerprint: Fingerprint,
    pub logs: Logs,
    pub data: TempDir,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<()>>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(Limits::default(), AccessPolicy::Open).await
    }

    pub async fn start_with(limits: Limits, policy: AccessPolicy) -> Self {
        Self::start_in(TempDir::new("data"), limits, policy).await
    }

    pub async fn start_in(data: TempDir, limits: Limits, policy: AccessPolicy) -> Self {
        let logs = Logs::global();
        let broker = Broker::open(data.path().to_owned(), limits, policy).unwrap();
        let fingerprint = broker.fingerprint();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(broker.run(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            fingerprint,
            logs,
            data,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Signals shutdown and waits (bounded) until `run` returned.
    pub async fn stop(mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(limit, served)
                .await
                .expect("Broker::run returned after the shutdown signal")
                .unwrap();
        }
        start.elapsed()
    }

    /// A plain TCP connection to the broker (blocking, for raw bytes).
    pub fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Reads until the peer closes the connection; returns how long that took.
pub fn wait_closed(mut s: TcpStream) -> Duration {
    use std::io::Read as _;
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

/// [`wait_closed`] off the reactor.
pub async fn closed(s: TcpStream) -> Duration {
    tokio::task::spawn_blocking(move || wait_closed(s))
        .await
        .unwrap()
}

/// An agent: a home holding a fixture identity (alice, bob, carol, dave,
/// mallory), its name and the broker it talks to.
pub struct Agent {
    pub home: TempDir,
    pub ctx: Ctx,
}

pub fn fixture_path(key: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../common/tests/fixtures/{key}.pem"))
}

impl Agent {
    pub fn new(broker: &TestBroker, name: &str, key: &str) -> Self {
        let home = TempDir::new(name);
        let target = home.join("identity.pem");
        std::fs::copy(fixture_path(key), &target).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let h = AgentHome::open(home.path().to_owned()).unwrap();
        let ctx = Ctx {
            broker: broker.addr.clone(),
            broker_fingerprint: None,
            identity: Arc::new(h.identity().unwrap()),
            home: h,
            name: AgentName::new(name).unwrap(),
            seen: Default::default(),
        };
        Self { home, ctx }
    }

    /// An authenticated connection for `role`, made by the agent's client code.
    pub async fn connect(&self, role: Role) -> AgentConn {
        let mut conn = connect(&self.ctx, role).await.unwrap();
        // A standalone broker tells a receiver its prekey count right after
        // `Welcome` (PROTOCOL.md §2.8).
        if role == Role::Receiver {
            match conn.reader.read_timeout(WAIT).await.unwrap() {
                Some(Message::PrekeyCount { .. }) => {}
                other => panic!("no prekey count after Welcome: {other:?}"),
            }
        }
        conn
    }

    /// `agent --list`'s question: who is online.
    pub async fn list(
        &self,
    ) -> Result<Vec<keyferry_common::wire::message::OnlineAgent>, AgentError> {
        let mut conn = connect(&self.ctx, Role::Sender).await?;
        conn.writer.write(&Message::List).await.unwrap();
        match conn.reader.read_timeout(WAIT).await.unwrap() {
            Some(Message::Online { agents }) => Ok(agents),
            other => panic!("no list: {other:?}"),
        }
    }

    /// Starts a receiver into `out`; returns once the broker has it online.
    pub async fn receiver(
        &self,
        broker: &TestBroker,
        out: &Path,
        once: bool,
    ) -> JoinHandle<Result<(), AgentError>> {
        let ctx = self.ctx.clone();
        let opts = RecvOptions {
            once,
            preserve: false,
            // These tests are about the broker: every stream through it.
            direct: keyferry_agent::direct::DirectOpt::Never,
            ..RecvOptions::new(
                out.to_owned(),
                keyferry_agent::receive::consent::Policy::Anyone,
            )
        };
        let online_before = broker.logs.text().matches(&self.online_line()).count();
        let task = tokio::spawn(receive(ctx, opts));
        let deadline = Instant::now() + WAIT;
        while broker.logs.text().matches(&self.online_line()).count() == online_before {
            assert!(Instant::now() < deadline, "the receiver never came online");
            assert!(
                !task.is_finished(),
                "the receiver stopped before it was online"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task
    }

    fn online_line(&self) -> String {
        format!("receiver online agent={}", self.ctx.name)
    }

    /// Sends `file` to `to`.
    pub async fn send_file(&self, to: &str, file: &Path) -> Result<Report, AgentError> {
        let mut sent = send(
            &self.ctx,
            SendOptions {
                // These tests are about the broker: every stream through it.
                direct: keyferry_agent::direct::DirectOpt::Never,
                ..SendOptions::new(
                    vec![AgentName::new(to).unwrap()],
                    Payload::Files(vec![file.to_owned()]),
                )
            },
        )
        .await?;
        match (sent.reports.pop(), sent.failed.pop()) {
            (Some(report), None) => Ok(report),
            (_, Some((_, e))) => Err(e),
            (None, None) => panic!("a send without an outcome"),
        }
    }
}

/// Waits for the next message on `conn`, which must be an `Error` with `code`;
/// returns its detail.
pub async fn expect_error(conn: &mut AgentConn, code: ErrorCode) -> String {
    match conn.reader.read_timeout(WAIT).await {
        Ok(Some(Message::Error { code: c, detail })) if c == code => detail,
        other => panic!("expected Error {code:?}, got {other:?}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A normal transfer from alice to bob through `broker`, checked byte for byte.
pub async fn normal_transfer(broker: &TestBroker, tag: u64) {
    let (alice, bob) = (
        Agent::new(broker, "alice", "alice"),
        Agent::new(broker, "bob", "bob"),
    );
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let receiver = bob.receiver(broker, out.path(), true).await;
    let data = pseudo_random(1 << 20, tag);
    std::fs::write(src.join("ok.bin"), &data).unwrap();
    let report = alice.send_file("bob", &src.join("ok.bin")).await;
    assert!(report.is_ok(), "normal transfer failed: {report:?}");
    let received = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    assert!(received.is_ok(), "{received:?}");
    assert_eq!(std::fs::read(out.join("ok.bin")).unwrap(), data);
}

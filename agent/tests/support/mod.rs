//! Test support: start the real `broker` and `agent` binaries on 127.0.0.1 with
//! temporary homes and data dirs, watch their output, and stop them.
//!
//! Identities are the RSA fixtures in `common/tests/fixtures/` (copied into each
//! home with mode 0600) so no test waits for key generation. Every wait has a
//! deadline and every child is killed when its handle drops.

#![allow(dead_code, clippy::unwrap_used)]

pub mod evil;
pub mod fake;
pub mod hand;
pub mod nats;
pub mod nats_bin;
pub mod netns;
pub mod pty;
pub mod scrape;
pub mod stored;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(60);

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("keyferry-e2e-{tag}-{}-{n}", std::process::id()));
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
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agent"))
}

/// The broker binary beside the agent binary; built if this test run did not build it.
pub fn broker_bin() -> PathBuf {
    let agent = agent_bin();
    let broker = agent.with_file_name("broker");
    if !broker.exists() {
        let profile = agent
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|p| p.to_str())
            .unwrap_or("debug")
            .to_owned();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "keyferry-broker", "--bin", "broker"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building the broker binary failed");
    }
    broker
}

/// Lines a child prints, collected by a thread.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    fn spawn(r: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {limit:?}; saw {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Everything printed so far (without waiting).
    pub fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

/// A running child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_io(cmd, Stdio::null(), None)
    }

    /// Spawns `cmd` with `stdin`, and stdout into `stdout` if given (its
    /// lines are then not watched), else piped and watched.
    pub fn spawn_io(mut cmd: Command, stdin: Stdio, stdout: Option<Stdio>) -> Self {
        let watched = stdout.is_none();
        cmd.stdin(stdin)
            .stdout(stdout.unwrap_or_else(Stdio::piped))
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("binary starts");
        let stdout = match child.stdout.take() {
            Some(out) if watched => Lines::spawn(out),
            _ => Lines::spawn(std::io::empty()),
        };
        let stderr = Lines::spawn(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Sends `sig` to the process (`STOP` freezes it, `CONT` thaws it,
    /// `INT` and `TERM` ask it to stop).
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the broker `broker` has logged (on stderr) a relay it started
/// since the last look: a transfer whose bytes went through it.
pub fn relayed(broker: &mut Proc) -> bool {
    std::thread::sleep(Duration::from_millis(200));
    broker
        .stderr
        .drain()
        .iter()
        .any(|l| l.contains("transfer started"))
}

/// The last word of a line the broker printed (its address, its fingerprint).
pub fn last_word(line: &str) -> String {
    line.rsplit(' ').next().unwrap().to_owned()
}

/// A broker on 127.0.0.1 with its own data dir.
pub struct Broker {
    pub proc: Proc,
    pub addr: String,
    pub fingerprint: String,
    pub data: TempDir,
}

impl Broker {
    pub fn start() -> Self {
        Self::start_in(TempDir::new("broker"))
    }

    pub fn start_in(data: TempDir) -> Self {
        Self::start_with(data, &[])
    }

    /// A broker with extra command-line options (limits, policy).
    pub fn start_with(data: TempDir, extra: &[&str]) -> Self {
        let mut cmd = Command::new(broker_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(extra);
        let mut proc = Proc::spawn(cmd);
        let addr = last_word(&proc.stdout.wait_for("listening on", WAIT));
        let fingerprint = last_word(&proc.stdout.wait_for("fingerprint", WAIT));
        Self {
            proc,
            addr,
            fingerprint,
            data,
        }
    }
}

impl Broker {
    /// A broker on the data dir `data` listening on `listen` (e.g. the
    /// address of an earlier broker, to come back where agents look for it).
    /// Retries the bind for a while: the old port may not be free at once.
    pub fn start_at(data: TempDir, listen: &str) -> Self {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut cmd = Command::new(broker_bin());
            cmd.args(["--listen", listen, "--data-dir"])
                .arg(data.path());
            let mut proc = Proc::spawn(cmd);
            let mut started = None;
            while Instant::now() < deadline {
                if let Some(l) = proc
                    .stdout
                    .drain()
                    .iter()
                    .find(|l| l.contains("listening on"))
                {
                    started = Some(l.clone());
                    break;
                }
                if proc.child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(line) = started {
                let addr = last_word(&line);
                let fingerprint = last_word(&proc.stdout.wait_for("fingerprint", WAIT));
                return Self {
                    proc,
                    addr,
                    fingerprint,
                    data,
                };
            }
            assert!(
                Instant::now() < deadline,
                "no broker could listen on {listen} within {WAIT:?}; stderr {:#?}",
                proc.stderr.drain()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Broker {
    /// Stops this broker and starts a new one on the same data dir (a new port).
    pub fn restart(self) -> Self {
        let Self { mut proc, data, .. } = self;
        proc.kill();
        Self::start_in(data)
    }
}

/// An agent's home with a fixture identity.
pub struct Home {
    pub dir: TempDir,
    pub name: String,
}

impl Home {
    /// A home for `name` holding the fixture key `key` (alice, bob, carol, dave, mallory).
    pub fn new(name: &str, key: &str) -> Self {
        let dir = TempDir::new(name);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../common/tests/fixtures/{key}.pem"));
        let target = dir.join("identity.pem");
        std::fs::copy(&fixture, &target).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self {
            dir,
            name: name.to_owned(),
        }
    }

    /// The agent command for this home at `broker` (`--broker`, `--name`, `--home`).
    pub fn command(&self, broker: &Broker) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--broker", &broker.addr, "--name", &self.name, "--home"])
            .arg(self.dir.path());
        cmd
    }

    /// Starts a receiver and waits until it is ready (its "receiving as"
    /// line is on stdout, or with `--json` on stderr).
    pub fn receiver(&self, broker: &Broker, out: &Path, extra: &[&str]) -> Proc {
        let mut cmd = self.command(broker);
        cmd.args(["--role", "receiver", "--out-dir"])
            .arg(out)
            .args(extra);
        let mut p = Proc::spawn(cmd);
        let ready = if extra.contains(&"--json") {
            &mut p.stderr
        } else {
            &mut p.stdout
        };
        ready.wait_for("receiving as", WAIT);
        p
    }

    /// Starts the agent against the broker at `addr` (any server) with `args`.
    pub fn at(&self, addr: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--broker", addr, "--name", &self.name, "--home"])
            .arg(self.dir.path())
            .args(args);
        Proc::spawn(cmd)
    }

    /// Starts the agent with `args` without waiting.
    pub fn start(&self, broker: &Broker, args: &[&str]) -> Proc {
        let mut cmd = self.command(broker);
        cmd.args(args);
        Proc::spawn(cmd)
    }

    /// Runs the agent with `args` to completion (with a deadline).
    pub fn run(&self, broker: &Broker, args: &[&str]) -> Run {
        Run::finish(self.start(broker, args))
    }

    /// Starts a sender of standard input (`--file - --name-as NAME`) to `to`
    /// with `extra`; returns it and the pipe to its standard input, which the
    /// test writes (and drops to end the input).
    pub fn pipe_sender(
        &self,
        broker: &Broker,
        to: &str,
        name: &str,
        extra: &[&str],
    ) -> (Proc, std::process::ChildStdin) {
        let mut cmd = self.command(broker);
        cmd.args(["--role", "sender", "--to", to])
            .args(["--file", "-", "--name-as", name])
            .args(extra);
        let mut p = Proc::spawn_io(cmd, Stdio::piped(), None);
        let input = p.child.stdin.take().unwrap();
        (p, input)
    }

    /// Sends `file` to `to` with `--json`; returns the output.
    pub fn send_file(&self, broker: &Broker, to: &str, file: &Path, extra: &[&str]) -> Run {
        let file = file.to_str().unwrap();
        let mut args = vec!["--role", "sender", "--to", to, "--file", file, "--json"];
        args.extend_from_slice(extra);
        self.run(broker, &args)
    }
}

/// A finished agent run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Waits for `p` to exit and collects its output.
    pub fn finish(p: Proc) -> Self {
        Self::finish_within(p, WAIT * 2)
    }

    /// [`Run::finish`] with a deadline of `limit` for the exit.
    pub fn finish_within(mut p: Proc, limit: Duration) -> Self {
        let code = p.wait(limit);
        // The reader threads see EOF right after exit; give them a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut stdout = p.stdout.drain().join("\n");
        let mut stderr = p.stderr.drain().join("\n");
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let (o, e) = (p.stdout.drain().join("\n"), p.stderr.drain().join("\n"));
            if o == stdout && e == stderr {
                break;
            }
            (stdout, stderr) = (o, e);
        }
        Self {
            code,
            stdout,
            stderr,
        }
    }
}

/// Waits until process `pid` holds an open file in `dir` that has received
/// more than `bytes`. A receiver's file has no name while it arrives
/// (O_TMPFILE), so it is found among the process's open descriptors.
pub fn wait_for_data(pid: u32, dir: &Path, bytes: u64) {
    let deadline = Instant::now() + WAIT;
    let dir = dir.canonicalize().unwrap();
    while Instant::now() < deadline {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
        {
            let Ok(e) = e else { continue };
            let in_dir = std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&dir));
            // Regular files only: the out dir's own descriptor is open too.
            let grown = std::fs::metadata(e.path()).is_ok_and(|m| m.is_file() && m.len() > bytes);
            if in_dir && grown {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the transfer never started writing into {}", dir.display());
}

/// Deterministic pseudo-random bytes (xorshift), so files do not compress or repeat.
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

/// The one JSON line a `--json` sender prints.
pub fn json(out: &Run) -> serde_json::Value {
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line; {out:#?}"));
    serde_json::from_str(line).unwrap()
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The names in `dir` other than keyferry's hidden temporaries
/// (`.keyferry-*`), sorted.
pub fn finals(dir: &Path) -> Vec<String> {
    names_in(dir)
        .into_iter()
        .filter(|n| !n.starts_with(".keyferry-"))
        .collect()
}

/// The SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// The size and SHA-256 (hex) of the file at `path`, read in 8 MiB pieces.
pub fn hash_file(path: &Path) -> (u64, String) {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut len = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    (len, hex::encode(h.finalize()))
}

/// Makes `bob` know `alice` for two days: a key pinned in the last day may
/// make a receiver decrypt only 6 offers a minute, which tests that send many
/// offers would otherwise meet.
pub fn known_for_two_days(alice: &Home, bob: &Home) {
    let alice_fp = keyferry_agent::home::load_identity(&alice.dir.join("identity.pem"))
        .unwrap()
        .fingerprint();
    keyferry_agent::trust::pins::PinStore::new(bob.dir.join("known_peers"))
        .check_or_pin(
            &alice.name,
            alice_fp,
            keyferry_agent::home::now_unix() - 2 * 86400,
        )
        .unwrap();
}

/// Waits, if need be, until the wall clock is in the first 45 seconds of a
/// minute: a cluster counts rates by the minute (`keyferry-rates`), and
/// counts that straddle a minute's end weigh less than the test expects.
pub fn early_in_a_minute() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_secs() % 60;
    if into >= 45 {
        std::thread::sleep(Duration::from_secs(61 - into));
    }
}

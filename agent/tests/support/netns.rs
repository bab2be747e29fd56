//! Network namespaces a test makes (as root) and removes when dropped, the
//! links between them, and running programs inside them. Where namespaces
//! cannot be made a test is skipped, saying why; with
//! `KEYFERRY_REQUIRE_NETNS` set (as CI sets it) it fails instead.

use std::process::Command;

use super::{Home, Proc, TempDir, WAIT, agent_bin, broker_bin, last_word, pseudo_random};

/// Namespaces `kf<pid><tag><i>`, removed when dropped.
pub struct Netns {
    /// Their names, in the order they were asked for.
    pub names: Vec<String>,
}

impl Netns {
    /// `count` namespaces with their loopback up.
    pub fn new(tag: &str, count: usize) -> Result<Self, String> {
        let id = format!("{}{tag}", std::process::id());
        let net = Self {
            names: (0..count).map(|i| format!("kf{id}n{i}")).collect(),
        };
        for ns in &net.names {
            net.ip(&["netns", "add", ns])?;
            net.ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// A veth pair `link` between namespaces `x` and `y` (an interface of
    /// that name in each), with the addresses `ax` and `ay` (CIDR), up.
    pub fn link(
        &self,
        (x, ax): (usize, &str),
        (y, ay): (usize, &str),
        link: &str,
    ) -> Result<(), String> {
        let (nx, ny) = (&self.names[x], &self.names[y]);
        self.ip(&[
            "link", "add", link, "netns", nx, "type", "veth", "peer", "name", link, "netns", ny,
        ])?;
        for (ns, addr) in [(nx, ax), (ny, ay)] {
            self.ip(&["-n", ns, "addr", "add", addr, "dev", link])?;
            self.ip(&["-n", ns, "link", "set", link, "up"])?;
        }
        Ok(())
    }

    /// `ip ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run(Command::new("ip").args(args))
    }

    /// `program ARGS` inside namespace `i`, to its end.
    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> Result<(), String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.names[i], program])
            .args(args))
    }

    /// `program` to be run inside namespace `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i]]).arg(program);
        cmd
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = self.ip(&["netns", "del", ns]);
        }
    }
}

/// `made`, or `None` after printing why the test is skipped (a failure
/// instead with `KEYFERRY_REQUIRE_NETNS` set).
pub fn or_skip<T>(made: Result<T, String>) -> Option<T> {
    match made {
        Ok(n) => Some(n),
        Err(why) if std::env::var_os("KEYFERRY_REQUIRE_NETNS").is_some() => {
            panic!("network namespaces are required here (KEYFERRY_REQUIRE_NETNS) but: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: network namespaces are not available here ({why})");
            None
        }
    }
}

/// One transfer's world in namespaces: a broker in one of them, alice and
/// bob (each started in a namespace of the test's choosing), a file of
/// pseudo-random bytes to send, bob's out dir.
pub struct World {
    /// The namespaces.
    pub net: Netns,
    /// The broker.
    pub broker: Proc,
    port: String,
    homes: (Home, Home),
    file: std::path::PathBuf,
    /// The file's bytes.
    pub data: Vec<u8>,
    /// Bob's out dir.
    pub out: TempDir,
    _dirs: (TempDir, TempDir),
}

impl World {
    /// The broker started in namespace `broker_ns`, listening on all its
    /// addresses, and a file of `len` bytes.
    pub fn new(net: Netns, broker_ns: usize, len: usize) -> Self {
        let bdata = TempDir::new("broker");
        let mut cmd = net.command(broker_ns, &broker_bin());
        cmd.args(["--listen", "0.0.0.0:0", "--allow-any-agent", "--data-dir"])
            .arg(bdata.path());
        let mut broker = Proc::spawn(cmd);
        let addr = last_word(&broker.stdout.wait_for("listening on", WAIT));
        let port = addr.rsplit(':').next().unwrap().to_owned();
        let src = TempDir::new("src");
        let data = pseudo_random(len, len as u64);
        let file = src.join("data.bin");
        std::fs::write(&file, &data).unwrap();
        Self {
            net,
            broker,
            port,
            homes: (Home::new("alice", "alice"), Home::new("bob", "bob")),
            file,
            data,
            out: TempDir::new("out"),
            _dirs: (bdata, src),
        }
    }

    fn agent(&self, ns: usize, home: &Home, host: &str, args: &[&str]) -> Proc {
        let mut cmd = self.net.command(ns, &agent_bin());
        cmd.args(["--broker", &format!("{host}:{}", self.port)])
            .args(["--name", &home.name, "--home"])
            .arg(home.dir.path())
            .args(args);
        Proc::spawn(cmd)
    }

    /// Bob's receiver in namespace `ns`, reaching the broker at `host`,
    /// ready, with `--yes` and `extra`.
    pub fn receiver(&self, ns: usize, host: &str, extra: &[&str]) -> Proc {
        let out = self.out.path().to_str().unwrap();
        let mut args = vec!["--role", "receiver", "--out-dir", out, "--yes"];
        args.extend_from_slice(extra);
        let mut p = self.agent(ns, &self.homes.1, host, &args);
        p.stdout.wait_for("receiving as", WAIT);
        p
    }

    /// Alice sending the file to bob from namespace `ns`, reaching the
    /// broker at `host`, with `--json` and `extra`.
    pub fn sender(&self, ns: usize, host: &str, extra: &[&str]) -> Proc {
        let file = self.file.to_str().unwrap();
        let mut args = vec!["--role", "sender", "--to", "bob", "--file", file, "--json"];
        args.extend_from_slice(extra);
        self.agent(ns, &self.homes.0, host, &args)
    }

    /// Bob's `--once` receiver ended well, with the file whole.
    pub fn arrived(&self, receiver: &mut Proc) {
        assert_eq!(receiver.wait(WAIT), Some(0));
        assert_eq!(std::fs::read(self.out.join("data.bin")).unwrap(), self.data);
    }
}

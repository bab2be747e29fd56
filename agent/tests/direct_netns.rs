//! The direct path between network namespaces this test makes (as root) and
//! removes: a sender and a receiver on one LAN, the broker on another
//! network that each reaches over a link of its own. Skipped, saying why,
//! where namespaces cannot be made.
//!
//! ```text
//!   sender (A) 10.201.1.1 ── lan ── 10.201.1.2 receiver (B)
//!      10.201.2.1                      10.201.3.1
//!          └──────── broker (C) ────────┘
//!            10.201.2.2      10.201.3.2
//! ```

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::process::Command;
use std::time::Duration;

use support::{
    Home, Proc, Run, TempDir, WAIT, agent_bin, broker_bin, last_word, pseudo_random, wait_for_data,
};

/// Three namespaces and their links, removed when dropped.
struct Net {
    names: [String; 3],
}

impl Net {
    /// Makes the namespaces, or says why it cannot.
    fn make(tag: &str) -> Result<Self, String> {
        let id = format!("{}{tag}", std::process::id());
        let names = ["a", "b", "c"].map(|n| format!("kf{id}{n}"));
        let net = Self { names };
        let [a, b, c] = net.names.clone();
        net.ip(&["netns", "add", &a])?;
        net.ip(&["netns", "add", &b])?;
        net.ip(&["netns", "add", &c])?;
        for (x, ax, y, ay, link) in [
            (&a, "10.201.1.1/24", &b, "10.201.1.2/24", "lan"),
            (&a, "10.201.2.1/24", &c, "10.201.2.2/24", "wana"),
            (&b, "10.201.3.1/24", &c, "10.201.3.2/24", "wanb"),
        ] {
            net.ip(&[
                "link", "add", link, "netns", x, "type", "veth", "peer", "name", link, "netns", y,
            ])?;
            for (ns, addr) in [(x, ax), (y, ay)] {
                net.ip(&["-n", ns, "addr", "add", addr, "dev", link])?;
                net.ip(&["-n", ns, "link", "set", link, "up"])?;
            }
        }
        for ns in &net.names {
            net.ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `program` run inside namespace `i` (0 sender, 1 receiver, 2 broker).
    fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i]]).arg(program);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = self.ip(&["netns", "del", ns]);
        }
    }
}

/// The namespaces, or `None` after printing why the test is skipped; with
/// `KEYFERRY_REQUIRE_NETNS` set (as CI sets it) a test that cannot make
/// them fails instead.
fn net_or_skip(tag: &str) -> Option<Net> {
    match Net::make(tag) {
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

/// The broker in namespace C, and its port.
fn broker(net: &Net, data: &TempDir) -> (Proc, String) {
    let mut cmd = net.command(2, &broker_bin());
    cmd.args(["--listen", "0.0.0.0:0", "--allow-any-agent", "--data-dir"])
        .arg(data.path());
    let mut p = Proc::spawn(cmd);
    let addr = last_word(&p.stdout.wait_for("listening on", WAIT));
    let port = addr.rsplit(':').next().unwrap().to_owned();
    (p, port)
}

fn agent(net: &Net, i: usize, home: &Home, broker: &str, args: &[&str]) -> Proc {
    let mut cmd = net.command(i, &agent_bin());
    cmd.args(["--broker", broker, "--name", &home.name, "--home"])
        .arg(home.dir.path())
        .args(args);
    Proc::spawn(cmd)
}

/// One transfer's world: the broker in C, alice in A, bob in B, a file of
/// `len` pseudo-random bytes to send.
struct World {
    net: Net,
    broker: Proc,
    port: String,
    homes: (Home, Home),
    file: std::path::PathBuf,
    data: Vec<u8>,
    out: TempDir,
    _dirs: (TempDir, TempDir),
}

impl World {
    fn new(net: Net, len: usize) -> Self {
        let bdata = TempDir::new("broker");
        let (broker, port) = broker(&net, &bdata);
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

    /// Bob's receiver in B, ready, with `extra` options.
    fn receiver(&self, extra: &[&str]) -> Proc {
        let out = self.out.path().to_str().unwrap();
        let mut args = vec!["--role", "receiver", "--out-dir", out, "--yes"];
        args.extend_from_slice(extra);
        let broker = format!("10.201.3.2:{}", self.port);
        let mut p = agent(&self.net, 1, &self.homes.1, &broker, &args);
        p.stdout.wait_for("receiving as", WAIT);
        p
    }

    /// Alice sending the file from A with `--json`.
    fn sender(&self) -> Proc {
        let file = self.file.to_str().unwrap();
        let args = ["--role", "sender", "--to", "bob", "--file", file, "--json"];
        let broker = format!("10.201.2.2:{}", self.port);
        agent(&self.net, 0, &self.homes.0, &broker, &args)
    }
}

#[test]
fn two_agents_on_one_lan_go_direct_and_the_far_broker_relays_nothing() {
    let Some(net) = net_or_skip("l") else { return };
    let mut w = World::new(net, 5 << 20);
    let mut receiver = w.receiver(&["--once"]);
    let sent = Run::finish(w.sender());
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = support::json(&sent);
    assert_eq!(report["via"], "direct", "{report}");
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_eq!(std::fs::read(w.out.join("data.bin")).unwrap(), w.data);
    assert!(
        !support::relayed(&mut w.broker),
        "the broker relayed a LAN transfer"
    );
}

#[test]
fn a_direct_path_cut_mid_transfer_finishes_over_the_relay() {
    let Some(net) = net_or_skip("c") else { return };
    // The LAN at 200 Mbit/s, so that the cut comes mid-transfer.
    let tbf = [
        "-n",
        &net.names[0],
        "qdisc",
        "add",
        "dev",
        "lan",
        "root",
        "tbf",
    ];
    let rate = ["rate", "200mbit", "burst", "64kb", "latency", "50ms"];
    if let Err(why) = Command::new("tc")
        .args(tbf.iter().chain(rate.iter()))
        .status()
        .map_err(|e| e.to_string())
        .and_then(|s| s.success().then_some(()).ok_or(s.to_string()))
    {
        assert!(
            std::env::var_os("KEYFERRY_REQUIRE_NETNS").is_none(),
            "tc is required here (KEYFERRY_REQUIRE_NETNS) but: {why}"
        );
        eprintln!("SKIPPED: no rate limit for the LAN here (tc: {why})");
        return;
    }
    let mut w = World::new(net, 48 << 20);
    let mut receiver = w.receiver(&["--progress-timeout", "5s"]);
    let sender = w.sender();
    // The LAN goes away once the receiver holds 8 MiB of the direct stream.
    wait_for_data(receiver.child.id(), w.out.path(), 8 << 20);
    w.net
        .ip(&["-n", &w.net.names[0], "link", "set", "lan", "down"])
        .unwrap();

    let sent = Run::finish_within(sender, Duration::from_secs(90));
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = support::json(&sent);
    assert_eq!(report["via"], "relay", "{report}");
    assert!(report["attempts"].as_u64().unwrap() >= 2, "{report}");
    assert!(
        report["resumed_from"].as_u64().unwrap() >= 8 << 20,
        "{report}"
    );
    let line = receiver.stdout.wait_for("received", WAIT);
    assert!(
        line.contains("resumed at byte") && line.contains(", relayed)"),
        "{line}"
    );
    assert_eq!(std::fs::read(w.out.join("data.bin")).unwrap(), w.data);
    assert!(
        support::relayed(&mut w.broker),
        "the rest went through the broker"
    );
}

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

use support::netns::{self, Netns, World};
use support::{Run, WAIT, wait_for_data};

/// Where the agents reach the broker: alice (in A) and bob (in B).
const ALICE_TO_C: &str = "10.201.2.2";
const BOB_TO_C: &str = "10.201.3.2";

/// Three namespaces and their links: 0 the sender (A), 1 the receiver
/// (B), 2 the broker (C).
fn make(tag: &str) -> Result<Netns, String> {
    let net = Netns::new(tag, 3)?;
    net.link((0, "10.201.1.1/24"), (1, "10.201.1.2/24"), "lan")?;
    net.link((0, "10.201.2.1/24"), (2, "10.201.2.2/24"), "wana")?;
    net.link((1, "10.201.3.1/24"), (2, "10.201.3.2/24"), "wanb")?;
    Ok(net)
}

fn net_or_skip(tag: &str) -> Option<Netns> {
    netns::or_skip(make(tag))
}

#[test]
fn two_agents_on_one_lan_go_direct_and_the_far_broker_relays_nothing() {
    let Some(net) = net_or_skip("l") else { return };
    let mut w = World::new(net, 2, 5 << 20);
    let mut receiver = w.receiver(1, BOB_TO_C, &["--once"]);
    // Over two connections, as a long path would take.
    let sent = Run::finish(w.sender(0, ALICE_TO_C, &["--streams", "2"]));
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = support::json(&sent);
    assert_eq!(report["via"], "direct", "{report}");
    assert_eq!(report["connections"], 2, "{report}");
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
    let mut w = World::new(net, 2, 48 << 20);
    let mut receiver = w.receiver(1, BOB_TO_C, &["--progress-timeout", "5s"]);
    // Over three connections: all of them go with the LAN.
    let sender = w.sender(0, ALICE_TO_C, &["--streams", "3"]);
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

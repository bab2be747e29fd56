//! The direct path when both agents sit behind address-translating routers
//! (PROTOCOL.md §2.7): namespaces this test makes (as root) and removes,
//! each agent on a LAN of its own behind a router that masquerades it and
//! drops what nobody inside asked for, the broker between the routers.
//! Skipped, saying why, where namespaces cannot be made.
//!
//! ```text
//!   A 10.210.1.2 ─ RA ─ 10.220.1.1  C (broker)  10.220.2.1 ─ RB ─ 10.210.2.2 B
//!   (sender)  MASQUERADE                             MASQUERADE  (receiver)
//! ```

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use support::netns::{self, Netns, World};
use support::{Proc, Run};

/// Namespace indexes.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const RA: usize = 3;
const RB: usize = 4;

/// The five namespaces; `masquerade` is what each router's translation
/// rule adds (`--random-fully` makes it change ports: a "symmetric" one),
/// or `None` for a router that only routes (its LAN is reachable from C).
fn make(tag: &str, masquerade: [Option<&[&str]>; 2]) -> Result<Netns, String> {
    let net = Netns::new(tag, 5)?;
    net.link((A, "10.210.1.2/24"), (RA, "10.210.1.1/24"), "lana")?;
    net.link((RA, "10.220.1.2/24"), (C, "10.220.1.1/24"), "wana")?;
    net.link((C, "10.220.2.1/24"), (RB, "10.220.2.2/24"), "wanb")?;
    net.link((RB, "10.210.2.1/24"), (B, "10.210.2.2/24"), "lanb")?;
    for (ns, via) in [
        (A, "10.210.1.1"),
        (B, "10.210.2.1"),
        (RA, "10.220.1.1"),
        (RB, "10.220.2.1"),
    ] {
        net.ip(&["-n", &net.names[ns], "route", "add", "default", "via", via])?;
    }
    let sides = [
        (RA, "wana", "10.210.1.0/24", "10.220.1.2", masquerade[0]),
        (RB, "wanb", "10.210.2.0/24", "10.220.2.2", masquerade[1]),
    ];
    for (router, wan, lan, via, extra) in sides {
        net.exec(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let Some(extra) = extra else {
            net.ip(&["-n", &net.names[C], "route", "add", lan, "via", via])?;
            continue;
        };
        let mut nat = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            wan,
            "-j",
            "MASQUERADE",
        ];
        nat.extend_from_slice(extra);
        net.exec(router, "iptables", &nat)?;
        for chain in ["INPUT", "FORWARD"] {
            let new = ["-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"];
            let mut drop = vec!["-A", chain, "-i", wan];
            drop.extend_from_slice(&new);
            net.exec(router, "iptables", &drop)?;
        }
    }
    net.exec(C, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    Ok(net)
}

/// Where the agents reach the broker: alice (through RA) and bob (through RB).
const ALICE_TO_C: &str = "10.220.1.1";
const BOB_TO_C: &str = "10.220.2.1";

/// Alice sends bob's `--once` receiver the file across the routers; her
/// run and the receiver.
fn send(w: &World) -> (Run, Proc) {
    let receiver = w.receiver(B, BOB_TO_C, &["--once"]);
    (Run::finish(w.sender(A, ALICE_TO_C, &[])), receiver)
}

/// With routers made of `masquerade` (see [`make`]), the file arrives whole
/// over a direct connection and the broker relays nothing.
fn goes_direct(tag: &str, masquerade: [Option<&[&str]>; 2]) {
    let Some(net) = netns::or_skip(make(tag, masquerade)) else {
        return;
    };
    let mut w = World::new(net, C, 6 << 20);
    let (sent, mut receiver) = send(&w);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = support::json(&sent);
    assert_eq!(report["via"], "direct", "{report}\n{}", sent.stderr);
    w.arrived(&mut receiver);
    assert!(
        !support::relayed(&mut w.broker),
        "the broker relayed a transfer that went direct"
    );
}

#[test]
fn behind_two_masquerading_routers_the_agents_meet_by_a_simultaneous_open() {
    goes_direct("m", [Some(&[]), Some(&[])]);
}

#[test]
fn a_receiver_behind_a_masquerading_router_is_reached_from_an_open_network() {
    // Alice's router only routes: the broker sees her own address, and she
    // still names a port, since bob can be reached only if he connects too.
    goes_direct("o", [None, Some(&[])]);
}

#[test]
fn a_router_that_changes_ports_leaves_the_relay_and_says_why() {
    // RA picks a new port for every connection: what alice names is not
    // where her packets come from, so nothing meets.
    let random: &[&str] = &["--random-fully"];
    let Some(net) = netns::or_skip(make("s", [Some(random), Some(&[])])) else {
        return;
    };
    let mut w = World::new(net, C, 6 << 20);
    let (sent, mut receiver) = send(&w);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = support::json(&sent);
    assert_eq!(report["via"], "relay", "{report}");
    assert!(
        sent.stderr.contains("no direct path to bob") && sent.stderr.contains("10.220.2.2"),
        "{}",
        sent.stderr
    );
    w.arrived(&mut receiver);
    assert!(support::relayed(&mut w.broker), "the relay carried it");
}

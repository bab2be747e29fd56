//! Operating a broker (`--metrics`, `--log-format json`): real broker and
//! agent binaries on loopback, the metrics scraped over HTTP and read with a
//! strict parser of the Prometheus text format, the log lines parsed as JSON.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::nats::Nats;
use support::scrape::{get, longest_hex, metrics_addr, parse, value};
use support::{Broker, Home, TempDir, WAIT};

#[test]
fn the_metrics_move_with_a_transfer_a_refusal_and_a_rate_limit_and_logs_are_json() {
    let mut broker = Broker::start_with(
        TempDir::new("ops-broker"),
        &[
            "--metrics",
            "127.0.0.1:0",
            "--offers-per-minute",
            "1",
            "--log-format",
            "json",
        ],
    );
    let at = metrics_addr(&mut broker);
    let before = parse(&get(&at, "/metrics").1);
    assert_eq!(
        value(
            &before,
            "keyferry_broker_offers_total",
            &[("outcome", "accepted")]
        ),
        0.0
    );

    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let out = TempDir::new("ops-out");
    let mut receiver = bob.receiver(&broker, out.path(), &["--accept-from", "alice"]);
    let src = TempDir::new("ops-src");
    let file = src.join("quarterly-report-7f3a.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();

    let sent = alice.send_file(&broker, "bob", &file, &["--direct", "never"]);
    assert_eq!(sent.code, Some(0), "{sent:?}");
    let refused = carol.send_file(&broker, "bob", &file, &[]);
    assert_eq!(refused.code, Some(8), "{refused:?}");
    let limited = alice.send_file(&broker, "bob", &file, &["--direct", "never"]);
    assert_ne!(limited.code, Some(0), "{limited:?}");
    // Bytes that are no handshake at all.
    let mut junk = TcpStream::connect(&broker.addr).unwrap();
    junk.write_all(b"\x00\x00\x00\x05hello").unwrap();
    let _ = junk.read(&mut [0u8; 64]);

    let (status, text) = get(&at, "/metrics");
    assert_eq!(status, 200);
    let now = parse(&text);
    let offers = |o| value(&now, "keyferry_broker_offers_total", &[("outcome", o)]);
    assert_eq!(offers("accepted"), 1.0);
    assert_eq!(offers("refused"), 1.0);
    assert_eq!(offers("rate_limited"), 1.0);
    let refusals = value(
        &now,
        "keyferry_broker_offer_refusals_total",
        &[("reason", "not_listed")],
    );
    assert_eq!(refusals, 1.0);
    let limit = value(
        &now,
        "keyferry_broker_limit_refusals_total",
        &[("limit", "offers_per_minute")],
    );
    assert_eq!(limit, 1.0);
    let finished = value(
        &now,
        "keyferry_broker_transfers_total",
        &[("outcome", "finished")],
    );
    assert_eq!(finished, 1.0);
    let bytes = value(
        &now,
        "keyferry_broker_relayed_bytes_total",
        &[("path", "local")],
    );
    assert!(
        (300_000.0..400_000.0).contains(&bytes),
        "relayed {bytes} bytes"
    );
    let junk_seen = value(
        &now,
        "keyferry_broker_handshake_failures_total",
        &[("reason", "protocol")],
    );
    assert!(junk_seen >= 1.0, "{junk_seen}");
    assert_eq!(value(&now, "keyferry_broker_receivers_online", &[]), 1.0);
    assert_eq!(
        value(
            &now,
            "keyferry_broker_relay_throughput_bytes_per_second_count",
            &[]
        ),
        1.0
    );
    assert!(value(&now, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&now, "process_open_fds", &[]) >= 3.0);
    // No label value names a file, an address, a key or a transfer.
    for (name, labels) in now.keys() {
        for (_, v) in labels {
            assert!(
                !v.contains("quarterly") && !v.contains("127.0.0.1"),
                "{name} {v:?}"
            );
            assert!(longest_hex(v) <= 16, "{name} {v:?}");
            assert!(
                !["alice", "bob", "carol"].contains(&v.as_str()),
                "{name} {v:?}"
            );
        }
    }
    assert_eq!(get(&at, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&at, "/other").0, 404);

    receiver.kill();
    broker.proc.kill();
    // Every stderr line is one JSON object with a level and a message.
    let lines = broker.proc.stderr.drain().to_vec();
    let mut offered = Vec::new();
    for line in &lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(
            event["level"].is_string() && event["message"].is_string(),
            "{line}"
        );
        if event["message"] == "transfer offered" {
            assert_eq!(event["to"], "bob", "{line}");
            offered.push(event["from"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(offered, ["alice", "carol"], "{lines:#?}");
}

#[test]
fn agent_names_are_labels_only_when_asked() {
    let mut broker = Broker::start_with(
        TempDir::new("ops-named"),
        &["--metrics", "127.0.0.1:0", "--metrics-agent-labels"],
    );
    let at = metrics_addr(&mut broker);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("ops-named-out");
    let _receiver = bob.receiver(&broker, out.path(), &["--yes"]);
    let run = alice.run(
        &broker,
        &["--role", "sender", "--to", "bob", "--message", "hi"],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let now = parse(&get(&at, "/metrics").1);
    let by_name = [("agent", "alice"), ("outcome", "accepted")];
    assert_eq!(
        value(&now, "keyferry_broker_agent_offers_total", &by_name),
        1.0
    );
}

/// Polls `/healthz` until it answers `status`; its body.
fn health_becomes(at: &str, status: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, body) = get(at, "/healthz");
        if s == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/healthz still {s} {body:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A broker of the cluster at `nats`, with metrics and `extra` options; and
/// its metrics address.
fn member_with_metrics(nats: &Nats, tag: &str, extra: &[&str]) -> (Broker, String) {
    let url = nats.url();
    let mut args = vec![
        "--cluster",
        &url,
        "--broker-id",
        "one",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut broker = Broker::start_with(TempDir::new(tag), &args);
    let at = metrics_addr(&mut broker);
    (broker, at)
}

#[test]
fn health_follows_the_cluster_connection() {
    let Some(nats) = Nats::start() else { return };
    let (_broker, at) = member_with_metrics(&nats, "ops-cluster", &[]);
    assert_eq!(health_becomes(&at, 200), "ok\n");
    let (mut proc, port, store) = (nats.proc, nats.port, nats.store);
    proc.kill();
    let why = health_becomes(&at, 503);
    assert!(why.contains("cluster unreachable"), "{why:?}");
    let scrape = parse(&get(&at, "/metrics").1);
    assert_eq!(
        value(&scrape, "keyferry_broker_cluster_connected", &[]),
        0.0
    );
    let nats = Nats::restart_parts(proc, port, store);
    assert_eq!(health_becomes(&at, 200), "ok\n");
    let scrape = parse(&get(&at, "/metrics").1);
    assert_eq!(
        value(&scrape, "keyferry_broker_cluster_connected", &[]),
        1.0
    );
    assert!(
        value(
            &scrape,
            "keyferry_broker_cluster_kv_operation_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    drop(nats);
}

#[test]
fn with_nats_away_the_offer_rate_is_counted_by_the_broker_alone() {
    let Some(nats) = Nats::start() else { return };
    let (broker, at) = member_with_metrics(&nats, "ops-fallback", &["--offers-per-minute", "2"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("ops-fallback-out");
    let _bob = bob.receiver(&broker, out.path(), &["--yes"]);
    let message = || {
        alice.run(
            &broker,
            &["--role", "sender", "--to", "bob", "--message", "hi"],
        )
    };
    let first = message();
    assert_eq!(first.code, Some(0), "{first:?}");
    // NATS goes away: offers still go through, and are still limited, by
    // this broker's own count.
    let mut proc = nats.proc;
    proc.kill();
    health_becomes(&at, 503);
    let second = message();
    assert_eq!(second.code, Some(0), "{second:?}");
    let third = message();
    assert_ne!(third.code, Some(0), "{third:?}");
    assert!(
        third.stderr.contains("more than 2 offers in a minute")
            && !third.stderr.contains("through the brokers of this cluster"),
        "{third:?}"
    );
}

#[test]
fn the_agents_stderr_lines_are_json_when_asked() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("ops-json-out");
    let mut receiver = bob.receiver(&broker, out.path(), &["--log-format", "json"]);
    let args = [
        "--role",
        "sender",
        "--to",
        "nobody",
        "--message",
        "hi",
        "--log-format",
        "json",
    ];
    let run = alice.run(&broker, &args);
    assert_eq!(run.code, Some(5), "{run:?}");
    let lines: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["exit_code"], 5, "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("nobody"),
        "{last}"
    );
    receiver.kill();
    let said = receiver.stderr.drain().to_vec();
    let warning = said
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["level"] == "WARN")
        .expect("the open receiver's warning");
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("--accept-from"),
        "{warning}"
    );
}

#[test]
fn one_offer_rate_holds_across_the_brokers_of_a_cluster() {
    let Some(nats) = Nats::start() else { return };
    let brokers = ["one", "two", "three"].map(|id| {
        let args = [
            "--cluster",
            &nats.url(),
            "--broker-id",
            id,
            "--offers-per-minute",
            "2",
        ];
        Broker::start_with(TempDir::new("ops-rate"), &args)
    });
    // A receiver on each broker; alice offers to each through its broker,
    // so that no broker sees more than one of her offers.
    let alice = Home::new("alice", "alice");
    let out = TempDir::new("ops-rate-out");
    let names = ["bob", "carol", "dave"];
    let _receivers: Vec<_> = names
        .iter()
        .zip(&brokers)
        .map(|(name, broker)| {
            let home = Home::new(name, name);
            let proc = home.receiver(broker, &out.join(name), &["--yes"]);
            (home, proc)
        })
        .collect();
    let message = |i: usize| {
        let args = ["--role", "sender", "--to", names[i], "--message", "hi"];
        alice.run(&brokers[i], &args)
    };
    // Two offers through two brokers, then a third through the third: each
    // broker alone has seen fewer than its limit, the cluster has not (all
    // three in one minute of the cluster's count).
    support::early_in_a_minute();
    for i in 0..2 {
        let run = message(i);
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    let third = message(2);
    assert_ne!(third.code, Some(0), "{third:?}");
    assert!(
        third
            .stderr
            .contains("more than 2 offers in a minute through the brokers of this cluster"),
        "{third:?}"
    );
}

#[test]
fn one_concurrency_limit_holds_across_the_brokers_of_a_cluster() {
    use std::io::Write as _;
    let Some(nats) = Nats::start() else { return };
    let [mut one, two] = ["one", "two"].map(|id| {
        let args = [
            "--cluster",
            &nats.url(),
            "--broker-id",
            id,
            "--max-transfers-per-agent",
            "1",
        ];
        Broker::start_with(TempDir::new("ops-concurrent"), &args)
    });
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let out = TempDir::new("ops-concurrent-out");
    let _bob = bob.receiver(&one, &out.join("bob"), &["--yes"]);
    let _carol = carol.receiver(&two, &out.join("carol"), &["--yes"]);
    // A transfer through broker one that stays open while the test goes on.
    let extra = ["--direct", "never", "--retry-for", "0"];
    let (mut piped, mut input) = alice.pipe_sender(&one, "bob", "live.bin", &extra);
    input.write_all(&[5u8; 1 << 20]).unwrap();
    one.proc.stderr.wait_for("transfer started", WAIT);
    // Broker two holds no transfer of alice's, the cluster does.
    let message = || {
        alice.run(
            &two,
            &["--role", "sender", "--to", "carol", "--message", "hi"],
        )
    };
    let refused = message();
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("more than 1 transfers at once through the brokers of this cluster"),
        "{refused:?}"
    );
    // Once it ended, there is room again at once: its key was removed, not
    // left to expire (60 s), and no heartbeat (10 s) was needed.
    drop(input);
    assert_eq!(piped.wait(WAIT), Some(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let run = message();
        if run.code == Some(0) {
            break;
        }
        assert!(run.stderr.contains("transfers at once"), "{run:?}");
        assert!(Instant::now() < deadline, "still refused: {run:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

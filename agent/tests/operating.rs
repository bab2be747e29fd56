//! Operating a broker (`--metrics`, `--log-format json`): real broker and
//! agent binaries on loopback, the metrics scraped over HTTP and read with a
//! strict parser of the Prometheus text format, the log lines parsed as JSON.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::nats::Nats;
use support::{Broker, Home, TempDir, WAIT};

/// A sample: metric name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// Fetches `path` from the metrics server at `addr`: status code and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "Content-Length");
    (status, body.to_owned())
}

/// A metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (no colon in labels).
fn name_ok(s: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut chars = s.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// Parses the Prometheus text format (0.0.4) strictly: every line is a
/// `# HELP`, a `# TYPE` (before its samples, once per family) or a sample
/// `name{label="value",…} number`; anything else fails the test.
fn parse(text: &str) -> BTreeMap<Series, f64> {
    let mut samples = BTreeMap::new();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(name_ok(name, true), "HELP of a bad name: {line:?}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(name_ok(name, true), "{line:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line:?}"
            );
            assert!(
                typed.insert(name.into(), kind.into()).is_none(),
                "twice: {line:?}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => (name, labels(rest.strip_suffix('}').expect(line), line)),
        };
        assert!(name_ok(name, true), "{line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            typed.contains_key(family),
            "a sample before its TYPE: {line:?}"
        );
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "repeated {line:?}"
        );
    }
    samples
}

/// `a="x",b="y"` with the format's escapes (`\\`, `\"`, `\n`).
fn labels(mut s: &str, line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"").expect(line);
        assert!(name_ok(key, false), "label name in {line:?}");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect(line) {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect(line).1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => panic!("bad escape \\{c} in {line:?}"),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    out.sort();
    out
}

fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    labels.sort();
    *samples
        .get(&(name.to_owned(), labels.clone()))
        .unwrap_or_else(|| panic!("no {name}{labels:?} in the scrape"))
}

/// The metrics address a broker printed.
fn metrics_addr(broker: &mut Broker) -> String {
    let line = broker.proc.stdout.wait_for("metrics at", WAIT);
    let url = line
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches(',');
    url.strip_prefix("http://")
        .unwrap()
        .strip_suffix("/metrics")
        .unwrap()
        .to_owned()
}

/// The longest run of hex digits in `s`.
fn longest_hex(s: &str) -> usize {
    s.split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0)
}

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

#[test]
fn health_follows_the_cluster_connection() {
    let Some(nats) = Nats::start() else { return };
    let mut broker = Broker::start_with(
        TempDir::new("ops-cluster"),
        &[
            "--cluster",
            &nats.url(),
            "--broker-id",
            "one",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let at = metrics_addr(&mut broker);
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
    // broker alone has seen fewer than its limit, the cluster has not.
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

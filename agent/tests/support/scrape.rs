//! Reading a broker's `/metrics`: an HTTP GET over a plain socket, and a
//! strict parser of the Prometheus text format (0.0.4), so a test fails on
//! any line a scraper could not read.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;

use super::{Broker, WAIT};

/// A sample: metric name and its labels, sorted.
pub type Series = (String, Vec<(String, String)>);

/// Fetches `path` from the metrics server at `addr`: status code and body.
pub fn get(addr: &str, path: &str) -> (u16, String) {
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
pub fn name_ok(s: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut chars = s.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// Parses the Prometheus text format (0.0.4) strictly: every line is a
/// `# HELP`, a `# TYPE` (before its samples, once per family) or a sample
/// `name{label="value",…} number`; anything else fails the test.
pub fn parse(text: &str) -> BTreeMap<Series, f64> {
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
pub fn labels(mut s: &str, line: &str) -> Vec<(String, String)> {
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

pub fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
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
pub fn metrics_addr(broker: &mut Broker) -> String {
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
pub fn longest_hex(s: &str) -> usize {
    s.split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0)
}

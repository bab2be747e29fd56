//! How the agent's stderr lines are written (`--log-format`): as text for
//! people (the default), or one JSON object per line for a log collector,
//! with the fields the broker's JSON lines have — `timestamp` (RFC 3339,
//! UTC), `level` (`INFO` for notices, `WARN` for warnings, `ERROR` for the
//! error the agent exits with), `target` (`agent`), `message` — and any
//! fields of the event (an error's `exit_code`). The setting is
//! process-wide, set once from the command line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How stderr lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain lines, for people.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// How much a line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A notice (`--quiet` silences it).
    Info,
    /// A warning, a `NEW KEY` line.
    Warn,
    /// The error the agent exits with.
    Error,
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Writes stderr lines in `format` from now on.
pub fn set_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

/// Whether lines are JSON.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// `message` with `fields` as one JSON line (without the newline).
pub fn render(level: Level, message: &str, fields: &[(&str, serde_json::Value)]) -> String {
    let mut event = serde_json::Map::new();
    event.insert("timestamp".into(), rfc3339(SystemTime::now()).into());
    let level = match level {
        Level::Info => "INFO",
        Level::Warn => "WARN",
        Level::Error => "ERROR",
    };
    event.insert("level".into(), level.into());
    event.insert("target".into(), "agent".into());
    event.insert("message".into(), message.into());
    for (k, v) in fields {
        event.insert((*k).to_owned(), v.clone());
    }
    serde_json::Value::Object(event).to_string()
}

/// `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, s) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_millis()
    )
}

/// The date `days` after 1970-01-01 (proleptic Gregorian), after Howard
/// Hinnant's `civil_from_days`.
pub(crate) fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_millis(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(at(1_796_557_584_000), "2026-12-06T11:46:24.000Z");
        assert_eq!(at(4_102_444_799_000), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn a_line_is_one_json_object_with_its_fields() {
        let line = render(Level::Error, "no \"bob\"\n", &[("exit_code", 5.into())]);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["message"], "no \"bob\"\n");
        assert_eq!(v["exit_code"], 5);
        assert_eq!(v["target"], "agent");
    }
}

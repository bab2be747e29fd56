//! Sizes and durations as people type them on a command line (`4GiB`, `200ms`).

use std::time::Duration;

/// Parses `4GiB`, `500MiB`, `10MB`, `123` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 500MiB or 4GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The longest duration [`parse_duration`] takes: 30 days (longer ones
/// would only overflow the clocks they are added to).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);

/// Parses `200ms`, `5s`, `1m`; at least 1 ms, at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 200ms or 5s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        other => return Err(format!("unknown duration unit {other:?} (use ms, s or m)")),
    };
    if d < Duration::from_millis(1) {
        return Err("the duration must be at least 1ms".into());
    }
    if d > MAX_DURATION {
        return Err("the duration must be at most 30 days (43200m)".into());
    }
    Ok(d)
}

/// Parses a keepalive interval: a duration from 1 s to 1 h (shorter ones
/// would drop peers a slow network delays; longer ones notice nothing).
pub fn parse_keepalive(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) {
        return Err("a keepalive interval must be from 1s to 60m".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_both_ways() {
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("43200m").is_ok());
        assert!(parse_duration("43201m").is_err());
        assert!(parse_duration("999999999999m").is_err());
        assert!(parse_keepalive("999ms").is_err());
        assert_eq!(parse_keepalive("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_keepalive("60m"), Ok(Duration::from_secs(3600)));
        assert!(parse_keepalive("61m").is_err());
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("-1").is_err() && parse_size("1XB").is_err() && parse_size("").is_err());
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0ms").is_err() && parse_duration("5h").is_err());
    }
}

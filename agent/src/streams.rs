//! How many TCP connections a stream takes over a path (PROTOCOL.md §2.7
//! "Several connections", step 1; §2.5 for the relay): one connection carries
//! at most its send buffer per round trip, so a long path needs several to
//! fill its link. The same rule serves a direct stream and a sender's leg to
//! the relay.

use std::time::Duration;

use keyferry_common::handshake::direct::MAX_LANES;

/// What one connection carries per round trip at the kernel's default
/// buffers, about (measured: 4 MiB of send buffer kept 2 to 2.7 MiB in flight).
const PER_ROUND_TRIP: f64 = (2 << 20) as f64;
/// The rate the automatic choice provides for: 1 Gbit/s.
const AIM: f64 = 125e6;

/// How many connections a stream takes over a path of round trip `rtt`:
/// `asked` (`--streams`) if given, else enough for [`AIM`], at most
/// [`MAX_LANES`].
pub fn count(rtt: Duration, asked: Option<u8>) -> u8 {
    if let Some(n) = asked {
        return n.clamp(1, MAX_LANES);
    }
    let wanted = (AIM * rtt.as_secs_f64() / PER_ROUND_TRIP).ceil();
    if wanted >= f64::from(MAX_LANES) {
        MAX_LANES
    } else if wanted >= 1.0 {
        // In 1..MAX_LANES here, so the cast is exact.
        wanted as u8
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_trip_sets_the_count_and_streams_overrides_it() {
        let ms = Duration::from_millis;
        assert_eq!(count(ms(0), None), 1);
        assert_eq!(count(ms(1), None), 1);
        assert_eq!(count(ms(16), None), 1);
        assert_eq!(count(ms(40), None), 3);
        assert_eq!(count(ms(150), None), MAX_LANES);
        assert_eq!(count(Duration::from_secs(5), None), MAX_LANES);
        assert_eq!(count(ms(150), Some(2)), 2);
        assert_eq!(count(ms(0), Some(4)), 4);
        assert_eq!(count(ms(0), Some(0)), 1);
        assert_eq!(count(ms(0), Some(200)), MAX_LANES);
    }
}

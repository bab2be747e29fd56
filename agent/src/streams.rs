//! How many TCP connections a stream takes over a path (PROTOCOL.md §2.7
//! "Several connections", step 1; §2.5 for the relay): one connection carries
//! at most its send buffer per round trip, so a long path needs several to
//! fill its link. The same rule serves a direct stream and a sender's leg to
//! the relay.

use std::time::Duration;

use keyferry_common::handshake::direct::MAX_LANES;

/// The smallest stream worth a direct dial or several connections: below
/// it the round trips they cost are more than they save.
pub const WORTH_IT: u64 = 4 << 20;

/// What one connection carries per round trip at the kernel's default
/// buffers, about (measured: 4 MiB of send buffer kept 2 to 2.7 MiB in flight).
const PER_ROUND_TRIP: f64 = (2 << 20) as f64;
/// The rate the automatic choice provides for, in bytes a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aim(f64);

/// A direct stream's: 1 Gbit/s.
pub const DIRECT: Aim = Aim(125e6);

/// A sender's leg to the relay: 250 Mbit/s. The broker's link brings in
/// both the sender's data and the acknowledgements of its leg to the
/// receiver; connections beyond what the path needs build a queue there,
/// which holds those acknowledgements back and slows the receiver's leg
/// (measured on an emulated 200 Mbit/s, 150 ms path with the broker next to
/// the receiver: 64 % of the link over 8 connections, 73 % over 2, 72 % over
/// 3). A broker serves many transfers; one that needs more says `--streams`.
pub const RELAY: Aim = Aim(31.25e6);

/// Tells each further connection of `more` its place with `tell`, numbered
/// from 1 in the order told: one whose telling fails is left out and its
/// number goes to the next, so the numbers have no gaps; at most
/// [`MAX_LANES`] − 1 are told (the first connection is place 0). Returns
/// those told, in their order.
pub async fn number<T, L, F>(more: Vec<T>, mut tell: impl FnMut(u8, T) -> F) -> Vec<L>
where
    F: Future<Output = Option<L>>,
{
    let mut told = Vec::new();
    for conn in more {
        let Ok(place) = u8::try_from(told.len() + 1) else {
            break;
        };
        if place >= MAX_LANES {
            break;
        }
        if let Some(lane) = tell(place, conn).await {
            told.push(lane);
        }
    }
    told
}

/// How many connections a stream takes over a path of round trip `rtt`:
/// `asked` (`--streams`) if given, else enough for `aim`, at most
/// [`MAX_LANES`].
pub fn count(rtt: Duration, asked: Option<u8>, aim: Aim) -> u8 {
    if let Some(n) = asked {
        return n.clamp(1, MAX_LANES);
    }
    let wanted = (aim.0 * rtt.as_secs_f64() / PER_ROUND_TRIP).ceil();
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
        assert_eq!(count(ms(0), None, DIRECT), 1);
        assert_eq!(count(ms(1), None, DIRECT), 1);
        assert_eq!(count(ms(16), None, DIRECT), 1);
        assert_eq!(count(ms(40), None, DIRECT), 3);
        assert_eq!(count(ms(150), None, DIRECT), MAX_LANES);
        assert_eq!(count(Duration::from_secs(5), None, DIRECT), MAX_LANES);
        assert_eq!(count(ms(150), Some(2), DIRECT), 2);
        assert_eq!(count(ms(0), Some(4), DIRECT), 4);
        assert_eq!(count(ms(0), Some(0), DIRECT), 1);
        assert_eq!(count(ms(0), Some(200), DIRECT), MAX_LANES);
        // The relay aims lower: 1 to about 67 ms, 2 to 134, 3 to 201.
        assert_eq!(count(ms(40), None, RELAY), 1);
        assert_eq!(count(ms(75), None, RELAY), 2);
        assert_eq!(count(ms(150), None, RELAY), 3);
        assert_eq!(count(ms(600), None, RELAY), MAX_LANES);
        assert_eq!(count(ms(150), Some(8), RELAY), MAX_LANES);
    }
}

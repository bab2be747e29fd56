//! Which connection an accepted transfer's stream comes over (PROTOCOL.md
//! §2.7): the receiver redeems its ticket at the broker as always and, if
//! its accept named addresses, waits beside it for the sender's direct
//! connection; whichever carries the first frame is the stream's, and the
//! other is closed. With `--direct only` there is no relay to wait on.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use keyferry_common::handshake::direct::DirectMode;
use keyferry_common::ids::TransferId;

use crate::client::{Ctx, DataConn, Ticket, open_upload_lanes};
use crate::direct::Path;
use crate::direct::listen::Expected;
use crate::early::Early;
use crate::relay_lanes::{Lanes, Leg};

/// How long a receiver waits for either path once it has its ticket: the
/// broker's wait for the data connections (10 s) and a little more. After
/// that, a relay connection still open is the stream's, and its own
/// timeouts apply.
const WAIT: Duration = Duration::from_secs(15);
/// How long the direct wait goes on once the relay failed or ended before
/// the stream began (an honest broker keeps it open for 10 s; a sender that
/// went direct has proved itself within its dial and proof timeouts).
const GRACE: Duration = Duration::from_secs(5);

/// The stream's connection, which path it is, and over how many
/// connections from the relay (1 for a direct one); or why there is none.
pub(super) async fn open(
    ctx: &Ctx,
    ticket: (TransferId, Ticket),
    expected: Option<Expected>,
    mode: DirectMode,
    early: (Option<&Early>, Lanes),
) -> Result<(DataConn, Path, u8), String> {
    let over = AtomicU8::new(1);
    let (conn, path) = choose(ctx, ticket, expected, mode, (early, &over)).await?;
    let n = match path {
        Path::Relay => over.load(Ordering::Relaxed),
        Path::Direct => 1,
    };
    Ok((conn, path, n))
}

/// [`open`]'s choice; how many connections carry the relay's goes to `over`.
async fn choose(
    ctx: &Ctx,
    (tid, ticket): (TransferId, Ticket),
    expected: Option<Expected>,
    mode: DirectMode,
    ((early, lanes), over): ((Option<&Early>, Lanes), &AtomicU8),
) -> Result<(DataConn, Path), String> {
    // The connection opened beside the accept, if it is there; over as many
    // connections as `lanes` says.
    let open_data = |ctx, tid, ticket| {
        let early = early.and_then(Early::take);
        let tickets = [(tid, ticket)];
        async move {
            let (conn, n) = open_upload_lanes(ctx, &tickets, early, (lanes, Leg::Receiver)).await?;
            over.store(n, Ordering::Relaxed);
            Ok::<_, crate::error::AgentError>(conn)
        }
    };
    let Some(mut expected) = expected else {
        return open_data(ctx, tid, ticket)
            .await
            .map(|c| (c, Path::Relay))
            .map_err(|e| e.to_string());
    };
    let mut deadline = tokio::time::Instant::now() + WAIT;
    if mode == DirectMode::Only {
        return tokio::time::timeout_at(deadline, expected.connection())
            .await
            .map(|c| (c, Path::Direct))
            .map_err(|_| {
                format!(
                    "no direct path: the sender did not connect directly within {} s \
                     (--direct only)",
                    WAIT.as_secs()
                )
            });
    }
    // The relay's connection is opened beside the wait, not before it.
    let opening = open_data(ctx, tid, ticket);
    tokio::pin!(opening);
    let (mut relay, mut why) = (Relay::Opening, String::new());
    loop {
        tokio::select! {
            conn = expected.connection() => return Ok((conn, Path::Direct)),
            opened = &mut opening, if matches!(relay, Relay::Opening) => match opened {
                Ok(conn) => relay = Relay::Open(conn),
                Err(e) => {
                    relay = Relay::Gone;
                    why = e.to_string();
                    deadline = deadline.min(tokio::time::Instant::now() + GRACE);
                }
            },
            began = started(relay.open()), if matches!(relay, Relay::Open(_)) => {
                if began && let Relay::Open(conn) = relay {
                    return Ok((conn, Path::Relay));
                }
                // The relay ended first: the sender went direct, or is gone.
                relay = Relay::Gone;
                why = "the stream ended before the transfer was complete: the broker closed \
                       the data connection before the stream began, and no direct connection \
                       came"
                    .into();
                deadline = deadline.min(tokio::time::Instant::now() + GRACE);
            }
            () = tokio::time::sleep_until(deadline) => {
                return match relay {
                    Relay::Open(conn) => Ok((conn, Path::Relay)),
                    Relay::Opening => Err("the broker's data connection did not open in time".into()),
                    Relay::Gone => Err(why),
                };
            }
        }
    }
}

/// Where the relay's data connection stands.
enum Relay {
    /// Being opened (connect, redeem).
    Opening,
    /// Open, nothing read yet.
    Open(DataConn),
    /// Failed, or ended before the stream began.
    Gone,
}

impl Relay {
    fn open(&mut self) -> Option<&mut DataConn> {
        match self {
            Self::Open(conn) => Some(conn),
            _ => None,
        }
    }
}

/// Whether a frame starts on `conn` (`false`: it ended or failed first);
/// never returns for `None`. Nothing is consumed.
async fn started(conn: Option<&mut DataConn>) -> bool {
    match conn {
        Some(c) => matches!(c.reader.peek_len().await, Ok(Some(_))),
        None => std::future::pending().await,
    }
}

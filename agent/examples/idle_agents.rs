//! Holds many authenticated, idle receiver connections to a broker, for the
//! scale benchmark (`scripts/scale.sh`): `idle-0000`, `idle-0001`, … all with
//! the identity in HOME, each exactly as `agent --role receiver` connects.
//!
//!     idle_agents BROKER HOME COUNT [FIRST]
//!
//! (numbered from FIRST, default 0: several of them can hold different
//! names, e.g. on the brokers of a cluster).
//! Prints `connected N` once all are up, then holds them (answering the
//! broker's keepalive pings) until killed or until stdin closes; exits
//! non-zero if any connection fails.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

use keyferry_agent::client::{AgentConn, Ctx, connect};
use keyferry_agent::home::Home;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{Message, Role};

/// How many connections are opened at once (each costs one RSA signature).
const AT_ONCE: usize = 16;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (broker, home, count, first) = match args.as_slice() {
        [_, broker, home, count] => (broker, home, count, "0"),
        [_, broker, home, count, first] => (broker, home, count, first.as_str()),
        _ => return Err("usage: idle_agents BROKER HOME COUNT [FIRST]".into()),
    };
    let count: usize = count.parse()?;
    let first: usize = first.parse()?;
    let home = Home::open(PathBuf::from(home))?;
    let identity = Arc::new(home.identity()?);
    let mut held = Vec::with_capacity(count);
    let mut started = 0;
    while started < count {
        let batch: Vec<_> = (started..count.min(started + AT_ONCE))
            .map(|i| {
                let ctx = Ctx {
                    broker: broker.clone(),
                    broker_fingerprint: None,
                    home: home.clone(),
                    name: AgentName::new(&format!("idle-{:04}", first + i)).expect("a valid name"),
                    identity: Arc::clone(&identity),
                    seen: Default::default(),
                };
                tokio::spawn(async move { connect(&ctx, Role::Receiver).await })
            })
            .collect();
        started += batch.len();
        for task in batch {
            held.push(tokio::spawn(answer_pings(task.await??)));
        }
    }
    println!("connected {}", held.len());
    // Hold them until stdin closes (or the process is killed).
    tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
    })
    .await?;
    for task in held {
        task.abort();
    }
    Ok(())
}

/// Keeps one connection alive as a receiver does: answers the broker's
/// keepalive pings (and nothing else comes to an idle receiver).
async fn answer_pings(mut conn: AgentConn) {
    while let Ok(Some(msg)) = conn.reader.read().await {
        if let Message::Ping { nonce } = msg
            && conn.writer.write(&Message::Pong { nonce }).await.is_err()
        {
            return;
        }
    }
}

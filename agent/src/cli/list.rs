//! `agent --list`: who is online at the broker, as aligned columns or, with
//! `--json`, one JSON object per agent per line.

use std::time::Duration;

use keyferry_common::wire::message::{Message, OnlineAgent, Role};
use serde::Serialize;

use crate::client::{Ctx, broker_error, conn_error, connect};
use crate::error::AgentError;
use crate::output::say;

/// One agent of the list, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Entry<'a> {
    name: &'a str,
    /// Whether it has a receiver connection.
    receiver: bool,
    /// `free`, `busy`, or `null` without a receiver.
    state: Option<&'static str>,
    /// Sender connections it has open.
    senders: u32,
}

impl<'a> Entry<'a> {
    fn of(a: &'a OnlineAgent) -> Self {
        let state = match (a.receiving, a.incoming) {
            (false, _) => None,
            (true, 0) => Some("free"),
            (true, _) => Some("busy"),
        };
        Self {
            name: a.name.as_str(),
            receiver: a.receiving,
            state,
            senders: a.senders,
        }
    }
}

/// The list as lines of text: one header, one line per agent, columns as
/// wide as their widest cell.
fn table(agents: &[OnlineAgent]) -> Vec<String> {
    let rows: Vec<[String; 4]> = agents
        .iter()
        .map(|a| {
            let e = Entry::of(a);
            [
                e.name.to_owned(),
                if e.receiver { "yes" } else { "no" }.to_owned(),
                e.state.unwrap_or("-").to_owned(),
                e.senders.to_string(),
            ]
        })
        .collect();
    let header = ["name", "receiver", "state", "senders"].map(str::to_owned);
    let mut width = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|r| {
            format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = width[0],
                w1 = width[1],
                w2 = width[2]
            )
        })
        .collect()
}

/// Asks the broker who is online and prints it.
pub async fn list(ctx: &Ctx, json: bool) -> Result<(), AgentError> {
    let mut conn = connect(ctx, Role::Sender).await?;
    conn.writer
        .write(&Message::List)
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let answer = conn
        .reader
        .read_timeout(Duration::from_secs(30))
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let agents = match answer {
        Some(Message::Online { agents }) => agents,
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        _ => {
            return Err(AgentError::Protocol(
                "the broker did not answer the list request",
            ));
        }
    };
    if json {
        for a in &agents {
            let line = serde_json::to_string(&Entry::of(a))
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            say!("{line}");
        }
    } else {
        for line in table(&agents) {
            say!("{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn agent(name: &str, receiving: bool, incoming: u32, senders: u32) -> OnlineAgent {
        OnlineAgent {
            name: name.parse().unwrap(),
            receiving,
            incoming,
            senders,
        }
    }

    #[test]
    fn columns_line_up_whatever_the_name_lengths() {
        let lines = table(&[
            agent("carol", true, 0, 1),
            agent("a-rather-long-agent-name", false, 0, 12),
            agent("bob", true, 2, 0),
        ]);
        assert_eq!(
            lines,
            [
                "name                      receiver  state  senders",
                "carol                     yes       free   1",
                "a-rather-long-agent-name  no        -      12",
                "bob                       yes       busy   0",
            ]
        );
    }
}

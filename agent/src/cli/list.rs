//! `agent --list`: who is online at the broker, as aligned columns or, with
//! `--json`, one JSON object per agent per line. The same list feeds the
//! sender's picker ([`online`]).

use std::time::Duration;

use keyferry_common::wire::message::{Message, OnlineAgent, Role};
use serde::Serialize;

use keyferry_common::text::escape;

use crate::client::{AgentConn, Ctx, broker_error, conn_error, connect};
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
    /// In a cluster, the broker its receiver is connected to (escaped).
    broker: Option<String>,
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
            broker: (!a.broker.is_empty()).then(|| escape(&a.broker)),
        }
    }
}

/// The list as lines of text: one header, one line per agent, columns as
/// wide as their widest cell.
fn table(agents: &[OnlineAgent]) -> Vec<String> {
    // The broker column only in a cluster, where it says something.
    let cluster = agents.iter().any(|a| !a.broker.is_empty());
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let e = Entry::of(a);
            let mut row = vec![
                e.name.to_owned(),
                if e.receiver { "yes" } else { "no" }.to_owned(),
                e.state.unwrap_or("-").to_owned(),
                e.senders.to_string(),
            ];
            if cluster {
                row.push(e.broker.unwrap_or_else(|| "-".into()));
            }
            row
        })
        .collect();
    let mut header: Vec<String> = ["name", "receiver", "state", "senders"]
        .map(str::to_owned)
        .into();
    if cluster {
        header.push("broker".into());
    }
    let mut width = vec![0usize; header.len()];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|r| {
            let last = r.len() - 1;
            r.iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == last {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}  ", w = width[i])
                    }
                })
                .collect()
        })
        .collect()
}

/// Asks the broker on `conn` who is online.
pub async fn online(ctx: &Ctx, conn: &mut AgentConn) -> Result<Vec<OnlineAgent>, AgentError> {
    conn.writer
        .write(&Message::List)
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let answer = conn
        .reader
        .read_timeout(Duration::from_secs(30))
        .await
        .map_err(|e| conn_error(ctx, e))?;
    match answer {
        Some(Message::Online { agents }) => Ok(agents),
        Some(Message::Error { code, detail }) => Err(broker_error(code, detail)),
        _ => Err(AgentError::Protocol(
            "the broker did not answer the list request",
        )),
    }
}

/// Asks the broker who is online and prints it.
pub async fn list(ctx: &Ctx, json: bool) -> Result<(), AgentError> {
    let mut conn = connect(ctx, Role::Sender).await?;
    let agents = online(ctx, &mut conn).await?;
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
            broker: String::new(),
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
        // In a cluster, a broker column.
        let mut far = agent("dave", true, 0, 0);
        far.broker = "b2".into();
        let lines = table(&[agent("bob", false, 0, 1), far]);
        assert_eq!(
            lines,
            [
                "name  receiver  state  senders  broker",
                "bob   no        -      1        -",
                "dave  yes       free   0        b2",
            ]
        );
    }
}

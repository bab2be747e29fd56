//! The sender's picker: with no `--to` on a terminal, the receivers online
//! (name, free or busy, which broker in a cluster, pinned or a first contact
//! with its fingerprint), chosen with the arrow keys, space and enter, or
//! narrowed by typing. Busy receivers are shown greyed and cannot be chosen;
//! Esc or Ctrl-C cancels (exit 130, nothing sent).
//!
//! Drawn with `console` (which indicatif brings anyway): the prompt crates'
//! multi-selects cannot show an entry that is there but not selectable.

use std::time::Duration;

use console::{Key, Term, style};
use keyferry_common::identity::{Fingerprint, PublicKey};
use keyferry_common::name::AgentName;
use keyferry_common::text::escape;
use keyferry_common::wire::message::{Message, Role};

use super::list::online;
use crate::client::{Ctx, connect};
use crate::error::AgentError;
use crate::output;
use crate::send::MAX_RECEIVERS;
use crate::trust::pins::PinCheck;

/// Receivers whose key is looked up for the picker at most (the others
/// show "first contact" without a fingerprint).
const MAX_LOOKUPS: usize = 64;
/// Lines of receivers shown at once.
const PAGE: usize = 10;

/// One receiver as the picker shows it.
#[derive(Debug, Clone)]
struct Item {
    name: AgentName,
    free: bool,
    broker: String,
    /// Its key: the pinned one, or (first contact) the one the broker has.
    fp: Option<Fingerprint>,
    pinned: bool,
}

/// Lets the user choose receivers among those online at the broker.
pub async fn pick(ctx: &Ctx) -> Result<Vec<AgentName>, AgentError> {
    let mut conn = connect(ctx, Role::Sender).await?;
    let agents = online(ctx, &mut conn).await?;
    let pins = ctx.home.known_peers();
    let mut items = Vec::new();
    let mut lookups = 0;
    for a in agents.into_iter().filter(|a| a.receiving) {
        let pinned = pins.get(a.name.as_str())?.map(|p| p.fingerprint);
        let fp = match pinned {
            Some(fp) => Some(fp),
            None if lookups < MAX_LOOKUPS => {
                lookups += 1;
                broker_key(&mut conn, &a.name).await
            }
            None => None,
        };
        items.push(Item {
            free: a.incoming == 0,
            broker: a.broker,
            fp,
            pinned: pinned.is_some(),
            name: a.name,
        });
    }
    if items.is_empty() {
        return Err(AgentError::NobodyReceiving(ctx.broker.clone()));
    }
    drop(conn);
    let shown = items.clone();
    let names = tokio::task::spawn_blocking(move || choose(&items)).await??;
    // A first contact chosen by the key it showed is pinned to that key
    // now: the send then refuses any other the broker may give.
    for item in shown
        .iter()
        .filter(|i| !i.pinned && names.contains(&i.name))
    {
        if let Some(fp) = item.fp {
            match pins.check_or_pin(item.name.as_str(), fp, crate::home::now_unix())? {
                PinCheck::NewlyPinned(_) => output::err_line(&format!(
                    "NEW KEY for {} {fp} — first contact, verify out of band",
                    item.name
                )),
                PinCheck::Known(_) => {}
            }
        }
    }
    Ok(names)
}

/// The key the broker has for `name` (for its fingerprint), if it says.
async fn broker_key(conn: &mut crate::client::AgentConn, name: &AgentName) -> Option<Fingerprint> {
    conn.writer
        .write(&Message::Lookup { name: name.clone() })
        .await
        .ok()?;
    match conn.reader.read_timeout(Duration::from_secs(10)).await {
        Ok(Some(Message::PeerKey { name: n, spki })) if &n == name => {
            PublicKey::from_spki_der(&spki)
                .ok()
                .map(|k| k.fingerprint())
        }
        _ => None,
    }
}

/// Where the picker stands.
#[derive(Debug, Default)]
struct State {
    filter: String,
    /// Index into the shown items.
    cursor: usize,
    chosen: Vec<AgentName>,
    hint: String,
}

impl State {
    fn shown<'a>(&self, items: &'a [Item]) -> Vec<&'a Item> {
        items
            .iter()
            .filter(|i| i.name.as_str().contains(self.filter.as_str()))
            .collect()
    }

    /// Space on `item`: chooses or unchooses it, if it may be chosen.
    fn toggle(&mut self, item: &Item) {
        if let Some(at) = self.chosen.iter().position(|n| *n == item.name) {
            self.chosen.remove(at);
        } else if !item.free {
            self.hint = format!("{} is busy with other transfers", item.name);
        } else if self.chosen.len() >= MAX_RECEIVERS {
            self.hint = format!("at most {MAX_RECEIVERS} receivers");
        } else {
            self.chosen.push(item.name.clone());
        }
    }
}

/// What a key did.
enum Step {
    Go(Vec<AgentName>),
    Cancel,
    More,
}

fn key(state: &mut State, items: &[Item], k: Key) -> Step {
    let shown = state.shown(items);
    state.hint.clear();
    match k {
        Key::Escape | Key::CtrlC | Key::Char('\u{3}') => return Step::Cancel,
        Key::ArrowUp => state.cursor = state.cursor.saturating_sub(1),
        Key::ArrowDown if state.cursor + 1 < shown.len() => state.cursor += 1,
        Key::Char(' ') => {
            if let Some(item) = shown.get(state.cursor) {
                state.toggle(item);
            }
        }
        Key::Enter => {
            if !state.chosen.is_empty() {
                return Step::Go(std::mem::take(&mut state.chosen));
            }
            match shown.get(state.cursor) {
                Some(item) if item.free => return Step::Go(vec![item.name.clone()]),
                Some(item) => state.hint = format!("{} is busy with other transfers", item.name),
                None => state.hint = "no receiver matches".into(),
            }
        }
        Key::Backspace => {
            state.filter.pop();
            state.cursor = 0;
        }
        Key::Char(c) if c.is_ascii_alphanumeric() || "._-".contains(c) => {
            state.filter.push(c.to_ascii_lowercase());
            state.cursor = 0;
        }
        _ => {}
    }
    Step::More
}

/// The lines of the picker, as drawn.
fn render(state: &State, items: &[Item]) -> Vec<String> {
    let colour = output::colour();
    let cluster = items.iter().any(|i| !i.broker.is_empty());
    let width = items
        .iter()
        .map(|i| i.name.as_str().len())
        .max()
        .unwrap_or(4);
    let mut lines = vec![format!(
        "Send to whom? ↑/↓ move, space choose, enter send, type to filter, esc cancel{}",
        if state.filter.is_empty() {
            String::new()
        } else {
            format!("   filter: {}", state.filter)
        }
    )];
    let shown = state.shown(items);
    let first = state.cursor.saturating_sub(PAGE - 1);
    for (at, item) in shown.iter().enumerate().skip(first).take(PAGE) {
        let mark = if state.chosen.contains(&item.name) {
            "[x]"
        } else {
            "[ ]"
        };
        let pointer = if at == state.cursor { ">" } else { " " };
        let key = match (&item.fp, item.pinned) {
            (Some(fp), true) => format!("{fp} pinned"),
            (Some(fp), false) => format!("{fp} first contact"),
            (None, _) => "first contact".to_owned(),
        };
        let broker = if cluster {
            format!("  via {}", escape(&item.broker))
        } else {
            String::new()
        };
        let state_word = if item.free { "free" } else { "busy" };
        let line = format!(
            "{pointer} {mark} {:<width$}  {state_word}  {key}{broker}",
            item.name.as_str()
        );
        lines.push(if item.free || !colour {
            line
        } else {
            style(line).dim().to_string()
        });
    }
    if shown.is_empty() {
        lines.push(format!("  (no receiver matches {:?})", state.filter));
    } else if shown.len() > first + PAGE {
        lines.push(format!("  … {} more", shown.len() - first - PAGE));
    }
    lines.push(state.hint.clone());
    lines
}

/// Runs the picker on the terminal until the user sends or cancels.
fn choose(items: &[Item]) -> Result<Vec<AgentName>, AgentError> {
    let term = Term::stderr();
    let io = |e: std::io::Error| AgentError::Internal(format!("the terminal: {e}"));
    // Start on the first receiver that may be chosen.
    let mut state = State {
        cursor: items.iter().position(|i| i.free).unwrap_or(0),
        ..State::default()
    };
    let _ = term.hide_cursor();
    let mut drawn = 0;
    let result = loop {
        term.clear_last_lines(drawn).map_err(io)?;
        let lines = render(&state, items);
        for l in &lines {
            term.write_line(l).map_err(io)?;
        }
        drawn = lines.len();
        let k = term.read_key_raw().map_err(io)?;
        match key(&mut state, items, k) {
            Step::Go(names) => break Ok(names),
            Step::Cancel => break Err(AgentError::Cancelled),
            Step::More => {}
        }
    };
    let _ = term.clear_last_lines(drawn);
    let _ = term.show_cursor();
    if let Ok(names) = &result {
        let list: Vec<&str> = names.iter().map(AgentName::as_str).collect();
        eprintln!("sending to {}", list.join(", "));
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn item(name: &str, free: bool) -> Item {
        Item {
            name: AgentName::new(name).unwrap(),
            free,
            broker: String::new(),
            fp: None,
            pinned: false,
        }
    }

    #[test]
    fn busy_receivers_cannot_be_chosen_and_typing_filters() {
        let items = [item("bob", true), item("carol", false), item("dave", true)];
        let mut s = State::default();
        assert!(matches!(key(&mut s, &items, Key::ArrowDown), Step::More));
        key(&mut s, &items, Key::Char(' '));
        assert!(s.chosen.is_empty());
        assert!(s.hint.contains("carol is busy"));
        assert!(matches!(key(&mut s, &items, Key::Enter), Step::More));
        key(&mut s, &items, Key::Char('d'));
        assert_eq!(s.shown(&items).len(), 1);
        match key(&mut s, &items, Key::Enter) {
            Step::Go(names) => assert_eq!(names, [AgentName::new("dave").unwrap()]),
            _ => panic!("dave not sent to"),
        }
        assert!(matches!(key(&mut s, &items, Key::Escape), Step::Cancel));
    }

    #[test]
    fn several_can_be_chosen_with_space() {
        let items = [item("bob", true), item("dave", true)];
        let mut s = State::default();
        key(&mut s, &items, Key::Char(' '));
        key(&mut s, &items, Key::ArrowDown);
        key(&mut s, &items, Key::Char(' '));
        let lines = render(&s, &items);
        assert!(lines[1].starts_with("  [x] bob"), "{lines:?}");
        assert!(lines[2].starts_with("> [x] dave"), "{lines:?}");
        match key(&mut s, &items, Key::Enter) {
            Step::Go(names) => assert_eq!(names.len(), 2),
            _ => panic!("not sent"),
        }
    }
}

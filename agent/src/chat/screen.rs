//! What a chat shows and reads. On a terminal: a line editor (rustyline),
//! with every incoming line, and every notice of the agent, printed above
//! the line being typed so that nothing typed is broken up. Off a terminal:
//! lines read from stdin, and what arrives written to stdout, one line each
//! (`HH:MM:SS name: text`, times in UTC) or one JSON object each with
//! `--json`; notices on stderr. Peer text is always escaped.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use keyferry_common::name::AgentName;
use keyferry_common::text::escape;
use rustyline::ExternalPrinter as _;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::AgentError;
use crate::output;

/// What the person (or the script) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A line to send.
    Line(String),
    /// `/file PATH`: send a file to the peers.
    File(PathBuf),
    /// `/quit`, Ctrl-D, Ctrl-C, or the end of stdin.
    Quit,
}

/// What a typed line asks for.
pub fn parse(line: &str) -> Option<Input> {
    let trimmed = line.trim_end_matches(['\r', '\n']);
    match trimmed.trim() {
        "" => None,
        "/quit" => Some(Input::Quit),
        t => match t.strip_prefix("/file ") {
            Some(path) => Some(Input::File(PathBuf::from(path.trim()))),
            None => Some(Input::Line(trimmed.to_owned())),
        },
    }
}

/// `time_ms` (since the epoch) as `HH:MM:SS` in UTC.
pub fn clock(time_ms: u64) -> String {
    let s = time_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One chat event as `--json` prints it.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event<'a> {
    Line {
        from: &'a str,
        text: &'a str,
        time_ms: u64,
    },
    Joined {
        peer: &'a str,
    },
    Left {
        peer: &'a str,
    },
    Undelivered {
        to: &'a str,
        seq: u32,
        text: &'a str,
        why: &'a str,
    },
}

/// Prints one line above the line editor's input line.
type Print = Box<dyn FnMut(String) + Send>;

/// Where the chat's lines go.
enum Out {
    /// Above the line editor's input line.
    Terminal(Arc<Mutex<Print>>),
    /// stdout (and notices on stderr).
    Plain { json: bool },
}

/// The chat's screen, or its stdin and stdout.
pub struct Screen {
    inputs: mpsc::Receiver<Input>,
    out: Out,
    me: AgentName,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screen")
            .field("me", &self.me)
            .field("terminal", &matches!(self.out, Out::Terminal(_)))
            .finish_non_exhaustive()
    }
}

impl Screen {
    /// A line editor on the terminal, or plain lines with `plain` (not a
    /// terminal, or `--json`).
    pub fn start(me: &AgentName, plain: bool, json: bool) -> Result<Self, AgentError> {
        let (tx, inputs) = mpsc::channel(64);
        let out = if plain {
            std::thread::spawn(move || read_stdin(&tx));
            Out::Plain { json }
        } else {
            let io = |e: rustyline::error::ReadlineError| {
                AgentError::Internal(format!("the terminal's line editor: {e}"))
            };
            let mut editor = rustyline::DefaultEditor::new().map_err(io)?;
            let mut printer = editor.create_external_printer().map_err(io)?;
            let print: Print = Box::new(move |mut s: String| {
                s.push('\n');
                let _ = printer.print(s);
            });
            let print = Arc::new(Mutex::new(print));
            // The agent's own notices go above the input line too.
            let p = Arc::clone(&print);
            output::set_printer(Box::new(move |s| {
                if let Ok(mut print) = p.lock() {
                    print(s);
                }
            }));
            let prompt = format!("{me}> ");
            std::thread::spawn(move || edit(editor, &prompt, &tx));
            Out::Terminal(print)
        };
        Ok(Self {
            inputs,
            out,
            me: me.clone(),
        })
    }

    /// The next thing asked for (`Quit` once the input ends).
    pub async fn input(&mut self) -> Input {
        self.inputs.recv().await.unwrap_or(Input::Quit)
    }

    fn show(&self, line: &str) {
        match &self.out {
            Out::Terminal(print) => {
                if let Ok(mut print) = print.lock() {
                    print(line.to_owned());
                }
            }
            Out::Plain { .. } => output::out_line(line),
        }
    }

    fn json(&self) -> bool {
        matches!(self.out, Out::Plain { json: true })
    }

    fn event(&self, e: &Event<'_>) {
        if let Ok(line) = serde_json::to_string(e) {
            output::out_line(&line);
        }
    }

    /// A peer's line (or, on a terminal, our own as sent).
    pub fn line(&self, from: &AgentName, time_ms: u64, text: &str) {
        if self.json() {
            self.event(&Event::Line {
                from: from.as_str(),
                text,
                time_ms,
            });
        } else {
            self.show(&format!("{} {from}: {}", clock(time_ms), escape(text)));
        }
    }

    /// Our own line as it went out: shown on a terminal (where it replaces
    /// what was typed); a script knows what it wrote.
    pub fn own(&self, time_ms: u64, text: &str) {
        if matches!(self.out, Out::Terminal(_)) {
            self.line(&self.me.clone(), time_ms, text);
        }
    }

    /// A peer came.
    pub fn joined(&self, peer: &AgentName) {
        if self.json() {
            self.event(&Event::Joined {
                peer: peer.as_str(),
            });
        } else {
            self.notice(&format!("{peer} is here"));
        }
    }

    /// A peer left.
    pub fn left(&self, peer: &AgentName) {
        if self.json() {
            self.event(&Event::Left {
                peer: peer.as_str(),
            });
        } else {
            self.notice(&format!("{peer} left"));
        }
    }

    /// Line `seq` did not reach `peer`.
    pub fn undelivered(&self, peer: &AgentName, seq: u32, text: &str, why: &str) {
        if self.json() {
            self.event(&Event::Undelivered {
                to: peer.as_str(),
                seq,
                text,
                why,
            });
        } else {
            self.notice(&format!(
                "not delivered to {peer} ({why}): {}",
                escape(text)
            ));
        }
    }

    /// A notice: on the terminal above the input line, else on stderr.
    pub fn notice(&self, text: &str) {
        match &self.out {
            Out::Terminal(_) => self.show(&format!("-- {text}")),
            Out::Plain { .. } => output::err_line(&format!("-- {text}")),
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        output::clear_printer();
    }
}

/// The line editor's loop (its own thread): each line typed, its echo
/// replaced by the line as sent; Ctrl-D or Ctrl-C ends the chat.
fn edit(mut editor: rustyline::DefaultEditor, prompt: &str, tx: &mpsc::Sender<Input>) {
    loop {
        match editor.readline(prompt) {
            Ok(line) => {
                erase_echo(prompt, &line);
                if let Some(input) = parse(&line) {
                    if input != Input::Quit {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    let quit = input == Input::Quit;
                    if tx.blocking_send(input).is_err() || quit {
                        return;
                    }
                }
            }
            Err(_) => {
                let _ = tx.blocking_send(Input::Quit);
                return;
            }
        }
    }
}

/// Moves up over the prompt and the line just typed and clears them: the
/// line comes back as sent, with its time.
fn erase_echo(prompt: &str, line: &str) {
    let cols = usize::from(console::Term::stdout().size().1).max(1);
    let width = console::measure_text_width(prompt) + console::measure_text_width(line);
    let rows = width / cols + 1;
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "\x1b[{rows}A\r\x1b[J");
    let _ = out.flush();
}

/// Reads lines from stdin until its end (its own thread).
fn read_stdin(tx: &mpsc::Sender<Input>) {
    use std::io::BufRead as _;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(input) = parse(&line) {
            let quit = input == Input::Quit;
            if tx.blocking_send(input).is_err() || quit {
                return;
            }
        }
    }
    let _ = tx.blocking_send(Input::Quit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines_and_commands() {
        assert_eq!(parse("hello"), Some(Input::Line("hello".into())));
        assert_eq!(parse("  spaced  "), Some(Input::Line("  spaced  ".into())));
        assert_eq!(parse("/quit"), Some(Input::Quit));
        assert_eq!(parse("/file a b.txt"), Some(Input::File("a b.txt".into())));
        assert_eq!(parse("   "), None);
        assert_eq!(clock(1_800_000_123_456), "08:02:03");
    }
}

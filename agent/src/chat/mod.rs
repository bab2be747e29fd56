//! `agent --chat PEER [--chat PEER ...]`: a line-by-line conversation, end to
//! end encrypted, through the broker (PROTOCOL.md §6.6). While it runs, the
//! chat is its name's receiver ([`crate::receive`], taking chat streams and
//! files from its peers only); it sends its own lines in one stream to
//! every peer online ([`outgoing`]), and shows what comes ([`screen`]).
//! Each line is acknowledged by whoever showed it, so a line that did not
//! reach someone is said so, not silently lost.

mod live;
pub mod outgoing;
pub mod screen;

use std::path::PathBuf;
use std::time::Duration;

use keyferry_common::name::AgentName;
use tokio::sync::mpsc;

use crate::client::Ctx;
use crate::direct::DirectOpt;
use crate::error::AgentError;
use crate::receive::chatsink::{ChatEvent, ChatLink};
use crate::receive::consent::Policy;
use crate::receive::{RecvOptions, receive};
use crate::send::{Payload, SendOptions, send};
use outgoing::{Cmd, Note, Outgoing};
use screen::{Input, Screen};

/// A chat's options.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Whom to talk with (1 to 16).
    pub peers: Vec<AgentName>,
    /// Plain lines on stdin and stdout, not a line editor.
    pub plain: bool,
    /// With `plain`: one JSON object per event on stdout.
    pub json: bool,
    /// How long one session key lives.
    pub rekey_interval: Duration,
    /// Where files the peers send go.
    pub out_dir: PathBuf,
    /// The receiving half's keepalive.
    pub keepalive: Duration,
    /// The largest file taken from a peer (`None`: the free space).
    pub max_size: Option<u64>,
}

/// Runs a chat until `/quit`, Ctrl-D or the end of stdin.
pub async fn chat(ctx: Ctx, opts: ChatOptions) -> Result<(), AgentError> {
    let mut screen = Screen::start(&ctx.name, opts.plain, opts.json)?;
    let (events_tx, mut events) = mpsc::channel(256);
    let link = ChatLink {
        me: ctx.name.clone(),
        peers: opts.peers.clone(),
        events: events_tx,
    };
    let receiving = RecvOptions {
        max_size: opts.max_size,
        keepalive: opts.keepalive,
        // Chat lines and files from the chat go through the broker.
        direct: DirectOpt::Never,
        chat: Some(link),
        ..RecvOptions::new(opts.out_dir.clone(), Policy::Only(opts.peers.clone()))
    };
    let mut receiver = tokio::spawn(receive(ctx.clone(), receiving));
    // Reachable first (or the reason why not), then talking.
    tokio::select! {
        Some(ChatEvent::Receiving) = events.recv() => {}
        ended = &mut receiver => return Err(match ended {
            Ok(Err(e)) => chat_error(e),
            _ => AgentError::Internal("the chat's receiving half stopped".into()),
        }),
    }
    let names: Vec<&str> = opts.peers.iter().map(AgentName::as_str).collect();
    screen.notice(&format!(
        "chatting as {} ({}) with {}; /file PATH sends a file, /quit ends",
        ctx.name,
        ctx.identity.fingerprint(),
        names.join(", ")
    ));
    let (cmd_tx, cmds) = mpsc::channel(64);
    let (notes_tx, mut notes) = mpsc::channel(256);
    let out = Outgoing::new(
        ctx.clone(),
        opts.peers.clone(),
        opts.rekey_interval,
        notes_tx,
    );
    let mut sending = tokio::spawn(out.run(cmds));
    let result = loop {
        tokio::select! {
            input = screen.input() => match input {
                Input::Line(text) if text.len() > keyferry_common::chat::MAX_LINE => {
                    screen.notice("that line is longer than 4096 bytes; not sent");
                }
                Input::Line(text) => { let _ = cmd_tx.send(Cmd::Say(text)).await; }
                Input::File(path) => send_file(&ctx, &opts, path, &screen),
                Input::Quit => break Ok(()),
            },
            Some(event) = events.recv() => match event {
                ChatEvent::Joined { from } => {
                    screen.joined(&from);
                    let _ = cmd_tx.send(Cmd::Here(from)).await;
                }
                ChatEvent::Line { from, seq, time_ms, text } => {
                    screen.line(&from, time_ms, &text);
                    let _ = cmd_tx.send(Cmd::Ack(from, seq)).await;
                }
                ChatEvent::Acked { by, seq } => { let _ = cmd_tx.send(Cmd::Acked(by, seq)).await; }
                ChatEvent::Left { from } => {
                    screen.left(&from);
                    let _ = cmd_tx.send(Cmd::Gone(from)).await;
                }
                ChatEvent::Receiving => {}
            },
            Some(note) = notes.recv() => match note {
                Note::Sent { time_ms, text, .. } => screen.own(time_ms, &text),
                Note::Undelivered { peer, seq, text, why } => screen.undelivered(&peer, seq, &text, &why),
                Note::Info(text) => screen.notice(&text),
            },
            ended = &mut receiver => {
                break match ended {
                    Ok(Err(e)) => Err(chat_error(e)),
                    _ => Err(AgentError::Internal("the chat's receiving half stopped".into())),
                };
            }
            _ = &mut sending => break Err(AgentError::Internal("the chat's sending half stopped".into())),
        }
    };
    // A proper end for the peers: the trailer, and their receipts.
    let _ = cmd_tx.send(Cmd::Quit).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sending).await;
    while let Ok(note) = notes.try_recv() {
        match note {
            Note::Undelivered {
                peer,
                seq,
                text,
                why,
            } => screen.undelivered(&peer, seq, &text, &why),
            Note::Info(text) => screen.notice(&text),
            Note::Sent { .. } => {}
        }
    }
    receiver.abort();
    result
}

/// A receiving half that could not start says why in a chat's words.
fn chat_error(e: AgentError) -> AgentError {
    match e {
        AgentError::NameRefused(why) => AgentError::NameRefused(format!(
            "{why} (while it runs, a chat is its name's receiver: stop the other receiver of \
             this name, or chat under another --name)"
        )),
        other => other,
    }
}

/// `/file PATH`: a normal transfer to the peers, reported in the chat.
fn send_file(ctx: &Ctx, opts: &ChatOptions, path: PathBuf, screen: &Screen) {
    screen.notice(&format!("sending {} to the chat", path.display()));
    let (ctx, peers) = (ctx.clone(), opts.peers.clone());
    tokio::spawn(async move {
        let sent = send(
            &ctx,
            SendOptions {
                direct: DirectOpt::Never,
                ..SendOptions::new(peers, Payload::Files(vec![path.clone()]))
            },
        )
        .await;
        let line = match sent {
            Ok(s) if s.failed.is_empty() => format!("-- sent {}", path.display()),
            Ok(s) => {
                let why: Vec<String> = s.failed.iter().map(|(p, e)| format!("{p}: {e}")).collect();
                format!("-- {} not sent to all: {}", path.display(), why.join("; "))
            }
            Err(e) => format!("-- {} not sent: {e}", path.display()),
        };
        crate::output::err_line(&line);
    });
}

//! The two roles as the command line starts them: the checks that pair
//! options with a role, the receiver's consent policy (`--accept-from`,
//! `--yes`, or asking on a terminal), the sender's receivers (`--to`, or
//! the picker on a terminal), and the report of what was sent.

use std::path::PathBuf;

use super::{Args, pick, report, usage};
use crate::client::Ctx;
use crate::error::AgentError;
use crate::prompt::interactive;
use crate::receive::consent::{MAX_ASK, Policy};
use crate::receive::{RecvOptions, receive};
use crate::send::source::Walk;
use crate::send::{MAX_RECEIVERS, Payload, SendOptions, Sent, send};

/// The most a sender reads from standard input without `--max-size`.
const STDIN_BOUND: u64 = 4 << 30;

/// Whom a receiver takes transfers from: what the user said, or asking on a
/// terminal, or (no terminal, nothing said) anyone, with one line saying so.
fn policy(args: &Args, out_dir: &std::path::Path) -> Result<Policy, AgentError> {
    if args.ask_timeout.is_zero() || args.ask_timeout > MAX_ASK {
        return Err(usage(&format!(
            "--ask-timeout must be between 1s and {}s",
            MAX_ASK.as_secs()
        )));
    }
    Ok(match (&args.accept_from, args.yes) {
        (Some(_), true) => return Err(usage("--accept-from and --yes do not go together")),
        (Some(p), false) => p.clone(),
        (None, true) => Policy::Anyone,
        (None, false) if interactive() && !args.json && !args.stdout => {
            Policy::Ask(args.ask_timeout)
        }
        (None, false) => {
            crate::output::err_line(&format!(
                "agent: any agent the broker admits can send to this receiver and write into {}; \
                 restrict it with --accept-from NAME[,NAME...] or --accept-from known \
                 (--yes says that is meant)",
                out_dir.display()
            ));
            Policy::Anyone
        }
    })
}

/// `--out-dir`, or the current directory.
fn out_dir(args: &Args) -> Result<PathBuf, AgentError> {
    match args.out_dir.clone() {
        Some(d) => Ok(d),
        None => std::env::current_dir().map_err(|source| AgentError::OutDir {
            path: PathBuf::from("."),
            source,
        }),
    }
}

/// `--role receiver`.
pub(super) async fn receiver(args: Args, ctx: Ctx) -> Result<(), AgentError> {
    if args.yes && args.accept_from.is_some() {
        return Err(usage("--accept-from and --yes do not go together"));
    }
    if !args.to.is_empty()
        || !args.file.is_empty()
        || args.message.is_some()
        || !args.exclude.is_empty()
        || args.no_skip_links
        || args.name_as.is_some()
    {
        return Err(usage(
            "--to, --file, --message, --exclude, --no-skip-links and --name-as are for \
             --role sender",
        ));
    }
    let out_dir = out_dir(&args)?;
    let policy = policy(&args, &out_dir)?;
    receive(
        ctx,
        RecvOptions {
            policy,
            preserve: !args.no_preserve,
            chat: None,
            out_dir,
            once: args.once,
            max_size: args.max_size,
            progress_timeout: args.progress_timeout,
            json: args.json,
            stdout: args.stdout,
            keepalive: args.keepalive,
            trust_sender_hash: args.trust_sender_hash,
            direct: args.direct,
            direct_port: args.direct_port.unwrap_or(0),
            streams: args.streams,
        },
    )
    .await
}

/// `--role sender`.
pub(super) async fn sender(args: Args, ctx: Ctx) -> Result<(), AgentError> {
    if args.out_dir.is_some() || args.once || args.trust_sender_hash {
        return Err(usage(
            "--out-dir, --once and --trust-sender-hash are for --role receiver",
        ));
    }
    let stdin = args.file.iter().any(|f| f.as_os_str() == "-");
    if stdin && args.file.len() > 1 {
        return Err(usage("--file - (standard input) goes alone"));
    }
    if stdin != args.name_as.is_some() {
        return Err(usage(
            "--file - (standard input) needs --name-as NAME, and --name-as needs --file -",
        ));
    }
    let to = match args.to {
        // On a terminal, the user picks among the receivers online.
        to if to.is_empty() && interactive() && !args.json => pick::pick(&ctx).await?,
        to if to.is_empty() => return Err(usage("--role sender needs --to PEER")),
        to => to,
    };
    if to.len() > MAX_RECEIVERS {
        return Err(usage(&format!(
            "at most {MAX_RECEIVERS} receivers (--to) for one send"
        )));
    }
    if to.iter().enumerate().any(|(i, t)| to[..i].contains(t)) {
        return Err(usage("a receiver is named twice with --to"));
    }
    if to.len() > 1 && args.store {
        return Err(usage("--store goes with one --to"));
    }
    if to.len() > 1 && args.peer_fingerprint.is_some() {
        return Err(usage("--peer-fingerprint goes with one --to"));
    }
    let label = match (&args.file[..], &args.message) {
        (_, None) if stdin => "standard input".into(),
        ([one], None) => one.display().to_string(),
        ([], Some(_)) => "message".into(),
        (many, None) => format!("{} items", many.len()),
        _ => String::new(),
    };
    let payload = match (args.file, args.message) {
        (_, None) if stdin => Payload::Stdin {
            name: args.name_as.unwrap_or_default(),
            bound: args.max_size.unwrap_or(STDIN_BOUND),
        },
        (files, None) if !files.is_empty() => Payload::Files(files),
        (files, Some(m)) if files.is_empty() => Payload::Message(m),
        _ => return Err(usage("--role sender needs --file PATH or --message TEXT")),
    };
    let of = to.len();
    let sent = send(
        &ctx,
        SendOptions {
            walk: Walk {
                exclude: args.exclude,
                refuse_links: args.no_skip_links,
            },
            rekey_interval: args.rekey_interval,
            peer_fingerprint: args.peer_fingerprint,
            retry_for: args.retry_for,
            progress: true,
            direct: args.direct,
            streams: args.streams,
            store: args.store,
            ..SendOptions::new(to, payload)
        },
    )
    .await?;
    if let Some(stored) = &sent.stored {
        if args.json {
            let mut line =
                serde_json::to_value(stored).map_err(|e| AgentError::Internal(e.to_string()))?;
            line["event"] = "stored".into();
            crate::output::say!("{line}");
        }
        return Err(AgentError::StoredForLater {
            peer: stored.peer.clone(),
            id: stored.transfer_id.clone(),
            expires: super::receipts::utc(stored.expires),
        });
    }
    for report in &sent.reports {
        report::print_report(report, &label, args.json)?;
    }
    let Sent { failed, .. } = sent;
    match (failed.len(), of) {
        (0, _) => Ok(()),
        // One receiver: its own error and exit code, as always.
        (_, 1) => Err(failed
            .into_iter()
            .map(|(_, e)| e)
            .next()
            .unwrap_or(AgentError::Internal("a send without an outcome".into()))),
        (n, of) => {
            for (peer, e) in &failed {
                let line = format!("agent: {peer}: {e} (exit code {} alone)", e.exit_code());
                crate::output::err_line(&line);
            }
            Err(AgentError::SomeReceiversFailed { failed: n, of })
        }
    }
}

/// `--chat PEER ...`.
pub(super) async fn chat(args: Args, ctx: Ctx) -> Result<(), AgentError> {
    let peers = args.chat.clone();
    if peers.len() > MAX_RECEIVERS {
        return Err(usage(&format!(
            "at most {MAX_RECEIVERS} peers (--chat) in one chat"
        )));
    }
    if peers
        .iter()
        .enumerate()
        .any(|(i, p)| peers[..i].contains(p) || *p == ctx.name)
    {
        return Err(usage(
            "a peer is named twice with --chat, or is this agent itself",
        ));
    }
    if !args.to.is_empty() || !args.file.is_empty() || args.message.is_some() || args.once {
        return Err(usage(
            "--chat goes without --to, --file, --message and --once",
        ));
    }
    let out_dir = out_dir(&args)?;
    crate::chat::chat(
        ctx,
        crate::chat::ChatOptions {
            peers,
            plain: args.json || !interactive(),
            json: args.json,
            rekey_interval: args.rekey_interval,
            out_dir,
            keepalive: args.keepalive,
            max_size: args.max_size,
        },
    )
    .await
}

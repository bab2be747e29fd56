//! The command line, and what each invocation does.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;
use keyferry_common::units::{parse_duration, parse_size};
use keyferry_common::wire::message::{Message, Role};

use crate::client::{Ctx, broker_error, conn_error, connect};
use crate::error::AgentError;
use crate::home::Home;
use crate::receive::{RecvOptions, receive};
use crate::send::source::Walk;
use crate::send::{MAX_RECEIVERS, Payload, Report, SendOptions, Sent, send};

/// The address agents connect to by default (the broker's default listen address).
pub const DEFAULT_BROKER: &str = "127.0.0.1:7447";

/// The two roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Stay connected and receive files and messages into --out-dir.
    Receiver,
    /// Send files and directories (--file) or a message (--message) to --to.
    Sender,
}

/// keyferry agent: send and receive files end-to-end encrypted through a broker.
///
///   agent --role receiver [--out-dir DIR] [--once]
///   agent --role sender --to PEER [--to PEER ...] --file PATH [--file PATH ...] [--exclude GLOB ...]
///   agent --role sender --to PEER --message TEXT
///   agent --list
///
/// The first run creates an RSA identity in --home. Keys of brokers and peers
/// are pinned on first contact (printed as NEW KEY ... — verify them out of
/// band); a changed key is refused. A transfer that breaks after the receiver
/// accepted it is retried by the sender (--retry-for) and resumes from what
/// the receiver holds verified.
///
/// Exit codes: 0 verified success, 1 other error, 2 usage, 3 broker unreachable,
/// 4 broker key mismatch, 5 unknown or offline peer, 6 peer key mismatch,
/// 7 file unreadable, 8 refused by the receiver, 9 verification failed,
/// 10 name or key refused by the broker, 11 some of several receivers
/// failed (one line each), 130 interrupted.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
pub struct Args {
    /// Broker address.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_BROKER)]
    pub broker: String,
    /// Require this broker certificate fingerprint (SHA256:...), instead of
    /// pinning whatever the broker presents on first contact.
    #[arg(long, value_name = "FP")]
    pub broker_fingerprint: Option<Fingerprint>,
    /// Directory holding this agent's identity and pins
    /// [default: $XDG_CONFIG_HOME/keyferry or ~/.config/keyferry].
    #[arg(long, value_name = "DIR", env = "KEYFERRY_HOME")]
    pub home: Option<PathBuf>,
    /// This agent's name: 1-32 of a-z 0-9 . _ - [default: your user name, lowercased].
    #[arg(long, value_name = "NAME")]
    pub name: Option<AgentName>,
    /// What to do.
    #[arg(long, value_enum, required_unless_present = "list")]
    pub role: Option<RoleArg>,
    /// List the agents online at the broker (receivers, busy or free) and exit.
    #[arg(long, conflicts_with = "role")]
    pub list: bool,

    /// Receiver: where received files go [default: the current directory].
    #[arg(long, value_name = "DIR", help_heading = "Receiver")]
    pub out_dir: Option<PathBuf>,
    /// Receiver: exit after one transfer (0 if it verified, non-zero if not).
    #[arg(long, help_heading = "Receiver")]
    pub once: bool,
    /// Receiver: refuse files larger than this (e.g. 500MiB, 4GiB).
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size, help_heading = "Receiver")]
    pub max_size: u64,
    /// Receiver: fail a transfer that brings no new verified data for this long.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration, help_heading = "Receiver")]
    pub progress_timeout: Duration,

    /// Sender: the receiving agent's name; may be given several times (up to
    /// 16): the data is uploaded once and the broker copies it to each.
    #[arg(long, value_name = "PEER", help_heading = "Sender")]
    pub to: Vec<AgentName>,
    /// Sender: a file or directory to send (a directory with everything
    /// below it); may be given several times. Each arrives under its own name.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "message",
        help_heading = "Sender"
    )]
    pub file: Vec<PathBuf>,
    /// Sender: leave out files and directories whose name or path (from the
    /// --file item's own name, e.g. photos/raw) matches this glob; may be
    /// given several times.
    #[arg(long, value_name = "GLOB", value_parser = parse_glob, help_heading = "Sender")]
    pub exclude: Vec<glob::Pattern>,
    /// Sender: refuse to send a directory that holds a symbolic link, instead
    /// of skipping the link with a warning (links are never followed).
    #[arg(long, help_heading = "Sender")]
    pub no_skip_links: bool,
    /// Sender: how long to keep retrying a transfer that broke after the
    /// receiver accepted it (waiting for it to come back; 0 = never).
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = parse_retry, help_heading = "Sender")]
    pub retry_for: Duration,
    /// Sender: a short text message to send instead of a file.
    #[arg(long, value_name = "TEXT", help_heading = "Sender")]
    pub message: Option<String>,
    /// Sender: how long one session key lives (e.g. 200ms, 5s, 1m).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration, help_heading = "Sender")]
    pub rekey_interval: Duration,
    /// Sender: print one JSON object per finished transfer instead of a summary line.
    #[arg(long, help_heading = "Sender")]
    pub json: bool,
    /// Sender: require the receiver to have this key fingerprint (SHA256:...).
    #[arg(long, value_name = "FP", help_heading = "Sender")]
    pub peer_fingerprint: Option<Fingerprint>,
}

fn parse_retry(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn parse_glob(s: &str) -> Result<glob::Pattern, String> {
    glob::Pattern::new(s).map_err(|e| format!("not a glob pattern: {e}"))
}

fn usage(msg: &str) -> AgentError {
    AgentError::Usage(msg.to_owned())
}

fn context(args: &Args) -> Result<Ctx, AgentError> {
    let dir = args
        .home
        .clone()
        .or_else(Home::default_dir)
        .ok_or_else(|| {
            usage("no --home given and neither KEYFERRY_HOME, XDG_CONFIG_HOME nor HOME is set")
        })?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => {
            let user = std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .map_err(|_| {
                    usage("cannot tell your user name; choose an agent name with --name")
                })?;
            AgentName::from_user(&user).map_err(|e| {
                usage(&format!(
                    "your user name is not a valid agent name ({e}); choose one with --name"
                ))
            })?
        }
    };
    let home = Home::open(dir)?;
    let identity = Arc::new(home.identity()?);
    Ok(Ctx {
        broker: args.broker.clone(),
        broker_fingerprint: args.broker_fingerprint,
        home,
        name,
        identity,
    })
}

async fn list(ctx: &Ctx) -> Result<(), AgentError> {
    let mut conn = connect(ctx, Role::Sender).await?;
    conn.writer
        .write(&Message::List)
        .await
        .map_err(|e| conn_error(ctx, e))?;
    match conn
        .reader
        .read_timeout(Duration::from_secs(30))
        .await
        .map_err(|e| conn_error(ctx, e))?
    {
        Some(Message::Online { agents }) => {
            println!("{:<32} {:<9} {:<6} senders", "name", "receiver", "state");
            for a in agents {
                let (receiver, state) = match (a.receiving, a.incoming) {
                    (false, _) => ("no", "-"),
                    (true, 0) => ("yes", "free"),
                    (true, _) => ("yes", "busy"),
                };
                println!("{:<32} {receiver:<9} {state:<6} {}", a.name, a.senders);
            }
            Ok(())
        }
        Some(Message::Error { code, detail }) => Err(broker_error(code, detail)),
        _ => Err(AgentError::Protocol(
            "the broker did not answer the list request",
        )),
    }
}

/// Prints one receiver's verified transfer: a JSON object, or a line.
fn print_report(report: &Report, label: &str, json: bool) -> Result<(), AgentError> {
    if json {
        let line =
            serde_json::to_string(report).map_err(|e| AgentError::Internal(e.to_string()))?;
        println!("{line}");
        return Ok(());
    }
    let resumed = if report.resumed_from > 0 {
        format!(", resumed at byte {}", report.resumed_from)
    } else {
        String::new()
    };
    let files = match report.files {
        0 => String::new(),
        1 => "1 file, ".into(),
        n => format!("{n} files, "),
    };
    println!(
        "sent {label} to {} ({files}{} bytes in {:.2} s, {} session keys, sha256 {}{resumed}) — receipt verified",
        report.peer, report.bytes, report.seconds, report.session_keys, report.sha256
    );
    Ok(())
}

/// Runs one invocation.
pub async fn run(args: Args) -> Result<(), AgentError> {
    let ctx = context(&args)?;
    if args.list {
        return list(&ctx).await;
    }
    match args.role {
        Some(RoleArg::Receiver) => {
            if !args.to.is_empty()
                || !args.file.is_empty()
                || args.message.is_some()
                || args.json
                || !args.exclude.is_empty()
                || args.no_skip_links
            {
                return Err(usage(
                    "--to, --file, --message, --exclude, --no-skip-links and --json are for \
                     --role sender",
                ));
            }
            let out_dir = match args.out_dir {
                Some(d) => d,
                None => std::env::current_dir().map_err(|source| AgentError::OutDir {
                    path: PathBuf::from("."),
                    source,
                })?,
            };
            receive(
                ctx,
                RecvOptions {
                    out_dir,
                    once: args.once,
                    max_size: args.max_size,
                    progress_timeout: args.progress_timeout,
                },
            )
            .await
        }
        Some(RoleArg::Sender) => {
            if args.out_dir.is_some() || args.once {
                return Err(usage("--out-dir and --once are for --role receiver"));
            }
            let to = args.to;
            if to.is_empty() {
                return Err(usage("--role sender needs --to PEER"));
            }
            if to.len() > MAX_RECEIVERS {
                return Err(usage(&format!(
                    "at most {MAX_RECEIVERS} receivers (--to) for one send"
                )));
            }
            if to.iter().enumerate().any(|(i, t)| to[..i].contains(t)) {
                return Err(usage("a receiver is named twice with --to"));
            }
            if to.len() > 1 && args.peer_fingerprint.is_some() {
                return Err(usage("--peer-fingerprint goes with one --to"));
            }
            let label = match (&args.file[..], &args.message) {
                ([one], None) => one.display().to_string(),
                ([], Some(_)) => "message".into(),
                (many, None) => format!("{} items", many.len()),
                _ => String::new(),
            };
            let payload = match (args.file, args.message) {
                (files, None) if !files.is_empty() => Payload::Files(files),
                (files, Some(m)) if files.is_empty() => Payload::Message(m),
                _ => return Err(usage("--role sender needs --file PATH or --message TEXT")),
            };
            let of = to.len();
            let sent = send(
                &ctx,
                SendOptions {
                    to,
                    payload,
                    walk: Walk {
                        exclude: args.exclude,
                        refuse_links: args.no_skip_links,
                    },
                    rekey_interval: args.rekey_interval,
                    peer_fingerprint: args.peer_fingerprint,
                    retry_for: args.retry_for,
                    progress: !args.json && std::io::stdout().is_terminal(),
                },
            )
            .await?;
            for report in &sent.reports {
                print_report(report, &label, args.json)?;
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
                        eprintln!("agent: {peer}: {e} (exit code {} alone)", e.exit_code());
                    }
                    Err(AgentError::SomeReceiversFailed { failed: n, of })
                }
            }
        }
        None => Err(usage("choose --role receiver, --role sender or --list")),
    }
}

//! The command line, and what each invocation does: the arguments (with
//! their environment variables), the checks that pair options with roles,
//! and the dispatch to a role, `--list` ([`list`]), or the generated
//! completions and man page ([`docs`]).

mod docs;
mod list;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use clap_complete::Shell;
use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;
use keyferry_common::units::{parse_duration, parse_keepalive, parse_size};

use crate::client::Ctx;
use crate::error::AgentError;
use crate::home::Home;
use crate::receive::{RecvOptions, receive};
use crate::send::source::Walk;
use crate::send::{MAX_RECEIVERS, Payload, SendOptions, Sent, send};

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
///   agent --role sender --to PEER --file - --name-as NAME   (standard input)
///   agent --role receiver --once --stdout                   (to standard output)
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
/// 10 name or key refused by the broker (or its receiver already connected),
/// 11 some of several receivers failed (one line each), 130 interrupted.
///
/// --broker, --name and --broker-fingerprint may also come from the
/// environment (KEYFERRY_BROKER, KEYFERRY_NAME, KEYFERRY_BROKER_FINGERPRINT);
/// an option given on the command line wins.
#[derive(Debug, Parser)]
#[command(name = "agent", version, verbatim_doc_comment)]
pub struct Args {
    /// Broker address.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_BROKER, env = "KEYFERRY_BROKER")]
    pub broker: String,
    /// Require this broker certificate fingerprint (SHA256:...), instead of
    /// pinning whatever the broker presents on first contact.
    #[arg(long, value_name = "FP", env = "KEYFERRY_BROKER_FINGERPRINT")]
    pub broker_fingerprint: Option<Fingerprint>,
    /// Directory holding this agent's identity and pins
    /// [default: $XDG_CONFIG_HOME/keyferry or ~/.config/keyferry].
    #[arg(long, value_name = "DIR", env = "KEYFERRY_HOME")]
    pub home: Option<PathBuf>,
    /// This agent's name: 1-32 of a-z 0-9 . _ - [default: your user name, lowercased].
    #[arg(long, value_name = "NAME", env = "KEYFERRY_NAME")]
    pub name: Option<AgentName>,
    /// What to do.
    #[arg(long, value_enum, required_unless_present_any = ["list", "completions", "man"])]
    pub role: Option<RoleArg>,
    /// List the agents online at the broker (receivers, busy or free) and exit.
    #[arg(long, conflicts_with = "role")]
    pub list: bool,
    /// Print JSON lines on stdout instead of text: the sender one object per
    /// receiver that confirmed, the receiver one per event (received,
    /// message, failed, refused), --list one per agent.
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no notices on stderr (errors, warnings and NEW KEY
    /// lines still show). Bars are drawn only when stderr is a terminal, in
    /// colour unless NO_COLOR is set.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a completion script for SHELL and exit, e.g.
    /// `agent --completions bash > ~/.local/share/bash-completion/completions/agent`.
    #[arg(long, value_name = "SHELL", conflicts_with_all = ["role", "list", "man"])]
    pub completions: Option<Shell>,
    /// Print the man page (roff) and exit, e.g. `agent --man > ~/.local/share/man/man1/agent.1`.
    #[arg(long, conflicts_with_all = ["role", "list"])]
    pub man: bool,

    /// Receiver: where received files go [default: the current directory].
    #[arg(long, value_name = "DIR", help_heading = "Receiver")]
    pub out_dir: Option<PathBuf>,
    /// Receiver: exit after one transfer: 0 if it verified, 8 if the offer
    /// was refused, 9 if the data did not verify, 1 if it was cut short.
    #[arg(long, help_heading = "Receiver")]
    pub once: bool,
    /// Receiver, with --once: write the one file received to standard output
    /// instead of --out-dir (a directory or several items are refused). The
    /// bytes are verified chunk by chunk before they are written, but what
    /// was written cannot be taken back: if the transfer fails later, the
    /// receiver exits non-zero after partial output. Nothing is resumed.
    #[arg(long, requires = "once", conflicts_with_all = ["out_dir", "json"], help_heading = "Receiver")]
    pub stdout: bool,
    /// Receiver: refuse transfers larger than this (e.g. 500MiB, 4GiB).
    /// Sender with --file -: the most it reads from standard input (the
    /// offer declares this bound, so the receiver's --max-size must allow it).
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub max_size: u64,
    /// Receiver: fail a transfer that brings no new verified data for this long.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration, help_heading = "Receiver")]
    pub progress_timeout: Duration,
    /// Receiver: ping the broker this often; when it has said nothing for
    /// two intervals, reconnect (the broker, likewise, drops a receiver that
    /// stops answering). From 1s to 60m.
    #[arg(long, value_name = "DUR", default_value = "20s", value_parser = parse_keepalive, help_heading = "Receiver")]
    pub keepalive: Duration,
    /// Receiver: do not hash what arrives; report the SHA-256 the sender
    /// signed instead (hashing is about half of a receiver's CPU). Every
    /// chunk is still authenticated, so the data is what the sender sealed;
    /// but the hash is then only as honest as the sender, so do not compare
    /// it with a published one. A stream to several receivers is hashed
    /// anyway.
    #[arg(long, help_heading = "Receiver")]
    pub trust_sender_hash: bool,

    /// Sender: the receiving agent's name; may be given several times (up to
    /// 16): the data is uploaded once and the broker copies it to each.
    #[arg(long, value_name = "PEER", help_heading = "Sender")]
    pub to: Vec<AgentName>,
    /// Sender: a file or directory to send (a directory with everything
    /// below it); may be given several times. Each arrives under its own name.
    /// `-` sends standard input as one file named by --name-as (not resumed:
    /// a broken transfer is not retried).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "message",
        help_heading = "Sender"
    )]
    pub file: Vec<PathBuf>,
    /// Sender, with --file -: the name standard input arrives under.
    #[arg(long, value_name = "NAME", help_heading = "Sender")]
    pub name_as: Option<String>,
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

/// Runs one invocation.
pub async fn run(args: Args) -> Result<(), AgentError> {
    crate::output::set_quiet(args.quiet);
    if let Some(shell) = args.completions {
        return docs::completions(shell);
    }
    if args.man {
        return docs::man();
    }
    let ctx = context(&args)?;
    if args.list {
        return list::list(&ctx, args.json).await;
    }
    match args.role {
        Some(RoleArg::Receiver) => {
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
                    json: args.json,
                    stdout: args.stdout,
                    keepalive: args.keepalive,
                    trust_sender_hash: args.trust_sender_hash,
                },
            )
            .await
        }
        Some(RoleArg::Sender) => {
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
                (_, None) if stdin => "standard input".into(),
                ([one], None) => one.display().to_string(),
                ([], Some(_)) => "message".into(),
                (many, None) => format!("{} items", many.len()),
                _ => String::new(),
            };
            let payload = match (args.file, args.message) {
                (_, None) if stdin => Payload::Stdin {
                    name: args.name_as.unwrap_or_default(),
                    bound: args.max_size,
                },
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
                    progress: true,
                },
            )
            .await?;
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
                        eprintln!("agent: {peer}: {e} (exit code {} alone)", e.exit_code());
                    }
                    Err(AgentError::SomeReceiversFailed { failed: n, of })
                }
            }
        }
        None => Err(usage("choose --role receiver, --role sender or --list")),
    }
}

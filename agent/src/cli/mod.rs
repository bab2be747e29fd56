//! The command line, and what each invocation does: the arguments (with
//! their environment variables), the checks that pair options with roles,
//! and the dispatch to a role, `--list` ([`list`]), or the generated
//! completions and man page ([`docs`]).

mod docs;
pub(crate) mod list;
mod pick;
mod receipts;
mod report;
mod roles;

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
use crate::logline::LogFormat;

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
///   agent --role receiver [--out-dir DIR] [--once] [--accept-from NAME[,NAME...]|known | --yes]
///   agent --role sender --to PEER [--to PEER ...] --file PATH [--file PATH ...] [--exclude GLOB ...]
///   agent --role sender --file PATH                        (on a terminal: pick receivers online)
///   agent --role sender --to PEER --message TEXT
///   agent --role sender --to PEER --file - --name-as NAME   (standard input)
///   agent --role receiver --once --stdout                   (to standard output)
///   agent --chat PEER [--chat PEER ...]                    (talk; /file PATH, /quit)
///   agent --list
///
/// On a terminal a receiver asks before each transfer ("Accept? [y/N]"); off
/// a terminal it takes what any agent the broker admits sends, and says so,
/// unless --accept-from or --yes says otherwise.
///
/// The first run creates an RSA identity in --home. Keys of brokers and peers
/// are pinned on first contact (printed as NEW KEY ... — verify them out of
/// band); a changed key is refused. A transfer that breaks after the receiver
/// accepted it is retried by the sender (--retry-for) and resumes from what
/// the receiver holds verified.
///
/// The stream goes straight from sender to receiver when the sender can reach
/// one of the receiver's addresses (the same machine or network), through the
/// broker's relay otherwise (--direct); sealed end to end either way.
///
/// Exit codes: 0 verified success, 1 other error, 2 usage, 3 broker unreachable,
/// 4 broker key mismatch, 5 unknown or offline peer (or nobody receiving),
/// 6 peer key mismatch, 7 file unreadable, 8 refused by the receiver (or its
/// user declined), 9 verification failed, 10 name or key refused by the broker
/// (or its receiver already connected), 11 some of several receivers failed
/// (one line each), 13 no direct path (--direct only), 130 interrupted or
/// cancelled.
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
    #[arg(long, value_enum, required_unless_present_any = ["list", "completions", "man", "chat", "receipts", "withdraw"])]
    pub role: Option<RoleArg>,
    /// Chat with PEER: both run `agent --chat` naming each other; may be
    /// given up to 16 times for a group. Lines typed go to every peer, each
    /// shown with its author and time (UTC); `/file PATH` sends a file,
    /// `/quit` or Ctrl-D ends. Off a terminal: lines from stdin, received
    /// lines on stdout (JSON with --json). While it runs it is its name's
    /// receiver (files from its peers go to --out-dir).
    #[arg(long, value_name = "PEER", conflicts_with_all = ["role", "list"])]
    pub chat: Vec<AgentName>,
    /// List the agents online at the broker (receivers, busy or free) and exit.
    #[arg(long, conflicts_with = "role")]
    pub list: bool,
    /// List this agent's transfers stored at the broker (--store) and what
    /// became of each: delivered (the receiver's signed receipt verified
    /// with its pinned key, and the SHA-256 it confirms), still waiting,
    /// refused (and why), expired or withdrawn; then exit.
    #[arg(long, conflicts_with_all = ["role", "list", "chat"])]
    pub receipts: bool,
    /// Delete a stored transfer that is still waiting at the broker (its id
    /// as --store or --receipts printed it), so it is never delivered.
    #[arg(long, value_name = "ID", conflicts_with_all = ["role", "list", "chat", "receipts"])]
    pub withdraw: Option<String>,
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
    /// Stderr lines (notices, warnings, the final error) as text, or one
    /// JSON object each (timestamp, level, message, fields) for a log
    /// collector. Progress bars and prompts are for terminals and stay as
    /// they are.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Which path a file takes. auto: straight from the sender to the
    /// receiver when the sender can reach one of the receiver's addresses
    /// (same machine, same network), through the broker's relay otherwise;
    /// never: always the relay, and a receiver tells nobody its addresses;
    /// only: never the relay (exit 13 when no direct connection works).
    /// Either side's never or only decides. The stream is sealed end to end
    /// on either path.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub direct: crate::direct::DirectOpt,
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
    /// Receiver: refuse transfers larger than this (e.g. 500MiB, 40GiB)
    /// [default: no limit but the free space of the out dir, less 1 GiB].
    /// Sender with --file -: the most it reads from standard input (the
    /// offer declares this bound, so the receiver must allow it) [default: 4GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Receiver: fail a transfer that brings no new verified data for this long.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration, help_heading = "Receiver")]
    pub progress_timeout: Duration,
    /// Receiver: ping the broker this often; when it has said nothing for
    /// two intervals, reconnect (the broker, likewise, drops a receiver that
    /// stops answering). From 1s to 60m.
    #[arg(long, value_name = "DUR", default_value = "20s", value_parser = parse_keepalive, help_heading = "Receiver")]
    pub keepalive: Duration,
    /// Receiver: take transfers only from these senders (NAME[,NAME...]),
    /// without asking; or `known`: only from senders whose key is already
    /// pinned. Others are refused before anything is decrypted. [default on a
    /// terminal: ask about each transfer; otherwise: anyone the broker admits]
    #[arg(long, value_name = "NAMES|known", value_parser = crate::receive::consent::parse_accept_from, help_heading = "Receiver")]
    pub accept_from: Option<crate::receive::consent::Policy>,
    /// Receiver: take every transfer the out dir's limits allow, without
    /// asking (what a receiver does off a terminal, said explicitly).
    #[arg(long, help_heading = "Receiver")]
    pub yes: bool,
    /// Receiver, on a terminal: how long the question "Accept? [y/N]" waits
    /// for an answer before the transfer is refused (1s to 100s).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration, help_heading = "Receiver")]
    pub ask_timeout: Duration,
    /// Receiver: do not apply the sender's permission bits and modification
    /// times: files arrive 0600 and directories 0700, stamped with the time
    /// they arrived (without it, the sender's are kept: the mode masked by
    /// your umask, never set-uid, set-gid or sticky).
    #[arg(long, help_heading = "Receiver")]
    pub no_preserve: bool,
    /// Receiver: do not hash what arrives; report the SHA-256 the sender
    /// signed instead (hashing is about half of a receiver's CPU). Every
    /// chunk is still authenticated, so the data is what the sender sealed;
    /// but the hash is then only as honest as the sender, so do not compare
    /// it with a published one. A stream to several receivers is hashed
    /// anyway.
    #[arg(long, help_heading = "Receiver")]
    pub trust_sender_hash: bool,
    /// Receiver: the TCP port to listen on for direct connections from
    /// senders (to open one port in a firewall) [default: any free port].
    #[arg(long, value_name = "PORT", help_heading = "Receiver")]
    pub direct_port: Option<u16>,
    /// Sender: how many TCP connections a stream to one receiver is spread
    /// over, 1 to 8, directly to it or to the broker's relay (a receiver's
    /// --streams: its own connections from the relay). One connection
    /// carries at most its send buffer per round trip, so a long path needs
    /// several to fill its link [default: from the round trip measured when
    /// connecting; directly 1 on a LAN, 3 at 40 ms, 8 from 118 ms; to the
    /// relay, which must leave room for the receiver's leg, 1 up to 67 ms, 2
    /// to 134 ms, 3 to 201 ms].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8), help_heading = "Sender")]
    pub streams: Option<u8>,

    /// Sender: the receiving agent's name; may be given several times (up to
    /// 16): the data is uploaded once and the broker copies it to each.
    /// Without --to on a terminal, pick from the receivers online.
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
    /// Sender: if the receiver is offline, leave the transfer at the broker
    /// (sealed to one of the receiver's signed prekeys: the broker cannot
    /// read it) and exit 12; the receiver gets it when it next connects.
    /// With the receiver online, a live transfer as without it. One --to.
    #[arg(long, help_heading = "Sender")]
    pub store: bool,
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
        seen: Default::default(),
    })
}

/// Runs one invocation.
pub async fn run(args: Args) -> Result<(), AgentError> {
    crate::output::set_quiet(args.quiet);
    crate::logline::set_format(args.log_format);
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
    if args.receipts {
        return receipts::receipts(&ctx, args.json).await;
    }
    if let Some(id) = &args.withdraw {
        return receipts::withdraw(&ctx, id).await;
    }
    if !args.chat.is_empty() {
        return roles::chat(args, ctx).await;
    }
    match args.role {
        Some(RoleArg::Receiver) => roles::receiver(args, ctx).await,
        Some(RoleArg::Sender) => roles::sender(args, ctx).await,
        None => Err(usage("choose --role receiver, --role sender or --list")),
    }
}

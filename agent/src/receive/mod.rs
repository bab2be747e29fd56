//! The receiver role: stay connected (reconnecting when the broker goes
//! away), check every offer ([`admit`]), answer it on the control
//! connection, receive each accepted transfer on its own data connection
//! ([`stream`], [`store`]) into a private staging directory ([`outdir`],
//! [`staging`], [`tree`]) that a journal makes resumable ([`journal`],
//! [`checkpoint`], [`resume`]), place it whole, and only then send the
//! receipt.

mod admit;
pub mod chatsink;
mod checkpoint;
mod claim;
pub mod consent;
mod control;
pub mod filename;
mod incoming;
mod job;
mod journal;
mod keep;
mod offers;
pub mod outdir;
mod path;
mod prefix;
mod report;
mod resume;
mod staging;
mod store;
mod stored;
mod stream;
pub(crate) use stream::prefix_read_time;
mod tree;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::handshake::DEFAULT_TIME_WINDOW_SECS;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::{AbortReason, Message, RefuseReason, Role};
use tokio::sync::{mpsc, oneshot};

use crate::client::{AgentConn, Ctx, Ticket, connect};
use crate::direct::DirectOpt;
use crate::direct::listen::Listener;
use crate::error::AgentError;
use crate::home::now_unix;
use crate::output::{notice, say};
use crate::trust::budget::RsaBudget;
use crate::trust::replay::ReplayGuard;
use control::{Channels, control_loop};
use outdir::OutDir;

/// At most this many transfers at once.
pub const MAX_CONCURRENT: usize = 4;
/// At most this many transfers at once from one sender.
pub const MAX_PER_SENDER: usize = 1;
/// Free space that must remain after every accepted transfer.
pub const SPACE_MARGIN: u64 = 1 << 30;
/// Longest wait between two attempts to reach a broker that went away.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that stayed up this long starts the backoff afresh; one
/// lost sooner (a broker that closes right after `Welcome`) does not.
const STABLE: Duration = Duration::from_secs(60);

/// The receiver's options.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Where files go.
    pub out_dir: PathBuf,
    /// Exit after one transfer.
    pub once: bool,
    /// Largest transfer accepted (`None`: whatever the free space allows).
    pub max_size: Option<u64>,
    /// A transfer without new verified data for this long fails.
    pub progress_timeout: Duration,
    /// Report each event as a JSON line on stdout.
    pub json: bool,
    /// Write the one file of a `--once` transfer to standard output.
    pub stdout: bool,
    /// Ping the broker this often; two intervals without a word from it
    /// and the receiver reconnects.
    pub keepalive: Duration,
    /// Take the sender's signed SHA-256 instead of hashing what arrives
    /// (for a stream to this receiver alone).
    pub trust_sender_hash: bool,
    /// Whom it takes transfers from, and whether it asks.
    pub policy: consent::Policy,
    /// Apply the sender's permission bits and modification times (not with
    /// `--no-preserve`).
    pub preserve: bool,
    /// When it is the receiving half of a chat (`agent --chat`): where chat
    /// streams go (only its peers' are taken).
    pub chat: Option<chatsink::ChatLink>,
    /// Which paths a stream may take.
    pub direct: DirectOpt,
    /// The port to listen on for direct connections (0: any).
    pub direct_port: u16,
    /// How many connections a stream to this receiver alone takes from
    /// the relay (`--streams`); `None`: chosen from the round trip.
    pub streams: Option<u8>,
}

impl RecvOptions {
    /// A receiver into `out_dir` that takes what `policy` admits, with the
    /// command line's defaults: it stays for more than one transfer, takes
    /// any size the free space allows, gives up on a transfer after 60 s
    /// without new verified data, pings the broker every 20 s, hashes what
    /// arrives, keeps modes and times, and takes either path with
    /// connections chosen from the round trip; no JSON lines, no standard
    /// output, no chat. Change a field with struct update syntax.
    pub fn new(out_dir: PathBuf, policy: consent::Policy) -> Self {
        Self {
            out_dir,
            once: false,
            max_size: None,
            progress_timeout: Duration::from_secs(60),
            json: false,
            stdout: false,
            keepalive: Duration::from_secs(20),
            trust_sender_hash: false,
            policy,
            preserve: true,
            chat: None,
            direct: DirectOpt::Auto,
            direct_port: 0,
            streams: None,
        }
    }
}

/// Transfers in progress: the receiver's capacity.
#[derive(Debug, Default)]
struct Limits {
    per_sender: HashMap<AgentName, usize>,
    active: usize,
    in_flight: u64,
}

/// Where an accepted transfer's ticket (or the broker's `Abort`) goes.
type TicketWaiter = oneshot::Sender<Result<Ticket, AbortReason>>;

/// What every incoming transfer of this receiver shares.
struct Shared {
    ctx: Ctx,
    opts: RecvOptions,
    out: Arc<OutDir>,
    journal_key: Arc<MacKey>,
    limits: Mutex<Limits>,
    replay: Arc<Mutex<ReplayGuard>>,
    budget: Mutex<RsaBudget>,
    /// Accepted transfers waiting for their ticket on the control connection.
    tickets: Mutex<HashMap<TransferId, TicketWaiter>>,
    /// Puts questions to the user, one at a time.
    prompter: crate::prompt::Prompter,
    /// Transfers that are chat streams: their end is the chat's to tell.
    chats: Mutex<std::collections::HashSet<TransferId>>,
    /// When a stream over several connections from the relay last failed:
    /// for a while after, streams take one.
    lanes_failed: Mutex<Option<std::time::Instant>>,
    /// Where senders connect directly (none with `--direct never`).
    direct: Option<Listener>,
    /// The private halves of this receiver's prekeys (none if the home
    /// cannot hold them: then nothing stored reaches it).
    prekeys: Option<crate::mailbox::prekeys::Prekeys>,
    /// Stored transfers sealed to a last-resort prekey that ended for good
    /// (their own record, `seen_stored`, so that they never crowd out the
    /// live offers' ids).
    stored_replay: Arc<Mutex<ReplayGuard>>,
    /// Stored transfers being received now: a second offer of one is busy.
    stored_running: Mutex<std::collections::HashSet<TransferId>>,
    /// The signed receipts of stored transfers this run ended, to send again
    /// if the broker offers one again (its receipt was lost on the way).
    stored_receipts: Mutex<HashMap<TransferId, Vec<u8>>>,
    /// The same, kept in the home for later runs (`None`: it cannot hold
    /// them).
    signed: Option<crate::mailbox::signed::SignedReceipts>,
}

/// Why one incoming transfer did not complete.
#[derive(Debug)]
enum Failure {
    /// Refused before accepting.
    Refused(RefuseReason, String),
    /// Failed after accepting.
    Failed(AbortReason, String),
}

/// The direct listener `opts` ask for: none with `--direct never`; a port
/// that cannot be had is an error with `--direct only` or `--direct-port`,
/// and otherwise only means that every stream takes the relay.
async fn listen_direct(opts: &RecvOptions) -> Result<Option<Listener>, AgentError> {
    if opts.direct == DirectOpt::Never {
        return Ok(None);
    }
    match Listener::open(opts.direct_port) {
        Ok(l) => Ok(Some(l)),
        Err(e) if opts.direct == DirectOpt::Only || opts.direct_port != 0 => Err(
            AgentError::NoDirectPath(format!("cannot listen on port {}: {e}", opts.direct_port)),
        ),
        Err(e) => {
            notice!("no direct connections (cannot listen: {e}); every transfer takes the relay");
            Ok(None)
        }
    }
}

/// Runs the receiver until it fails (or after one transfer with `--once`).
pub async fn receive(ctx: Ctx, opts: RecvOptions) -> Result<(), AgentError> {
    let dir_err = |source| AgentError::OutDir {
        path: opts.out_dir.clone(),
        source,
    };
    let (out, created) = OutDir::open_or_create(&opts.out_dir).map_err(dir_err)?;
    if created {
        notice!("created {} (mode 0700)", opts.out_dir.display());
    }
    let journal_key = Arc::new(ctx.home.journal_key()?);
    // With --stdout nothing is staged in the directory: it is left alone.
    if !opts.stdout {
        let cleaned = out.clean_stale(&journal_key, now_unix()).map_err(dir_err)?;
        if cleaned.removed > 0 {
            notice!(
                "removed {} unfinished transfer(s) left in {}",
                cleaned.removed,
                opts.out_dir.display()
            );
        }
        if cleaned.kept > 0 {
            notice!(
                "kept {} interrupted transfer(s) in {} to resume when their senders retry",
                cleaned.kept,
                opts.out_dir.display()
            );
        }
    }
    let direct = listen_direct(&opts).await?;
    // Printed only once the broker took this receiver.
    let mut conn = connect(&ctx, Role::Receiver).await?;
    let (name, fp) = (&ctx.name, ctx.identity.fingerprint());
    let into = if opts.stdout {
        "to standard output".to_owned()
    } else {
        format!("into {}", opts.out_dir.display())
    };
    // Standard output is for the data (--stdout) or for JSON lines only;
    // a chat says what it is itself.
    if let Some(chat) = &opts.chat {
        let _ = chat.events.send(chatsink::ChatEvent::Receiving).await;
    } else if opts.stdout || opts.json {
        crate::output::err_line(&format!("receiving as {name} ({fp}) {into}"));
    } else {
        say!("receiving as {name} ({fp}) {into}");
    }
    let shared_home = ctx.home.dir().to_owned();
    let prekeys = match crate::mailbox::prekeys::Prekeys::open(&shared_home) {
        Ok(p) => {
            let gone = p.sweep(now_unix());
            if gone > 0 {
                notice!("removed {gone} expired prekey(s)");
            }
            Some(p)
        }
        Err(e) => {
            notice!(
                "cannot keep prekeys in {} ({e}): transfers stored for this receiver while it is offline cannot reach it",
                shared_home.display()
            );
            None
        }
    };
    let signed = crate::mailbox::signed::SignedReceipts::open(&shared_home)
        .inspect(|s| {
            s.sweep();
        })
        .map_err(|e| {
            notice!(
                "cannot keep signed receipts in {} ({e})",
                shared_home.display()
            )
        })
        .ok();
    let shared = Arc::new(Shared {
        ctx,
        opts,
        out,
        journal_key,
        limits: Mutex::new(Limits::default()),
        replay: Arc::new(Mutex::new(ReplayGuard::persistent(
            DEFAULT_TIME_WINDOW_SECS,
            shared_home.join("seen_offers"),
        ))),
        budget: Mutex::new(RsaBudget::new()),
        tickets: Mutex::new(HashMap::new()),
        prompter: crate::prompt::Prompter::new(),
        chats: Mutex::new(std::collections::HashSet::new()),
        lanes_failed: Mutex::new(None),
        direct,
        prekeys,
        stored_replay: Arc::new(Mutex::new(ReplayGuard::persistent(
            keyferry_common::handshake::stored::MAX_STORED_AGE_SECS,
            shared_home.join("seen_stored"),
        ))),
        stored_running: Mutex::new(std::collections::HashSet::new()),
        stored_receipts: Mutex::new(HashMap::new()),
        signed,
    });
    // Answers go out on whichever control connection is current; results
    // come back for --once.
    let (out_tx, out_rx) = mpsc::channel::<Message>(64);
    let (done_tx, done_rx) = mpsc::channel(16);
    let mut ch = Channels {
        out_tx,
        out_rx,
        done_tx,
        done_rx,
    };
    let mut wait = Duration::from_secs(1);
    loop {
        let up = std::time::Instant::now();
        let why = match control_loop(&shared, conn, &mut ch).await {
            Ok(done) => return done,
            Err(why) => why,
        };
        if up.elapsed() >= STABLE {
            wait = Duration::from_secs(1);
        }
        // Accepted transfers still waiting for a ticket will not get one.
        lock(&shared.tickets).clear();
        notice!("lost the broker ({why}); reconnecting");
        // A --once receiver whose transfer ends meanwhile is done.
        conn = loop {
            tokio::select! {
                c = reconnect(&shared.ctx, &mut wait) => break c,
                Some(ended) = ch.done_rx.recv() => {
                    if shared.opts.once && let Some(result) = ended {
                        return once(result);
                    }
                }
            }
        };
        notice!("reconnected to the broker");
    }
}

/// How a --once receiver ends, after its one transfer.
fn once(result: Result<(), (u8, String)>) -> Result<(), AgentError> {
    result.map_err(|(code, why)| AgentError::TransferFailed { code, why })
}

/// Connects again after `wait`, which doubles (up to [`MAX_BACKOFF`]) with
/// every attempt, a successful one included: only a connection that then
/// stays up for [`STABLE`] brings it back to 1 s (the caller's business).
async fn reconnect(ctx: &Ctx, wait: &mut Duration) -> AgentConn {
    let mut said = false;
    loop {
        tokio::time::sleep(*wait).await;
        *wait = (*wait * 2).min(MAX_BACKOFF);
        match connect(ctx, Role::Receiver).await {
            Ok(conn) => return conn,
            Err(e) => {
                // The broker may not have noticed our old connection yet; or
                // someone else took the name meanwhile: say so, once.
                if matches!(e, AgentError::NameRefused(_)) && !said {
                    crate::output::err_line(&format!("agent: {e}; still trying"));
                    said = true;
                }
            }
        }
    }
}

//! A broker that misbehaves on purpose — test code only, never part of the
//! shipped broker.
//!
//! [`EvilBroker`] is an in-process tokio TLS 1.3 server on `127.0.0.1:0` with its
//! own self-signed certificate (rcgen, ring provider, as `broker/src/cert.rs`).
//! It speaks the broker side of PROTOCOL.md §2.4 just well enough for the real
//! `agent` binaries: `Hello`, `Auth` (signatures are **not**
//! checked — this broker believes whatever it is told), `Welcome`,
//! `Lookup`/`PeerKey`, `Offer` → `Offered` on the receiver's control connection,
//! `Refuse` or `Accept` back on it, tickets to both sides (the receiver's on
//! its control connection), and then a relay between their plain data
//! connections (§2.5).
//!
//! Every message of a transfer is decoded and handed to the test's [`Hooks`],
//! which decide what actually goes on the wire: pass it on, change it, hold it,
//! drop it, answer it themselves, or cut both connections. The default hooks
//! pass everything through unchanged (an honest broker, used to establish pins).
//! Everything is recorded ([`Record`]) so a test can capture an offer or a
//! stream and re-deliver it later ([`EvilBroker::inject`]).
//!
//! Every wait inside the broker is bounded (a receiver's idle control
//! connection lives until the broker drops); the runtime, and with it every
//! connection, is shut down when the [`EvilBroker`] drops.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keyferry_common::PROTOCOL_VERSION;
use keyferry_common::crypto::random_array;
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::{Connection, FrameReader, FrameWriter};
use keyferry_common::io::tls;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, RefuseReason, Role};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{Home, Proc, Run, WAIT, agent_bin};

/// Longest the broker waits for any single step (a handshake message, an
/// answer to an offer, the next frame of a transfer).
pub const STEP: Duration = Duration::from_secs(20);

type Conn = Connection<TlsStream<TcpStream>>;
/// A plain data connection, after its `Redeem`.
type Plain = Connection<TcpStream>;
type Reader = FrameReader<ReadHalf<TcpStream>>;
type Writer = FrameWriter<WriteHalf<TcpStream>>;

/// Where a transfer's relay stands when a hook sees a message.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The transfer.
    pub tid: TransferId,
    /// Its stream (from the offer).
    pub sid: StreamId,
    /// Sender's name.
    pub from: String,
    /// Receiver's name.
    pub to: String,
    /// Sender → receiver messages seen before this one.
    pub forward_seen: usize,
    /// `Chunk` messages seen before this one.
    pub chunks_seen: usize,
    /// `KeyUpdate` messages seen before this one.
    pub key_updates_seen: usize,
    /// Receiver → sender messages seen before this one.
    pub back_seen: usize,
}

/// What the broker does with one message of a transfer.
#[derive(Debug)]
pub enum Action {
    /// Deliver this message to the other side.
    Pass(Message),
    /// Send this message back to the side the original came from.
    Reply(Message),
    /// Write these bytes to the other side as they are (not a message).
    Raw(Vec<u8>),
    /// Close both connections of the transfer (TLS close_notify, then drop).
    Close,
}

type PeerKeyHook = Box<dyn FnMut(&str, Vec<u8>) -> Vec<u8> + Send>;
type OfferedHook = Box<dyn FnMut(Message) -> Message + Send>;
type AcceptHook = Box<dyn FnMut(Vec<u8>) -> Vec<u8> + Send>;
type StreamHook = Box<dyn FnMut(&Flow, Message) -> Vec<Action> + Send>;

/// The misbehaviour of an [`EvilBroker`]: each hook replaces one step of the
/// honest broker. A hook left unset behaves honestly.
#[derive(Default)]
pub struct Hooks {
    peer_key: Option<PeerKeyHook>,
    offered: Option<OfferedHook>,
    accept: Option<AcceptHook>,
    forward: Option<StreamHook>,
    back: Option<StreamHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("peer_key", &self.peer_key.is_some())
            .field("offered", &self.offered.is_some())
            .field("accept", &self.accept.is_some())
            .field("forward", &self.forward.is_some())
            .field("back", &self.back.is_some())
            .finish()
    }
}

impl Hooks {
    /// An honest broker.
    pub fn pass_through() -> Self {
        Self::default()
    }

    /// Rewrites the key sent in `PeerKey{name, spki}` (gets the name and the
    /// registered key, returns the key to send).
    pub fn peer_key(mut self, f: impl FnMut(&str, Vec<u8>) -> Vec<u8> + Send + 'static) -> Self {
        self.peer_key = Some(Box::new(f));
        self
    }

    /// Rewrites the `Offered` pushed to the receiver.
    pub fn offered(mut self, f: impl FnMut(Message) -> Message + Send + 'static) -> Self {
        self.offered = Some(Box::new(f));
        self
    }

    /// Rewrites the receiver's accept bytes before they reach the sender.
    pub fn accept(mut self, f: impl FnMut(Vec<u8>) -> Vec<u8> + Send + 'static) -> Self {
        self.accept = Some(Box::new(f));
        self
    }

    /// Decides what happens to each sender → receiver message of a transfer.
    pub fn forward(
        mut self,
        f: impl FnMut(&Flow, Message) -> Vec<Action> + Send + 'static,
    ) -> Self {
        self.forward = Some(Box::new(f));
        self
    }

    /// Decides what happens to each receiver → sender message of a transfer.
    pub fn back(mut self, f: impl FnMut(&Flow, Message) -> Vec<Action> + Send + 'static) -> Self {
        self.back = Some(Box::new(f));
        self
    }
}

/// Everything the broker saw of one transfer.
#[derive(Debug, Clone)]
pub struct Record {
    /// Transfer id (from the offer body).
    pub tid: TransferId,
    /// Stream id (from the offer body).
    pub sid: StreamId,
    /// Sender's name.
    pub from: String,
    /// Receiver's name.
    pub to: String,
    /// The `Offered` an honest broker would have pushed (before any hook).
    pub offered: Message,
    /// Injected by the test ([`EvilBroker::inject`]) rather than offered by a sender.
    pub injected: bool,
    /// The receiver's `Refuse`, if it refused.
    pub refused: Option<RefuseReason>,
    /// Whether the receiver accepted.
    pub accepted: bool,
    /// Sender → receiver messages as the sender sent them (before any hook).
    pub forward: Vec<Message>,
    /// Receiver → sender messages as the receiver sent them (before any hook).
    pub back: Vec<Message>,
}

impl Record {
    /// The chunk messages the sender sent, in order.
    pub fn chunks(&self) -> Vec<Message> {
        self.forward
            .iter()
            .filter(|m| matches!(m, Message::Chunk { .. }))
            .cloned()
            .collect()
    }

    /// How many key updates the sender sent.
    pub fn key_updates(&self) -> usize {
        self.forward
            .iter()
            .filter(|m| matches!(m, Message::KeyUpdate { .. }))
            .count()
    }
}

enum Answer {
    Refused(RefuseReason),
    /// The accept, and the receiver's control connection for its ticket.
    Accepted(Vec<u8>, mpsc::Sender<Message>),
}

enum Waiting {
    /// A sender waits for the answer.
    Sender(oneshot::Sender<Answer>),
    /// A test injected the offer; on `Accept`, replay these messages.
    Injected(Vec<Message>),
}

struct Pending {
    to: String,
    waiting: Waiting,
}

#[derive(Default)]
struct State {
    /// name → the SubjectPublicKeyInfo it last authenticated with.
    keys: HashMap<String, Vec<u8>>,
    /// name → (connection id, channel to its control connection).
    receivers: HashMap<String, (u64, mpsc::Sender<Message>)>,
    pending: HashMap<TransferId, Pending>,
    /// ticket → where its data connection goes.
    tickets: HashMap<[u8; 32], oneshot::Sender<Plain>>,
    records: Vec<Record>,
}

struct Shared {
    state: Mutex<State>,
    hooks: Mutex<Hooks>,
    next_id: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hooks(&self) -> MutexGuard<'_, Hooks> {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the latest record of `tid`.
    fn record(&self, tid: &TransferId, f: impl FnOnce(&mut Record)) {
        if let Some(r) = self
            .state()
            .records
            .iter_mut()
            .rev()
            .find(|r| &r.tid == tid)
        {
            f(r);
        }
    }
}

/// The misbehaving broker. Dropping it stops it and closes every connection.
pub struct EvilBroker {
    /// `127.0.0.1:port`.
    pub addr: String,
    /// Its certificate's fingerprint (agents pin it on first use).
    pub fingerprint: String,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EvilBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvilBroker")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for EvilBroker {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl EvilBroker {
    /// Starts a broker on 127.0.0.1 with a fresh certificate and these hooks.
    pub fn start(hooks: Hooks) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let made = rcgen::generate_simple_self_signed(vec![tls::SERVER_NAME.to_owned()]).unwrap();
        let cert = made.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let fingerprint = tls::cert_fingerprint(&cert).unwrap().to_string();
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(cert, key).unwrap()));
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            hooks: Mutex::new(hooks),
            next_id: AtomicU64::new(1),
        });
        rt.spawn(accept_loop(listener, acceptor, Arc::clone(&shared)));
        Self {
            addr,
            fingerprint,
            shared,
            rt: Some(rt),
        }
    }

    /// Replaces the hooks (for the transfers that start from now on, and the
    /// messages still to come of those in progress).
    pub fn set_hooks(&self, hooks: Hooks) {
        *self.shared.hooks() = hooks;
    }

    /// Everything recorded so far, oldest first.
    pub fn records(&self) -> Vec<Record> {
        self.shared.state().records.clone()
    }

    /// Waits (bounded) until `pred` holds for the records; returns whether it did.
    pub fn wait_until(&self, limit: Duration, pred: impl Fn(&[Record]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if pred(&self.shared.state().records) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pushes `offered` (an `Offered` message, e.g. captured from an earlier
    /// transfer) to `to`'s control connection, as if a sender had offered it.
    /// If the receiver accepts, `stream` is written to its data connection and
    /// whatever it answers is recorded. Returns the offer's transfer id, or
    /// `None` if `to` is not connected.
    pub fn inject(&self, to: &str, offered: Message, stream: Vec<Message>) -> Option<TransferId> {
        let Message::Offered { from, offer, .. } = &offered else {
            panic!("inject takes an Offered message, not {offered:?}");
        };
        let fields = offer.parse().expect("a well-formed offer");
        let (tid, sid) = (fields.transfer_id, fields.stream_id);
        let channel = {
            let mut st = self.shared.state();
            let (_, channel) = st.receivers.get(to)?.clone();
            st.records.push(Record {
                tid,
                sid,
                from: from.to_string(),
                to: to.to_owned(),
                offered: offered.clone(),
                injected: true,
                refused: None,
                accepted: false,
                forward: Vec::new(),
                back: Vec::new(),
            });
            st.pending.insert(
                tid,
                Pending {
                    to: to.to_owned(),
                    waiting: Waiting::Injected(stream),
                },
            );
            channel
        };
        channel.blocking_send(offered).ok()?;
        Some(tid)
    }

    fn command(&self, home: &Home) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--broker", &self.addr, "--name", &home.name, "--home"])
            .arg(home.dir.path());
        cmd
    }

    /// Starts the real `agent` for `home` against this broker.
    pub fn agent(&self, home: &Home, args: &[&str]) -> Proc {
        let mut cmd = self.command(home);
        cmd.args(args);
        Proc::spawn(cmd)
    }

    /// Starts a real receiver and waits until it is connected.
    pub fn receiver(&self, home: &Home, out: &Path, extra: &[&str]) -> Proc {
        let mut cmd = self.command(home);
        cmd.args(["--role", "receiver", "--out-dir"])
            .arg(out)
            .args(extra);
        let mut p = Proc::spawn(cmd);
        p.stdout.wait_for("receiving as", WAIT);
        p
    }

    /// Starts a real sender of `file` to `to` (not waiting for it). It does
    /// not retry (`--retry-for 0`): these tests are about what one attempt
    /// detects, and a retry would meet the same broker again. Its stream
    /// goes through this broker (`--direct never`): what a broker can do to
    /// a stream is what they test.
    pub fn sender(&self, home: &Home, to: &str, file: &Path, extra: &[&str]) -> Proc {
        let mut args = vec!["--role", "sender", "--to", to, "--retry-for", "0"];
        args.extend_from_slice(&["--direct", "never", "--file"]);
        args.push(file.to_str().unwrap());
        args.extend_from_slice(extra);
        self.agent(home, &args)
    }
}

/// Waits at most `limit` for `p` to exit (killing it after that) and collects
/// its output. `code` is `None` if it had to be killed.
pub fn finish_within(mut p: Proc, limit: Duration) -> Run {
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            p.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The reader threads see EOF right after exit; let them catch up.
    let settle = Instant::now() + Duration::from_secs(2);
    let mut stdout = p.stdout.drain().join("\n");
    let mut stderr = p.stderr.drain().join("\n");
    while Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(30));
        let (o, e) = (p.stdout.drain().join("\n"), p.stderr.drain().join("\n"));
        if o == stdout && e == stderr {
            break;
        }
        (stdout, stderr) = (o, e);
    }
    Run {
        code,
        stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------
// Helpers for writing hooks.

/// The transfer id a transfer message carries (stream messages carry a
/// stream id instead).
pub fn tid_of(m: &Message) -> Option<TransferId> {
    match m {
        Message::Accept { transfer_id, .. }
        | Message::Refuse { transfer_id, .. }
        | Message::Root { transfer_id, .. }
        | Message::Receipt { transfer_id, .. }
        | Message::Abort { transfer_id, .. } => Some(*transfer_id),
        _ => None,
    }
}

/// The same message re-addressed to transfer `tid` of stream `sid`.
pub fn readdress(m: Message, tid: TransferId, sid: StreamId) -> Message {
    match m {
        Message::Root { record, .. } => Message::Root {
            transfer_id: tid,
            record,
        },
        Message::Manifest { record, .. } => Message::Manifest {
            stream_id: sid,
            record,
        },
        Message::KeyUpdate { record, .. } => Message::KeyUpdate {
            stream_id: sid,
            record,
        },
        Message::Chunk { record, .. } => Message::Chunk {
            stream_id: sid,
            record,
        },
        Message::Trailer { record, .. } => Message::Trailer {
            stream_id: sid,
            record,
        },
        Message::Receipt { tag, .. } => Message::Receipt {
            transfer_id: tid,
            tag,
        },
        other => other,
    }
}

/// Flips the lowest bit of byte `at` of the record (root, manifest, key
/// update, chunk, trailer) or tag (receipt) the message carries.
pub fn flip(m: Message, at: usize) -> Message {
    match m {
        Message::Root {
            transfer_id,
            mut record,
        } => {
            record[at] ^= 1;
            Message::Root {
                transfer_id,
                record,
            }
        }
        Message::Manifest {
            stream_id,
            mut record,
        } => {
            record[at] ^= 1;
            Message::Manifest { stream_id, record }
        }
        Message::KeyUpdate {
            stream_id,
            mut record,
        } => {
            record[at] ^= 1;
            Message::KeyUpdate { stream_id, record }
        }
        Message::Chunk {
            stream_id,
            mut record,
        } => {
            record[at] ^= 1;
            Message::Chunk { stream_id, record }
        }
        Message::Trailer {
            stream_id,
            mut record,
        } => {
            record[at] ^= 1;
            Message::Trailer { stream_id, record }
        }
        Message::Receipt {
            transfer_id,
            mut tag,
        } => {
            tag[at] ^= 1;
            Message::Receipt { transfer_id, tag }
        }
        other => panic!("flip: no record in {other:?}"),
    }
}

/// Whether `m` is the final chunk (`last = 1`, byte 12 of the record).
pub fn is_last_chunk(m: &Message) -> bool {
    matches!(m, Message::Chunk { record, .. } if record.get(12) == Some(&1))
}

// ---------------------------------------------------------------------------
// The server.

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, shared) = (acceptor.clone(), Arc::clone(&shared));
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(STEP, tcp.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => {
                    let _ = handle(shared, acceptor, tcp).await;
                }
                Ok(Ok(1)) => admit(&shared, tcp).await,
                _ => {}
            }
        });
    }
}

struct Agent {
    name: AgentName,
    spki: Vec<u8>,
}

async fn read_step(conn: &mut Conn) -> Result<Message, String> {
    match tokio::time::timeout(STEP, conn.reader.read()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err("closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut FrameWriter<W>, m: &Message) -> Result<(), String> {
    match tokio::time::timeout(STEP, w.write(m)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("write timed out".into()),
    }
}

async fn error(conn: &mut Conn, code: ErrorCode, detail: &str) -> Result<(), String> {
    let _ = write(
        &mut conn.writer,
        &Message::Error {
            code,
            detail: detail.into(),
        },
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.writer.shutdown()).await;
    Err(detail.into())
}

async fn handle(shared: Arc<Shared>, acceptor: TlsAcceptor, tcp: TcpStream) -> Result<(), String> {
    let tls = tokio::time::timeout(STEP, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut conn = Connection::new(tls);
    let Message::Hello { .. } = read_step(&mut conn).await? else {
        return error(&mut conn, ErrorCode::Protocol, "expected Hello").await;
    };
    write(
        &mut conn.writer,
        &Message::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await?;
    let Message::Auth {
        name, role, spki, ..
    } = read_step(&mut conn).await?
    else {
        return error(&mut conn, ErrorCode::Protocol, "expected Auth").await;
    };
    // The signature is not checked: this broker believes whatever it is told.
    shared.state().keys.insert(name.to_string(), spki.clone());
    let agent = Agent { name, spki };
    match role {
        Role::Sender => {
            write(
                &mut conn.writer,
                &Message::Welcome {
                    seen: String::new(),
                },
            )
            .await?;
            sender_session(&shared, conn, agent).await
        }
        Role::Receiver => receiver_session(&shared, conn, agent).await,
    }
}

/// A connection that is not TLS: a data connection redeeming its ticket.
async fn admit(shared: &Shared, tcp: TcpStream) {
    let mut conn = Connection::new(tcp);
    let Ok(Ok(Some(Message::Redeem { ticket, .. }))) =
        tokio::time::timeout(STEP, conn.reader.read()).await
    else {
        return;
    };
    let waiting = shared.state().tickets.remove(&ticket);
    if let Some(tx) = waiting {
        let _ = tx.send(conn);
    }
}

/// Where a ticket goes: the sender's connection, or the receiver's control
/// connection (through its queue).
enum TicketTo<'a> {
    Conn(&'a mut Conn),
    Queue(&'a mpsc::Sender<Message>),
}

/// Sends a ticket for `tid` and waits for its data connection.
async fn data_connection(shared: &Shared, to: TicketTo<'_>, tid: TransferId) -> Option<Plain> {
    let ticket: [u8; 32] = random_array();
    let (tx, rx) = oneshot::channel();
    shared.state().tickets.insert(ticket, tx);
    let message = Message::Ticket {
        transfer_id: tid,
        ticket,
        address: String::new(),
    };
    let arrived = async {
        match to {
            TicketTo::Conn(conn) => write(&mut conn.writer, &message).await.ok()?,
            TicketTo::Queue(q) => q.send(message).await.ok()?,
        }
        tokio::time::timeout(STEP, rx).await.ok()?.ok()
    }
    .await;
    shared.state().tickets.remove(&ticket);
    arrived
}

async fn receiver_session(
    shared: &Arc<Shared>,
    mut conn: Conn,
    agent: Agent,
) -> Result<(), String> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let name = agent.name.to_string();
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    // Online before the Welcome: once the agent says it is receiving, offers
    // (and injected offers) reach it.
    shared
        .state()
        .receivers
        .insert(name.clone(), (id, tx.clone()));
    let welcomed = write(
        &mut conn.writer,
        &Message::Welcome {
            seen: String::new(),
        },
    )
    .await;
    let result = if let Err(e) = welcomed {
        Err(e)
    } else {
        loop {
            tokio::select! {
                Some(m) = rx.recv() => {
                    if let Err(e) = write(&mut conn.writer, &m).await {
                        break Err(e);
                    }
                }
                m = conn.reader.read() => match m {
                    Ok(Some(Message::Refuse { transfer_id, reason })) => {
                        shared.record(&transfer_id, |r| r.refused = Some(reason));
                        let pending = shared.state().pending.remove(&transfer_id);
                        if let Some(Pending { waiting: Waiting::Sender(tx), .. }) = pending {
                            let _ = tx.send(Answer::Refused(reason));
                        }
                    }
                    Ok(Some(Message::Accept { transfer_id, accept })) => {
                        accepted(shared, &agent, &tx, transfer_id, accept);
                    }
                    Ok(Some(Message::List)) => {
                        if let Err(e) = write(&mut conn.writer, &Message::Online { agents: Vec::new() }).await {
                            break Err(e);
                        }
                    }
                    Ok(Some(Message::Ping { nonce })) => {
                        if let Err(e) = write(&mut conn.writer, &Message::Pong { nonce }).await {
                            break Err(e);
                        }
                    }
                    Ok(Some(other)) => break Err(format!("unexpected {other:?} from a receiver")),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.to_string()),
                },
            }
        }
    };
    let mut st = shared.state();
    if st.receivers.get(&name).is_some_and(|(i, _)| *i == id) {
        st.receivers.remove(&name);
        // Dropping their answer channels tells the waiting senders it left.
        st.pending.retain(|_, p| p.to != name);
    }
    result
}

/// The receiver accepted `tid` on its control connection: the waiting
/// sender's side takes over, or an injected stream is replayed.
fn accepted(
    shared: &Arc<Shared>,
    agent: &Agent,
    queue: &mpsc::Sender<Message>,
    tid: TransferId,
    accept: Vec<u8>,
) {
    let pending = {
        let mut st = shared.state();
        match st.pending.get(&tid) {
            Some(p) if p.to == agent.name.as_str() => st.pending.remove(&tid),
            _ => None,
        }
    };
    let Some(pending) = pending else {
        let _ = queue.try_send(Message::Abort {
            transfer_id: tid,
            reason: keyferry_common::wire::message::AbortReason::PeerGone,
        });
        return;
    };
    shared.record(&tid, |r| r.accepted = true);
    match pending.waiting {
        Waiting::Sender(tx) => {
            let _ = tx.send(Answer::Accepted(accept, queue.clone()));
        }
        Waiting::Injected(stream) => {
            let (shared, queue) = (Arc::clone(shared), queue.clone());
            tokio::spawn(async move {
                if let Some(plain) = data_connection(&shared, TicketTo::Queue(&queue), tid).await {
                    replay(&shared, plain, tid, stream).await;
                }
            });
        }
    }
}

/// Writes a recorded stream to a receiver's data connection while recording
/// what it answers.
async fn replay(shared: &Shared, conn: Plain, tid: TransferId, stream: Vec<Message>) {
    let Connection {
        mut reader,
        mut writer,
    } = conn;
    let read_back = async {
        while let Ok(Ok(Some(m))) = tokio::time::timeout(STEP, reader.read()).await {
            shared.record(&tid, |r| r.back.push(m));
        }
    };
    let sid = shared
        .state()
        .records
        .iter()
        .rev()
        .find(|r| r.tid == tid)
        .map(|r| r.sid);
    let write_out = async {
        for m in stream {
            let m = match sid {
                Some(sid) => readdress(m, tid, sid),
                None => m,
            };
            shared.record(&tid, |r| r.forward.push(m.clone()));
            if write(&mut writer, &m).await.is_err() {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), writer.shutdown()).await;
    };
    tokio::join!(read_back, write_out);
}

async fn sender_session(shared: &Shared, mut conn: Conn, agent: Agent) -> Result<(), String> {
    loop {
        let msg = match tokio::time::timeout(STEP * 3, conn.reader.read()).await {
            Ok(Ok(Some(m))) => m,
            _ => return Ok(()),
        };
        match msg {
            Message::List => {
                write(&mut conn.writer, &Message::Online { agents: Vec::new() }).await?;
            }
            Message::Lookup { name } => {
                let (key, online) = {
                    let st = shared.state();
                    (
                        st.keys.get(name.as_str()).cloned(),
                        st.receivers.contains_key(name.as_str()),
                    )
                };
                let reply = match key {
                    Some(spki) if online => {
                        let spki = match shared.hooks().peer_key.as_mut() {
                            Some(f) => f(name.as_str(), spki),
                            None => spki,
                        };
                        Message::PeerKey { name, spki }
                    }
                    Some(_) => Message::Error {
                        code: ErrorCode::PeerOffline,
                        detail: format!("{name} is not connected as a receiver"),
                    },
                    None => Message::Error {
                        code: ErrorCode::UnknownPeer,
                        detail: format!("no agent named {name}"),
                    },
                };
                write(&mut conn.writer, &reply).await?;
            }
            Message::Offer { to, offer } => {
                let Ok(fields) = offer.parse() else {
                    return error(&mut conn, ErrorCode::Protocol, "malformed offer").await;
                };
                let (tid, sid) = (fields.transfer_id, fields.stream_id);
                let honest = Message::Offered {
                    from: agent.name.clone(),
                    spki: agent.spki.clone(),
                    offer,
                };
                let delivered = match shared.hooks().offered.as_mut() {
                    Some(f) => f(honest.clone()),
                    None => honest.clone(),
                };
                // The receiver answers with the id it parsed from what it got.
                let delivered_tid = match &delivered {
                    Message::Offered { offer, .. } => {
                        offer.parse().map(|f| f.transfer_id).unwrap_or(tid)
                    }
                    _ => tid,
                };
                let (tx, rx) = oneshot::channel();
                let channel = {
                    let mut st = shared.state();
                    st.records.push(Record {
                        tid,
                        sid,
                        from: agent.name.to_string(),
                        to: to.to_string(),
                        offered: honest,
                        injected: false,
                        refused: None,
                        accepted: false,
                        forward: Vec::new(),
                        back: Vec::new(),
                    });
                    let channel = st.receivers.get(to.as_str()).map(|(_, c)| c.clone());
                    if channel.is_some() {
                        st.pending.insert(
                            delivered_tid,
                            Pending {
                                to: to.to_string(),
                                waiting: Waiting::Sender(tx),
                            },
                        );
                    }
                    channel
                };
                let Some(channel) = channel else {
                    return error(&mut conn, ErrorCode::PeerOffline, "receiver offline").await;
                };
                if channel.send(delivered).await.is_err() {
                    return error(&mut conn, ErrorCode::PeerOffline, "receiver gone").await;
                }
                match tokio::time::timeout(STEP * 2, rx).await {
                    Ok(Ok(Answer::Refused(reason))) => {
                        write(
                            &mut conn.writer,
                            &Message::Refuse {
                                transfer_id: tid,
                                reason,
                            },
                        )
                        .await?;
                    }
                    Ok(Ok(Answer::Accepted(accept, queue))) => {
                        let accept = match shared.hooks().accept.as_mut() {
                            Some(f) => f(accept),
                            None => accept,
                        };
                        write(
                            &mut conn.writer,
                            &Message::Accept {
                                transfer_id: tid,
                                accept,
                            },
                        )
                        .await?;
                        let (sender, receiver) = tokio::join!(
                            data_connection(shared, TicketTo::Conn(&mut conn), tid),
                            data_connection(shared, TicketTo::Queue(&queue), tid),
                        );
                        let (Some(sender), Some(receiver)) = (sender, receiver) else {
                            return Err("the data connections did not arrive".into());
                        };
                        drop(conn);
                        let flow = Flow {
                            tid,
                            sid,
                            from: agent.name.to_string(),
                            to: to.to_string(),
                            forward_seen: 0,
                            chunks_seen: 0,
                            key_updates_seen: 0,
                            back_seen: 0,
                        };
                        relay(shared, flow, sender, receiver).await;
                        return Ok(());
                    }
                    Ok(Err(_)) => {
                        return error(&mut conn, ErrorCode::PeerOffline, "receiver disconnected")
                            .await;
                    }
                    Err(_) => {
                        shared.state().pending.remove(&delivered_tid);
                        return error(&mut conn, ErrorCode::PeerOffline, "no answer").await;
                    }
                }
            }
            other => {
                return error(
                    &mut conn,
                    ErrorCode::Protocol,
                    &format!("unexpected {other:?} from a sender"),
                )
                .await;
            }
        }
    }
}

/// Why a relay stopped relaying.
enum End {
    /// The sender's connection ended (EOF, error, or a write to it failed).
    Sender,
    /// The receiver's connection ended.
    Receiver,
    /// A hook cut both connections.
    Close,
    /// Nothing moved for [`STEP`].
    Idle,
}

/// One transfer's relay: the sender's connection and the receiver's data
/// connection, every message through the hooks.
struct Relay<'a> {
    shared: &'a Shared,
    flow: Flow,
    s_rd: Reader,
    s_wr: Writer,
    r_rd: Reader,
    r_wr: Writer,
}

async fn relay(shared: &Shared, flow: Flow, sender: Plain, receiver: Plain) {
    let (
        Connection {
            reader: s_rd,
            writer: s_wr,
        },
        Connection {
            reader: r_rd,
            writer: r_wr,
        },
    ) = (sender, receiver);
    Relay {
        shared,
        flow,
        s_rd,
        s_wr,
        r_rd,
        r_wr,
    }
    .run()
    .await;
}

impl Relay<'_> {
    /// Relays until one side ends, a hook closes, or nothing moves for
    /// [`STEP`]. When one side ends, what it still sent (an `Abort`) is
    /// delivered, the other side gets a clean end of stream (close_notify) and
    /// is read until it closes too, so it sees everything before it exits.
    async fn run(mut self) {
        let end = loop {
            let (forward, msg) = tokio::select! {
                m = self.s_rd.read() => match m {
                    Ok(Some(m)) => (true, m),
                    _ => break End::Sender,
                },
                m = self.r_rd.read() => match m {
                    Ok(Some(m)) => (false, m),
                    _ => break End::Receiver,
                },
                _ = tokio::time::sleep(STEP) => break End::Idle,
            };
            if let Err(end) = self.handle(forward, msg).await {
                break end;
            }
        };
        let quiet = Duration::from_secs(2);
        match end {
            End::Receiver => {
                self.drain(false).await;
                let _ = tokio::time::timeout(quiet, self.s_wr.shutdown()).await;
                discard(&mut self.s_rd).await;
            }
            End::Sender => {
                self.drain(true).await;
                let _ = tokio::time::timeout(quiet, self.r_wr.shutdown()).await;
                discard(&mut self.r_rd).await;
            }
            End::Close | End::Idle => {
                let _ = tokio::time::timeout(quiet, self.s_wr.shutdown()).await;
                let _ = tokio::time::timeout(quiet, self.r_wr.shutdown()).await;
            }
        }
    }

    /// Records one message, asks the hook what to do, does it.
    async fn handle(&mut self, forward: bool, msg: Message) -> Result<(), End> {
        self.shared.record(&self.flow.tid, |r| {
            if forward {
                r.forward.push(msg.clone());
            } else {
                r.back.push(msg.clone());
            }
        });
        let (is_chunk, is_key_update) = (
            matches!(msg, Message::Chunk { .. }),
            matches!(msg, Message::KeyUpdate { .. }),
        );
        let actions = {
            let mut hooks = self.shared.hooks();
            let hook = if forward {
                hooks.forward.as_mut()
            } else {
                hooks.back.as_mut()
            };
            match hook {
                Some(f) => f(&self.flow, msg),
                None => vec![Action::Pass(msg)],
            }
        };
        if forward {
            self.flow.forward_seen += 1;
            self.flow.chunks_seen += usize::from(is_chunk);
            self.flow.key_updates_seen += usize::from(is_key_update);
        } else {
            self.flow.back_seen += 1;
        }
        for action in actions {
            let (to_receiver, bytes) = match action {
                Action::Pass(m) => (forward, frame_of(&m)),
                Action::Reply(m) => (!forward, frame_of(&m)),
                Action::Raw(bytes) => (forward, bytes),
                Action::Close => return Err(End::Close),
            };
            let w = if to_receiver {
                &mut self.r_wr
            } else {
                &mut self.s_wr
            };
            let written = tokio::time::timeout(STEP, w.write_frame(&bytes)).await;
            if !matches!(written, Ok(Ok(()))) {
                return Err(if to_receiver {
                    End::Receiver
                } else {
                    End::Sender
                });
            }
        }
        Ok(())
    }

    /// Relays what the side that ended still sent, until its end of stream.
    async fn drain(&mut self, forward: bool) {
        loop {
            let rd = if forward {
                &mut self.s_rd
            } else {
                &mut self.r_rd
            };
            match tokio::time::timeout(Duration::from_secs(5), rd.read()).await {
                Ok(Ok(Some(m))) => {
                    if self.handle(forward, m).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

fn frame_of(m: &Message) -> Vec<u8> {
    keyferry_common::wire::message::encode(m, keyferry_common::wire::frame::MAX_FRAME_LEN).unwrap()
}

/// Reads and drops frames until the peer closes (or is silent for [`STEP`]).
async fn discard(rd: &mut Reader) {
    while let Ok(Ok(Some(_))) = tokio::time::timeout(STEP, rd.read()).await {}
}

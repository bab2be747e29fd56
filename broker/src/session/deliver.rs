//! A receiver's stored transfers (PROTOCOL.md §2.8): its prekeys (the count
//! it is told after `Welcome` and after each deposit, so that it tops them
//! up), and the courier that offers it what waits for it, one at a time,
//! oldest first — `StoredOffered`, its `Accept` answered by a ticket, the
//! stored frames sent on that data connection, and its signed receipt, which
//! ends the transfer for good (placed or refused). A "not now" (`Refuse`)
//! leaves it waiting, offered again later; so does a delivery that breaks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyferry_common::handshake::prekey::own_bundle;
use keyferry_common::handshake::receipt::{Outcome as Signed, StoredReceipt};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::TransferId;
use keyferry_common::io::task::AbortOnDrop;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::{Message, RefuseReason, SignedOffer};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::mailbox::{Outcome, Storage, StoredMeta};
use crate::state::State;
use crate::stored::{Delivered, deliver};

/// How long a receiver has to answer a stored offer (it may ask its user).
const ANSWER: Duration = Duration::from_secs(150);
/// How long its signed receipt may take once the data was delivered.
const RECEIPT: Duration = Duration::from_secs(300);
/// A transfer that could not be delivered now is offered again after this.
const AGAIN: Duration = Duration::from_secs(60);
/// A transfer that could not be taken for delivery (another delivers it, or
/// the mailbox did not answer) is looked at again after this.
const BUSY: Duration = Duration::from_secs(5);

/// A receiver's answer about a stored transfer, routed from its session.
#[derive(Debug)]
pub(super) enum Answer {
    /// Send it (`Accept`).
    Accept(TransferId),
    /// Not now (`Refuse`).
    NotNow(TransferId, RefuseReason),
    /// Its signed receipt (`StoredReceipt`).
    Receipt(TransferId, Vec<u8>),
}

/// The courier of one receiver session: where its answers go, and the
/// transfer it is offering now.
pub(super) struct Courier {
    answers: mpsc::Sender<Answer>,
    current: Arc<Mutex<Option<TransferId>>>,
    /// Its wake-up, forgotten when it ends (unless a newer session of the
    /// same receiver has its own by then).
    wake: Arc<tokio::sync::Notify>,
    name: AgentName,
    state: Arc<State>,
    _task: AbortOnDrop,
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.state.couriers.forget(&self.name, &self.wake);
    }
}

impl Courier {
    /// Starts the courier for `name` (its key `spki`), pushing on `push`.
    pub(super) fn start(
        state: Arc<State>,
        mailbox: Storage,
        (name, spki): (AgentName, Vec<u8>),
        push: mpsc::Sender<Box<Message>>,
    ) -> Self {
        let (answers, rx) = mpsc::channel(8);
        let current = Arc::new(Mutex::new(None));
        let wake = state.couriers.of(&name);
        let run = Run {
            wake: Arc::clone(&wake),
            state: Arc::clone(&state),
            mailbox,
            name: name.clone(),
            key: PublicKey::from_spki_der(&spki).ok(),
            push,
            answers: rx,
            current: Arc::clone(&current),
        };
        let task = AbortOnDrop(tokio::spawn(run.run()));
        Self {
            answers,
            current,
            wake,
            name,
            state,
            _task: task,
        }
    }

    /// Whether `tid` is the stored transfer being offered (its `Accept` or
    /// `Refuse` is the courier's, not a live transfer's).
    pub(super) fn offering(&self, tid: &TransferId) -> bool {
        lock(&self.current).as_ref() == Some(tid)
    }

    /// Hands the courier an answer.
    pub(super) async fn answer(&self, a: Answer) {
        let _ = self.answers.send(a).await;
    }
}

/// The `PrekeyCount` for `name`: one-time bundles held, and until when its
/// last-resort bundle holds (0: none, or unreadable).
/// `None` when the mailbox cannot say (its cluster away): then the receiver
/// is told nothing rather than "none", which would make it deposit anew.
pub(super) async fn prekey_count(mailbox: &Storage, name: &AgentName) -> Option<Message> {
    let counted = async {
        let last_resort = mailbox.last_resort(name).await?;
        let last_resort_expires = last_resort
            .and_then(|b| own_bundle(&b).ok())
            .map_or(0, |b| b.expires);
        let one_time = mailbox.prekey_count(name).await?;
        Ok::<_, crate::mailbox::MailboxError>(Message::PrekeyCount {
            one_time,
            last_resort_expires,
        })
    };
    counted
        .await
        .inspect_err(|e| warn!(agent = %name, error = %e, "prekeys not counted: not told"))
        .ok()
}

struct Run {
    wake: Arc<tokio::sync::Notify>,
    state: Arc<State>,
    mailbox: Storage,
    name: AgentName,
    key: Option<PublicKey>,
    push: mpsc::Sender<Box<Message>>,
    answers: mpsc::Receiver<Answer>,
    current: Arc<Mutex<Option<TransferId>>>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Run {
    async fn run(mut self) {
        let wake = Arc::clone(&self.wake);
        // Transfers not to offer again before a time.
        let mut later: HashMap<TransferId, Instant> = HashMap::new();
        loop {
            let now = Instant::now();
            later.retain(|_, t| *t > now);
            let waiting = match self.mailbox.waiting_for(&self.name, unix_now()).await {
                Ok(waiting) => waiting,
                Err(e) => {
                    // Its cluster slow or away: soon again, not at the next poll.
                    warn!(to = %self.name, error = %e, "mailbox unreadable: looked at again in a few seconds");
                    tokio::time::sleep(BUSY).await;
                    continue;
                }
            };
            let next = waiting.into_iter().find(|m| !later.contains_key(&m.id));
            let Some(meta) = next else {
                // In a cluster, another broker may store for this receiver:
                // looked for again now and then.
                let poll = self.mailbox.poll_every().map(|p| Instant::now() + p);
                let until = later.values().copied().chain(poll).min();
                tokio::select! {
                    () = wake.notified() => {}
                    () = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
                continue;
            };
            let id = meta.id;
            match self.offer(meta).await {
                Some(Step::Again(after)) => {
                    later.insert(id, Instant::now() + after);
                }
                Some(Step::Done) => {}
                None => return,
            }
            *lock(&self.current) = None;
        }
    }

    /// Offers one stored transfer; `None` once the session is gone.
    async fn offer(&mut self, meta: StoredMeta) -> Option<Step> {
        let id = meta.id;
        // Being delivered by another session or broker, or its cluster did
        // not answer: soon again.
        let Some(delivering) = self.mailbox.begin_delivery(&meta).await else {
            return Some(Step::Again(BUSY));
        };
        *lock(&self.current) = Some(id);
        let offered = Message::StoredOffered {
            from: meta.from.clone(),
            spki: meta.sender_spki.clone(),
            offer: SignedOffer {
                body: meta.offer_body.clone(),
                signature: meta.offer_signature.clone(),
            },
            size: delivering.data_len(),
            stored_at: meta.stored_at,
        };
        self.push.send(Box::new(offered)).await.ok()?;
        info!(transfer = %id, to = %self.name, "stored transfer offered");
        let answer = match tokio::time::timeout(ANSWER, self.answers.recv()).await {
            Ok(Some(a)) => a,
            Ok(None) => return None,
            Err(_) => return Some(Step::Again(AGAIN)),
        };
        let receipt = match answer {
            Answer::Receipt(tid, receipt) if tid == id => receipt,
            Answer::NotNow(tid, reason) if tid == id => match not_now(reason) {
                Some(after) => return Some(Step::Again(after)),
                // Refused for good without a signed word (PROTOCOL.md §2.8).
                None => Vec::new(),
            },
            Answer::Accept(tid) if tid == id => {
                let within = self.state.limits.handshake_timeout;
                let Some((ticket, arrival)) = self.state.handoffs.issue(id, within) else {
                    return Some(Step::Again(AGAIN));
                };
                let ticket = Message::Ticket {
                    transfer_id: id,
                    ticket,
                    address: String::new(),
                };
                self.push.send(Box::new(ticket)).await.ok()?;
                let Ok(Ok(conn)) = tokio::time::timeout(within, arrival).await else {
                    return Some(Step::Again(AGAIN));
                };
                let file = match delivering.open_data().await {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(transfer = %id, error = %e, "stored transfer unreadable");
                        return Some(Step::Again(AGAIN));
                    }
                };
                let idle = self.state.limits.idle_timeout;
                let meters = self.state.metrics.meters(crate::metrics::Path::Stored);
                let delivered = tokio::select! {
                    d = deliver(conn, file, id, idle, meters) => d,
                    () = delivering.lost() => Delivered::Failed,
                };
                if delivered != Delivered::Receipt {
                    info!(transfer = %id, "stored transfer not delivered this time");
                }
                match tokio::time::timeout(RECEIPT, self.answers.recv()).await {
                    Ok(Some(Answer::Receipt(tid, receipt))) if tid == id => receipt,
                    Ok(Some(Answer::NotNow(tid, reason))) if tid == id => match not_now(reason) {
                        Some(after) => return Some(Step::Again(after)),
                        None => Vec::new(),
                    },
                    Ok(Some(_)) | Err(_) => return Some(Step::Again(AGAIN)),
                    Ok(None) => return None,
                }
            }
            _ => return Some(Step::Again(AGAIN)),
        };
        // Only the receiver's own word ends it: its signed receipt, or a
        // refusal for good it would not sign (empty).
        let outcome = if receipt.is_empty() {
            Outcome::Refused { receipt }
        } else {
            let signed = self
                .key
                .as_ref()
                .and_then(|k| StoredReceipt::verify(&receipt, k).ok())
                .filter(|r| r.transfer_id == id);
            match signed.map(|s| s.outcome) {
                Some(Signed::Delivered { .. }) => Outcome::Delivered { receipt },
                Some(Signed::Refused { .. }) => Outcome::Refused { receipt },
                None => {
                    warn!(transfer = %id, "a stored transfer's receipt does not verify: kept");
                    return Some(Step::Again(AGAIN));
                }
            }
        };
        let delivered = matches!(outcome, Outcome::Delivered { .. });
        match delivering.finish(outcome, unix_now()).await {
            Ok(()) => {
                info!(transfer = %id, to = %self.name, delivered, "stored transfer ended");
                Some(Step::Done)
            }
            Err(e) => {
                warn!(transfer = %id, error = %e, "a stored transfer's end not recorded");
                Some(Step::Again(AGAIN))
            }
        }
    }
}

enum Step {
    Done,
    Again(Duration),
}

/// When to offer again after a receiver's `Refuse` with `reason`: busy, or
/// its own time; `None` for every other reason, which ends it for good.
fn not_now(reason: RefuseReason) -> Option<Duration> {
    match reason {
        RefuseReason::TryLater { seconds } => Some(Duration::from_secs(seconds.into())),
        RefuseReason::Busy => Some(Duration::from_secs(5)),
        _ => None,
    }
}

/// Drops `name`'s one-time bundles that expire within a day (a sender
/// would refuse them, and the receiver tops up what is left); how many are
/// left.
pub(super) async fn drop_stale_prekeys(mailbox: &Storage, name: &AgentName) -> u32 {
    let soon = unix_now().saturating_add(24 * 3600);
    let kept = mailbox
        .retain_prekeys(name, move |b| own_bundle(b).is_ok_and(|b| b.expires > soon))
        .await;
    match kept {
        Ok(count) => count,
        Err(e) => {
            warn!(agent = %name, error = %e, "stale prekeys not dropped");
            mailbox.prekey_count(name).await.unwrap_or(0)
        }
    }
}

//! A sender driven by hand through the agent's own library, for tests of
//! what a hostile sender (a party to the transfer, holding its keys) can put
//! on the wire: any terms, any manifest, any record.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use keyferry_agent::client::{AgentConn, Ctx, DataConn, await_ticket, connect, open_data};
use keyferry_agent::home::{Home as AgentHome, now_unix};
use keyferry_common::crypto::keys::StreamRoot;
use keyferry_common::handshake::{Accepted, Kind, OfferParams, PendingOffer, Terms, make_offer};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::StreamId;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::{StreamKeys, derive_stream_keys};
use keyferry_common::transfer::{RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::message::{Message, Role};

use super::{Home, WAIT};

/// Terms for `size` bytes of files.
pub fn files(size: u64) -> Terms {
    Terms {
        kind: Kind::Files,
        size,
        size_known: true,
        resumes: None,
        receivers: 1,
        punch: Vec::new(),
    }
}

/// The stream root hostile tests use, so that they know the stream keys.
pub const ROOT: [u8; 32] = [9; 32];

/// A sender connected to the broker, with the receiver's key looked up.
pub struct HandSender {
    pub ctx: Ctx,
    pub conn: AgentConn,
    pub to: AgentName,
    pub to_key: PublicKey,
}

/// An accepted transfer: its keys, its data connection, and a sender stream
/// with the known [`ROOT`].
pub struct HandStream {
    pub accepted: Accepted,
    pub data: DataConn,
    pub stream: SendStream,
    pub keys: StreamKeys,
}

impl HandSender {
    /// Connects as `home` to the broker at `addr` and looks up `to`.
    pub async fn connect(addr: &str, home: &Home, to: &str) -> Self {
        let h = AgentHome::open(home.dir.path().to_owned()).unwrap();
        let ctx = Ctx {
            broker: addr.to_owned(),
            broker_fingerprint: None,
            identity: Arc::new(h.identity().unwrap()),
            home: h,
            name: AgentName::new(&home.name).unwrap(),
            seen: Default::default(),
        };
        let mut conn = connect(&ctx, Role::Sender).await.unwrap();
        let to = AgentName::new(to).unwrap();
        conn.writer
            .write(&Message::Lookup { name: to.clone() })
            .await
            .unwrap();
        let Some(Message::PeerKey { spki, .. }) = conn.reader.read_timeout(WAIT).await.unwrap()
        else {
            panic!("no key for {to}")
        };
        Self {
            ctx,
            to_key: PublicKey::from_spki_der(&spki).unwrap(),
            conn,
            to,
        }
    }

    /// Offers `terms` for stream `sid`; returns the pending offer and the
    /// broker's answer.
    pub async fn offer(&mut self, terms: Terms, sid: StreamId) -> (PendingOffer, Message) {
        let (pending, offer) = make_offer(OfferParams {
            identity: &self.ctx.identity,
            sender: self.ctx.name.clone(),
            receiver: self.to.clone(),
            receiver_key: &self.to_key,
            stream_id: sid,
            terms,
            now_unix: now_unix(),
        })
        .unwrap();
        self.conn
            .writer
            .write(&Message::Offer {
                to: self.to.clone(),
                offer,
            })
            .await
            .unwrap();
        let answer = self.conn.reader.read_timeout(WAIT).await.unwrap().unwrap();
        (pending, answer)
    }

    /// Offers `terms`, expects the accept, opens the data connection.
    pub async fn accepted(mut self, terms: Terms) -> HandStream {
        let sid = StreamId::random();
        let declared = terms.size;
        let (pending, answer) = self.offer(terms, sid).await;
        let Message::Accept { accept, .. } = answer else {
            panic!("not accepted: {answer:?}")
        };
        let tid = pending.transfer_id();
        let accepted = pending.handle_accept(&accept).unwrap();
        let ticket = await_ticket(&self.ctx, &mut self.conn, tid).await.unwrap();
        let data = open_data(&self.ctx, tid, ticket).await.unwrap();
        let stream = SendStream::with_root(
            StreamRoot::from_bytes(ROOT),
            sid,
            declared,
            true,
            StreamStart::fresh(),
            RekeyPolicy::default(),
            Instant::now(),
        );
        HandStream {
            accepted,
            data,
            stream,
            keys: derive_stream_keys(&StreamRoot::from_bytes(ROOT), &sid),
        }
    }
}

impl HandStream {
    /// Writes the root for the receiver, and the manifest `body` (any bytes).
    pub async fn head(&mut self, body: &[u8]) {
        let root = self.stream.root_for(&self.accepted.pair);
        self.data.writer.write_frame(root.frame()).await.unwrap();
        let manifest = self.stream.manifest(body).unwrap();
        self.data
            .writer
            .write_frame(manifest.frame())
            .await
            .unwrap();
    }

    /// The receiver's answer on the data connection.
    pub async fn answer(&mut self) -> Option<Message> {
        self.data.reader.read_timeout(WAIT).await.ok().flatten()
    }
}

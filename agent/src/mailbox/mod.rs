//! The offline mailbox on the agent's side (PROTOCOL.md §2.8, §3.4): the
//! receiver's prekeys ([`prekeys`]: the private halves in its home, made and
//! topped up while it is online) and the receipts it signed ([`signed`]: to
//! send one again), and the sender's record of what it stored ([`outbox`]:
//! to check the receipts the broker returns later). Files only: nothing here
//! holds a socket.

pub mod outbox;
pub mod prekeys;
pub mod signed;

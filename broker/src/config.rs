//! The broker's limits and access policy, with their defaults.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;

/// Limits on what peers may do. Every default is documented in the README.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest frame before a connection is relaying (Hello, Auth, offers, lists).
    /// Relayed chunk frames may be up to the protocol's `MAX_FRAME_LEN`.
    pub max_control_frame: usize,
    /// Time for the TLS handshake plus `Hello` and `Auth`.
    pub handshake_timeout: Duration,
    /// Longest silence on a sender connection or in a relay before it is cut.
    pub idle_timeout: Duration,
    /// How long a sender waits for the receiver to accept or refuse.
    pub answer_timeout: Duration,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Most connections from one IP address that have not authenticated yet;
    /// a newer one cuts the oldest.
    pub max_unauthenticated_per_ip: usize,
    /// Most offers one agent name may make per minute.
    pub offers_per_minute: usize,
    /// Most transfers one agent name may be sending at once.
    pub max_transfers_per_agent: usize,
    /// On shutdown, how long running transfers may go on before they are cut.
    pub shutdown_grace: Duration,
    /// How often the broker pings each receiver; one that has said nothing
    /// for two intervals is dropped (and its name goes offline).
    pub keepalive: Duration,
    /// The mailbox's limits where they differ from its defaults (which
    /// depend on the data dir's free space).
    pub store: StoreLimits,
}

/// The mailbox limits an operator set (`--store-*`); `None` keeps the
/// default ([`crate::mailbox::MailboxLimits::defaults_for`]).
#[derive(Debug, Clone, Default)]
pub struct StoreLimits {
    /// Bytes stored for everyone.
    pub total: Option<u64>,
    /// Bytes stored for one receiver.
    pub per_receiver: Option<u64>,
    /// Bytes stored from one sender.
    pub per_sender: Option<u64>,
    /// How long a stored transfer waits (at most 30 days).
    pub max_age: Option<Duration>,
    /// Transfers stored for one receiver.
    pub per_receiver_count: Option<usize>,
    /// Prekey fetches per sender per minute.
    pub fetches_per_minute: Option<usize>,
}

/// Longest a stored transfer may wait: a stored offer stays valid 35 days
/// (PROTOCOL.md §3.4), and its receiver needs some of that to pick it up.
pub const MAX_STORE_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

impl StoreLimits {
    /// The mailbox's limits: `defaults` with these overrides applied.
    pub fn apply(
        &self,
        mut defaults: crate::mailbox::MailboxLimits,
    ) -> crate::mailbox::MailboxLimits {
        if let Some(v) = self.total {
            defaults.total = v;
        }
        if let Some(v) = self.per_receiver {
            defaults.per_receiver = v;
        }
        if let Some(v) = self.per_sender {
            defaults.per_sender = v;
        }
        if let Some(v) = self.max_age {
            defaults.max_age = v.min(MAX_STORE_AGE);
        }
        if let Some(v) = self.per_receiver_count {
            defaults.per_receiver_count = v;
        }
        if let Some(v) = self.fetches_per_minute {
            defaults.fetches_per_minute = v;
        }
        defaults
    }
}

/// Smallest accepted control-frame limit: a maximal signed offer plus envelope.
pub const MIN_CONTROL_FRAME: usize = keyferry_common::handshake::MAX_OFFER_LEN + 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_control_frame: 16 << 10,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            answer_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_ip: 256,
            max_unauthenticated_per_ip: 64,
            offers_per_minute: 30,
            max_transfers_per_agent: 4,
            shutdown_grace: Duration::from_secs(30),
            keepalive: Duration::from_secs(20),
            store: StoreLimits::default(),
        }
    }
}

/// Who may authenticate.
#[derive(Debug, Clone, Default)]
pub enum AccessPolicy {
    /// Anyone; the first key to register a name owns it. The default on loopback.
    #[default]
    Open,
    /// Only these name/fingerprint pairs.
    Allowlist(HashSet<(AgentName, Fingerprint)>),
}

impl AccessPolicy {
    /// Reads an allowlist file: one `<name> <SHA256:fingerprint>` per line, `#` comments.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut set = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                format!(
                    "{} line {}: expected `<name> <SHA256:fingerprint>`",
                    path.display(),
                    i + 1
                )
            };
            let mut fields = line.split_whitespace();
            let (Some(name), Some(fp), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad());
            };
            let name = AgentName::new(name).map_err(|_| bad())?;
            let fp = fp.parse::<Fingerprint>().map_err(|_| bad())?;
            set.insert((name, fp));
        }
        Ok(Self::Allowlist(set))
    }

    /// A name for this policy that every broker with the same policy gives:
    /// `open`, or `sha256:` and the hex SHA-256 of its sorted `name SP
    /// fingerprint LF` lines (brokers of a cluster compare it).
    pub fn digest(&self) -> String {
        use sha2::Digest as _;
        match self {
            Self::Open => "open".into(),
            Self::Allowlist(set) => {
                let mut lines: Vec<String> =
                    set.iter().map(|(n, f)| format!("{n} {f}\n")).collect();
                lines.sort();
                format!(
                    "sha256:{}",
                    hex::encode(sha2::Sha256::digest(lines.concat()))
                )
            }
        }
    }

    /// Whether `name` with key `fp` may authenticate.
    pub fn allows(&self, name: &AgentName, fp: &Fingerprint) -> bool {
        match self {
            Self::Open => true,
            Self::Allowlist(set) => set.contains(&(name.clone(), *fp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_files_parse_and_match_name_and_key_together() {
        let dir = std::env::temp_dir().join(format!("keyferry-allow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fp = Fingerprint([7; 32]);
        let path = dir.join("allow");
        std::fs::write(&path, format!("# who may connect\nalice {fp}\n\n")).unwrap();
        let policy = AccessPolicy::from_file(&path).unwrap();
        let alice = AgentName::new("alice").unwrap();
        assert!(policy.allows(&alice, &fp));
        assert!(!policy.allows(&alice, &Fingerprint([8; 32])));
        assert!(!policy.allows(&AgentName::new("bob").unwrap(), &fp));
        // The digest ignores order and comments, and tells policies apart.
        let (a, b) = (Fingerprint([7; 32]), Fingerprint([9; 32]));
        std::fs::write(&path, format!("alice {a}\nbob {b}\n")).unwrap();
        let one = AccessPolicy::from_file(&path).unwrap().digest();
        std::fs::write(&path, format!("# reordered\nbob {b}\nalice {a}\n")).unwrap();
        assert_eq!(AccessPolicy::from_file(&path).unwrap().digest(), one);
        assert!(one.starts_with("sha256:"));
        assert_ne!(policy.digest(), one);
        assert_eq!(AccessPolicy::Open.digest(), "open");
        std::fs::write(&path, "alice not-a-fingerprint\n").unwrap();
        assert!(
            AccessPolicy::from_file(&path)
                .unwrap_err()
                .contains("line 1")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

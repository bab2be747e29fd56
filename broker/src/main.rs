//! `broker [--listen ADDR] [--data-dir DIR] [--cluster nats://HOST:PORT
//! [--advertise ADDR] [--broker-id ID]] [limits] [access policy]`

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keyferry_broker::cluster::{self, Member};
use keyferry_broker::config::{MIN_CONTROL_FRAME, StoreLimits};
use keyferry_broker::logs::{self, LogFormat};
use keyferry_broker::{AccessPolicy, Broker, DEFAULT_ADDR, Limits};
use keyferry_common::units::{parse_duration, parse_keepalive, parse_size};

/// The keyferry broker: authenticates agents and relays their end-to-end
/// encrypted transfers. It never sees a file, a file name or a key.
///
/// On start it prints the address it listens on and its certificate
/// fingerprint; agents pin that fingerprint on first contact (or take it with
/// --broker-fingerprint). Names are bound to the first key that registers them.
///
/// Listening on a non-loopback address needs an access policy: --allow-file,
/// or an explicit --allow-any-agent.
#[derive(Debug, Parser)]
#[command(name = "broker", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the real one is printed).
    #[arg(long, default_value = DEFAULT_ADDR, value_name = "ADDR")]
    listen: String,
    /// Where the certificate, its key and the name registry live
    /// [default: $XDG_DATA_HOME/keyferry/broker or ~/.local/share/keyferry/broker].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Join a cluster of brokers through this NATS server (with JetStream):
    /// names, presence, offers and the mailbox (stored transfers) are
    /// shared, so an agent on any broker can send to an agent on any other.
    /// Without it the broker stands alone.
    #[arg(long, value_name = "URL", help_heading = "Cluster")]
    cluster: Option<String>,
    /// The address agents and other brokers' senders use to reach this
    /// broker [default: the address it listens on].
    #[arg(
        long,
        value_name = "ADDR",
        requires = "cluster",
        help_heading = "Cluster"
    )]
    advertise: Option<String>,
    /// This broker's id in the cluster: letters, digits, '-', '_' [default:
    /// one made on first start and kept in the data dir].
    #[arg(
        long,
        value_name = "ID",
        requires = "cluster",
        help_heading = "Cluster"
    )]
    broker_id: Option<String>,
    /// Print every broker of the cluster (address and certificate
    /// fingerprint) as lines for an agent's known_brokers file, and exit.
    #[arg(long, requires = "cluster", help_heading = "Cluster")]
    list_brokers: bool,

    /// Only these agents may connect: a file of `<name> <SHA256:fingerprint>` lines.
    #[arg(long, value_name = "FILE", help_heading = "Access policy")]
    allow_file: Option<PathBuf>,
    /// Let any agent register a free name, even on a non-loopback address.
    #[arg(long, conflicts_with = "allow_file", help_heading = "Access policy")]
    allow_any_agent: bool,

    /// Largest message before a transfer starts (hello, auth, offers).
    #[arg(long, value_name = "SIZE", default_value = "16KiB", value_parser = parse_size, help_heading = "Limits")]
    max_control_frame: u64,
    /// Time allowed for TLS, hello and authentication.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration, help_heading = "Limits")]
    handshake_timeout: Duration,
    /// Longest silence from a sender, or in a transfer, before it is cut.
    #[arg(long, value_name = "DUR", default_value = "120s", value_parser = parse_duration, help_heading = "Limits")]
    idle_timeout: Duration,
    /// Most simultaneous connections.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4096,
        help_heading = "Limits"
    )]
    max_connections: usize,
    /// Most simultaneous connections from one IP address.
    #[arg(long, value_name = "N", default_value_t = 256, help_heading = "Limits")]
    max_connections_per_ip: usize,
    /// Most connections from one IP address still in their handshake (not yet
    /// authenticated); a newer one cuts the oldest, so idle handshakes cannot
    /// lock out the agents behind an address. Keep it below the per-IP limit.
    #[arg(long, value_name = "N", default_value_t = 64, help_heading = "Limits")]
    max_unauthenticated_per_ip: usize,
    /// Most offers one agent may make per minute.
    #[arg(long, value_name = "N", default_value_t = 30, help_heading = "Limits")]
    offers_per_minute: usize,
    /// Most transfers one agent may be sending at once.
    #[arg(long, value_name = "N", default_value_t = 4, help_heading = "Limits")]
    max_transfers_per_agent: usize,
    /// On SIGTERM or Ctrl-C: stop accepting, end control connections, and let
    /// running transfers finish for this long before cutting them.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration, help_heading = "Limits")]
    shutdown_grace: Duration,
    /// Ping every receiver this often; one that has said nothing for two
    /// intervals (frozen, or its network gone) is dropped and goes offline
    /// (1s to 60m).
    #[arg(long, value_name = "DUR", default_value = "20s", value_parser = parse_keepalive, help_heading = "Limits")]
    keepalive: Duration,

    /// Most bytes kept for offline receivers in all (`--store` senders)
    /// [default: 25 % of the data dir's free space, at most 10 GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Mailbox")]
    store_total: Option<u64>,
    /// Most bytes kept for one receiver [default: 2GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Mailbox")]
    store_per_receiver: Option<u64>,
    /// Most bytes kept from one sender [default: 2GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Mailbox")]
    store_per_sender: Option<u64>,
    /// How long a stored transfer waits for its receiver before it is
    /// deleted (its sender's receipt then says expired); at most 30 days
    /// [default: 7d].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Mailbox")]
    store_max_age: Option<Duration>,
    /// Most transfers kept for one receiver [default: 32].
    #[arg(long, value_name = "N", help_heading = "Mailbox")]
    store_per_receiver_count: Option<usize>,
    /// Most prekey fetches one sender may make per minute, so that nobody
    /// drains a receiver's one-time prekeys [default: 10].
    #[arg(long, value_name = "N", help_heading = "Mailbox")]
    prekey_fetches_per_minute: Option<usize>,

    /// Serve Prometheus metrics at http://ADDR/metrics and a health check at
    /// http://ADDR/healthz (200, or 503 with the reason: shutting down, or
    /// the cluster unreachable). Off by default; give a loopback address
    /// unless the scraper is elsewhere: anyone who reaches it can read it.
    #[arg(long, value_name = "ADDR", help_heading = "Operating")]
    metrics: Option<String>,
    /// Also count offers by sender name in the metrics. Names are personal
    /// data: off by default, no other label ever carries one.
    #[arg(long, requires = "metrics", help_heading = "Operating")]
    metrics_agent_labels: bool,
    /// Log lines on stderr as text for people, or one JSON object per event.
    /// RUST_LOG filters either (e.g. `warn,keyferry_broker::session=info`).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Human, help_heading = "Operating")]
    log_format: LogFormat,

    /// Print a completion script for this shell (bash, zsh, fish, elvish,
    /// powershell) and exit. See the README for where to install it.
    #[arg(long, value_name = "SHELL", help_heading = "Documentation")]
    completions: Option<clap_complete::Shell>,
    /// Print the man page (roff) and exit: `broker --man > broker.1`.
    #[arg(long, conflicts_with = "completions", help_heading = "Documentation")]
    man: bool,
}

/// Writes `--completions` or `--man` output; `None` when neither was asked.
fn documentation(args: &Args) -> Option<ExitCode> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    if let Some(shell) = args.completions {
        clap_complete::generate(shell, &mut Args::command(), "broker", &mut out);
    } else if args.man {
        if let Err(e) = clap_mangen::Man::new(Args::command()).render(&mut out) {
            return Some(fail(format!("cannot render the man page: {e}"), 1));
        }
    } else {
        return None;
    }
    Some(match std::io::stdout().lock().write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("cannot write to standard output: {e}"), 1),
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn default_data_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("keyferry/broker"))
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("broker: {msg}");
    ExitCode::from(code)
}

/// Who this broker is in its cluster, from the flags and the data dir.
fn member(
    args: &Args,
    url: &str,
    data_dir: &std::path::Path,
    addr: Option<SocketAddr>,
    (fingerprint, policy): (keyferry_common::identity::Fingerprint, String),
) -> Result<Member, String> {
    let id = match &args.broker_id {
        Some(id) => id.clone(),
        None => cluster::stored_id(data_dir).map_err(|e| format!("broker id: {e}"))?,
    };
    cluster::check_id(&id).map_err(|e| e.to_string())?;
    let advertise = match (&args.advertise, addr) {
        (Some(a), _) => a.clone(),
        (None, Some(a)) if !a.ip().is_unspecified() => a.to_string(),
        _ => {
            return Err(format!(
                "--advertise ADDR is needed: agents cannot reach this broker at {}",
                args.listen
            ));
        }
    };
    if !keyferry_common::wire::message::advertised_address_ok(&advertise) {
        return Err(format!(
            "--advertise {:?} must be HOST:PORT, at most 255 characters, without spaces",
            keyferry_common::text::escape(&advertise)
        ));
    }
    Ok(Member {
        url: url.to_owned(),
        id,
        advertise,
        fingerprint,
        policy,
    })
}

/// `--list-brokers`: the cluster's brokers as agents pin them, in the
/// format of an agent's `known_brokers` file (a `#` line per broker with
/// its id and access policy, then `ADDRESS SHA256:… UNIX-TIME`).
async fn list_brokers(url: &str) -> ExitCode {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match cluster::list_brokers(url).await {
        Ok(brokers) => {
            let mut out = std::io::stdout().lock();
            for (id, line) in brokers {
                let (addr, fp, policy) = (line.address, line.fingerprint, line.policy);
                let _ = writeln!(out, "# broker {id} policy={policy}\n{addr} {fp} {now}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

/// Binds the `--metrics` address and hands it to the broker; the address
/// bound.
async fn metrics_listener(
    at: &str,
    agent_labels: bool,
    broker: &mut Broker,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| format!("cannot serve metrics on {at}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot serve metrics on {at}: {e}"))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics served on a non-loopback address: whoever reaches it can read them");
    }
    broker
        .serve_metrics(listener, agent_labels)
        .map_err(|e| e.to_string())?;
    Ok(addr)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = documentation(&args) {
        return code;
    }
    let rust_log = std::env::var("RUST_LOG").ok();
    if let Err(e) = logs::init(args.log_format, rust_log.as_deref()) {
        return fail(e, 2);
    }
    if args.list_brokers {
        return list_brokers(args.cluster.as_deref().unwrap_or_default()).await;
    }
    let Some(data_dir) = args.data_dir.clone().or_else(default_data_dir) else {
        return fail(
            "no --data-dir given and neither XDG_DATA_HOME nor HOME is set",
            2,
        );
    };
    let control = usize::try_from(args.max_control_frame).unwrap_or(usize::MAX);
    if control < MIN_CONTROL_FRAME {
        return fail(
            format!(
                "--max-control-frame must be at least {MIN_CONTROL_FRAME} bytes (a signed offer)"
            ),
            2,
        );
    }
    let limits = Limits {
        max_control_frame: control.min(keyferry_common::wire::frame::MAX_FRAME_LEN),
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections.max(1),
        max_connections_per_ip: args.max_connections_per_ip.max(1),
        max_unauthenticated_per_ip: args.max_unauthenticated_per_ip.max(1),
        offers_per_minute: args.offers_per_minute,
        max_transfers_per_agent: args.max_transfers_per_agent,
        shutdown_grace: args.shutdown_grace,
        keepalive: args.keepalive,
        store: StoreLimits {
            total: args.store_total,
            per_receiver: args.store_per_receiver,
            per_sender: args.store_per_sender,
            max_age: args.store_max_age,
            per_receiver_count: args.store_per_receiver_count,
            fetches_per_minute: args.prekey_fetches_per_minute,
        },
        ..Limits::default()
    };
    let policy = match &args.allow_file {
        Some(path) => match AccessPolicy::from_file(path) {
            Ok(p) => p,
            Err(e) => return fail(format!("allow file: {e}"), 2),
        },
        None => AccessPolicy::Open,
    };
    // Refuse an open broker on a non-loopback address before binding anything.
    let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(&args.listen).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => return fail(format!("cannot resolve --listen {}: {e}", args.listen), 2),
    };
    let loopback = !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback());
    if !loopback && args.allow_file.is_none() && !args.allow_any_agent {
        return fail(
            format!(
                "refusing to listen on the non-loopback address {} without an access policy: \
                 give --allow-file FILE (lines of `<name> <SHA256:fingerprint>`) to admit only those \
                 agents, or --allow-any-agent to let anyone register a free name",
                args.listen
            ),
            2,
        );
    }
    let listener = match tokio::net::TcpListener::bind(resolved.as_slice()).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.listen), 1),
    };
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let policy_digest = policy.digest();
    let mut broker = match Broker::open(data_dir.clone(), limits, policy) {
        Ok(b) => b,
        Err(e) => return fail(e, 1),
    };
    let metrics = match &args.metrics {
        Some(at) => match metrics_listener(at, args.metrics_agent_labels, &mut broker).await {
            Ok(addr) => Some(addr),
            Err(e) => return fail(e, 2),
        },
        None => None,
    };
    let shown = addr.map_or_else(|| args.listen.clone(), |a| a.to_string());
    if let Some(url) = &args.cluster {
        let me = (broker.fingerprint(), policy_digest);
        let member = match member(&args, url, &data_dir, addr, me) {
            Ok(m) => m,
            Err(e) => return fail(e, 2),
        };
        let joined = format!(
            "joined the cluster at {} as broker {} ({})",
            cluster::redact(url),
            member.id,
            member.advertise
        );
        if let Err(e) = broker.join_cluster(member).await {
            return fail(e, 1);
        }
        tracing::info!("{joined}");
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "keyferry broker listening on {shown}");
    let _ = writeln!(out, "broker fingerprint {}", broker.fingerprint());
    if let Some(at) = metrics {
        let _ = writeln!(
            out,
            "metrics at http://{at}/metrics, health at http://{at}/healthz"
        );
    }
    let _ = out.flush();
    drop(out);
    broker.run(listener, stop_signal()).await;
    ExitCode::SUCCESS
}

//! `broker [--listen ADDR] [--data-dir DIR]`

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keyferry_broker::{Broker, DEFAULT_ADDR, Limits};

/// The keyferry broker: authenticates agents and relays their end-to-end
/// encrypted transfers. It never sees a file, a file name or a key.
///
/// On start it prints the address it listens on and its certificate
/// fingerprint; agents pin that fingerprint on first contact (or take it with
/// --broker-fingerprint). Names are bound to the first key that registers them.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (the real one is printed).
    #[arg(long, default_value = DEFAULT_ADDR, value_name = "ADDR")]
    listen: String,
    /// Where the certificate, its key and the name registry live
    /// [default: $XDG_DATA_HOME/keyferry/broker or ~/.local/share/keyferry/broker].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn default_data_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("keyferry/broker"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let Some(data_dir) = args.data_dir.or_else(default_data_dir) else {
        eprintln!("broker: no --data-dir given and neither XDG_DATA_HOME nor HOME is set");
        return ExitCode::from(2);
    };
    let broker = match Broker::open(data_dir, Limits::default()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("broker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("broker: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a.to_string(),
        Err(_) => args.listen.clone(),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "keyferry broker listening on {addr}");
    let _ = writeln!(out, "broker fingerprint {}", broker.fingerprint());
    let _ = out.flush();
    drop(out);
    broker
        .run(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    ExitCode::SUCCESS
}

//! `agent`: the sender and receiver roles of keyferry. See `agent --help`.

use std::process::ExitCode;

use clap::Parser;
use keyferry_agent::{AgentError, Args, run};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => Err(AgentError::Interrupted),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

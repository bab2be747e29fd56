//! `agent`: the sender and receiver roles of keyferry. See `agent --help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keyferry_agent::{AgentError, Args, run};

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => Err(AgentError::Interrupted),
        }
    });
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            keyferry_agent::output::error_line(&e.to_string(), e.exit_code());
            ExitCode::from(e.exit_code())
        }
    };
    // A read of standard input that never returns (a pipe gone quiet) must
    // not keep the process alive once the transfer is over.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

//! `--completions SHELL` and `--man`: the command line described for a shell
//! and for man(1), generated from the same definition `--help` shows.

use std::io::Write as _;

use clap::CommandFactory as _;
use clap_complete::Shell;

use super::Args;
use crate::error::AgentError;

fn written(r: std::io::Result<()>) -> Result<(), AgentError> {
    r.map_err(|e| AgentError::Internal(format!("cannot write to standard output: {e}")))
}

/// Prints the completion script for `shell`.
pub fn completions(shell: Shell) -> Result<(), AgentError> {
    let mut cmd = Args::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "agent", &mut out);
    written(std::io::stdout().lock().write_all(&out))
}

/// Prints the man page (roff).
pub fn man() -> Result<(), AgentError> {
    let mut out = Vec::new();
    written(clap_mangen::Man::new(Args::command()).render(&mut out))?;
    written(std::io::stdout().lock().write_all(&out))
}

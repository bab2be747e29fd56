//! What the sender prints for each receiver that confirmed a transfer: one
//! line, or one JSON object with `--json`.

use crate::error::AgentError;
use crate::output::say;
use crate::send::Report;

/// Prints one receiver's verified transfer: a JSON object, or a line.
pub fn print_report(report: &Report, label: &str, json: bool) -> Result<(), AgentError> {
    if json {
        let line =
            serde_json::to_string(report).map_err(|e| AgentError::Internal(e.to_string()))?;
        say!("{line}");
        return Ok(());
    }
    let resumed = if report.resumed_from > 0 {
        format!(", resumed at byte {}", report.resumed_from)
    } else {
        String::new()
    };
    let files = match report.files {
        0 => String::new(),
        1 => "1 file, ".into(),
        n => format!("{n} files, "),
    };
    let over = match report.connections {
        0 | 1 => String::new(),
        n => format!(" over {n} connections"),
    };
    say!(
        "sent {label} to {} ({files}{} bytes in {:.2} s, {} session keys, sha256 {}{resumed}, {}{over}) — receipt verified",
        report.peer,
        report.bytes,
        report.seconds,
        report.session_keys,
        report.sha256,
        report.via
    );
    Ok(())
}

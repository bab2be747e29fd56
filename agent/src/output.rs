//! What the agent tells its user: results on stdout ([`say`]), notices on stderr (resumes,
//! reconnects, cleaned-up leftovers), which `--quiet` silences, and whether
//! progress bars and colour are wanted (only on a terminal, never with
//! `NO_COLOR` for colour). Errors, warnings about what was left out, and
//! `NEW KEY` lines are never silenced: they are not for `--quiet` to hide.
//!
//! The setting is process-wide, as a log level is: it is set once from the
//! command line, before anything is printed.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressDrawTarget};

use crate::logline::{self, Level};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences notices and progress bars from now on (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` is on.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether a progress bar may be drawn on stderr: a terminal, and not `--quiet`.
pub fn bars() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// Whether colour may be used: a bar may be drawn, and `NO_COLOR` is unset
/// or empty (<https://no-color.org>).
pub fn colour() -> bool {
    bars() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Every progress bar of the process, drawn together: a receiver with
/// several transfers at once draws one line each.
pub fn all_bars() -> &'static MultiProgress {
    BARS.get_or_init(MultiProgress::new)
}

/// Runs `f` (which prints) with the bars, if any, lifted out of the way.
pub fn above_bars<T>(f: impl FnOnce() -> T) -> T {
    match BARS.get() {
        Some(bars) => bars.suspend(f),
        None => f(),
    }
}

/// Takes the bars off the terminal (they go on counting, undrawn) while a
/// question is asked; [`show_bars`] puts them back.
pub fn hide_bars() {
    if let Some(bars) = BARS.get() {
        let _ = bars.clear();
        bars.set_draw_target(ProgressDrawTarget::hidden());
    }
}

/// Draws the bars again after [`hide_bars`].
pub fn show_bars() {
    if let Some(bars) = BARS.get() {
        bars.set_draw_target(ProgressDrawTarget::stderr());
    }
}

/// Where lines go instead of stdout and stderr while a line editor owns the
/// terminal (a chat): above the line being typed.
type Printer = Box<dyn FnMut(String) + Send>;
static PRINTER: Mutex<Option<Printer>> = Mutex::new(None);

/// Sends every line from now on to `printer` (a chat's line editor), until
/// [`clear_printer`].
pub fn set_printer(printer: Printer) {
    if let Ok(mut p) = PRINTER.lock() {
        *p = Some(printer);
    }
}

/// Lines go to stdout and stderr again.
pub fn clear_printer() {
    if let Ok(mut p) = PRINTER.lock() {
        *p = None;
    }
}

/// Prints `line` to the printer if one is set; otherwise `false`.
fn printed(line: &str) -> bool {
    match PRINTER.lock() {
        Ok(mut p) => match p.as_mut() {
            Some(print) => {
                print(line.to_owned());
                true
            }
            None => false,
        },
        Err(_) => false,
    }
}

/// A line on stderr (above the bars, or above a chat's input line) that
/// `--quiet` does not silence: warnings, `NEW KEY` lines.
pub fn err_line(line: &str) {
    log_line(Level::Warn, line, &[]);
}

/// A notice on stderr (see [`notice!`]).
pub fn info_line(line: &str) {
    log_line(Level::Info, line, &[]);
}

/// The error the agent exits with, on stderr: `agent: ERROR` as text, or a
/// JSON line with its exit code.
pub fn error_line(error: &str, exit_code: u8) {
    if logline::json() {
        log_line(Level::Error, error, &[("exit_code", exit_code.into())]);
    } else {
        log_line(Level::Error, &format!("agent: {error}"), &[]);
    }
}

/// A line on stderr in the `--log-format` asked for.
fn log_line(level: Level, line: &str, fields: &[(&str, serde_json::Value)]) {
    if printed(line) {
        return;
    }
    if logline::json() {
        let json = logline::render(level, line, fields);
        above_bars(|| eprintln!("{json}"));
    } else {
        above_bars(|| eprintln!("{line}"));
    }
}

/// A line on stdout (above the bars, or above a chat's input line); a
/// stdout that was closed drops it.
pub fn out_line(line: &str) {
    use std::io::Write as _;
    if !printed(line) {
        above_bars(|| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        });
    }
}

/// Prints a notice on stderr unless `--quiet`.
macro_rules! notice {
    ($($arg:tt)*) => {
        if !$crate::output::quiet() {
            $crate::output::info_line(&format!($($arg)*));
        }
    };
}
pub(crate) use notice;

/// Prints a line on stdout, as `println!` does, but a stdout that was closed
/// (`agent --list | head -1`, a JSON reader that quit) is not worth a panic:
/// the line is dropped and the agent goes on.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::out_line(&format!($($arg)*))
    };
}
pub(crate) use say;

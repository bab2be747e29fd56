//! What the agent tells its user: results on stdout ([`say`]), notices on stderr (resumes,
//! reconnects, cleaned-up leftovers), which `--quiet` silences, and whether
//! progress bars and colour are wanted (only on a terminal, never with
//! `NO_COLOR` for colour). Errors, warnings about what was left out, and
//! `NEW KEY` lines are never silenced: they are not for `--quiet` to hide.
//!
//! The setting is process-wide, as a log level is: it is set once from the
//! command line, before anything is printed.

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{MultiProgress, ProgressDrawTarget};

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

/// Prints a notice on stderr unless `--quiet`.
macro_rules! notice {
    ($($arg:tt)*) => {
        if !$crate::output::quiet() {
            $crate::output::above_bars(|| eprintln!($($arg)*));
        }
    };
}
pub(crate) use notice;

/// Prints a line on stdout, as `println!` does, but a stdout that was closed
/// (`agent --list | head -1`, a JSON reader that quit) is not worth a panic:
/// the line is dropped and the agent goes on.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::output::above_bars(|| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, $($arg)*);
            let _ = out.flush();
        });
    }};
}
pub(crate) use say;

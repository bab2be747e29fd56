//! The progress bar of either role: the only module that knows indicatif.
//! The transfer code reports `(done, epoch)`, where an attempt starts and why
//! it waits. It is drawn on stderr, only when stderr is a terminal and
//! `--quiet` is off ([`crate::output::bars`]), in colour unless `NO_COLOR`.

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::output::{self, notice};

/// `n` bytes as people read them: `47.70 MiB`.
pub fn human_bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// A progress display, or nothing.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` bytes (`None`: a size not known up front) if
    /// `enabled` and bars are wanted at all ([`output::bars`]).
    pub fn new(total: Option<u64>, enabled: bool) -> Self {
        let bar = (enabled && output::bars()).then(|| {
            let (bar, template) = match (total, output::colour()) {
                (Some(t), true) => (
                    ProgressBar::new(t),
                    "{bar:30.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                ),
                (Some(t), false) => (
                    ProgressBar::new(t),
                    "[{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                ),
                (None, _) => (
                    ProgressBar::no_length(),
                    "{spinner} {bytes} {binary_bytes_per_sec} {msg}",
                ),
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message("key #1");
            output::all_bars().add(bar)
        });
        Self { bar }
    }

    /// No bar.
    pub fn none() -> Self {
        Self { bar: None }
    }

    /// `done` bytes are sent; the current session key is number `epoch + 1`.
    pub fn update(&self, done: u64, epoch: u32) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(format!("key #{}", u64::from(epoch) + 1));
        }
    }

    /// A new attempt begins with `offset` bytes already at the receiver.
    pub fn start_at(&self, offset: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(offset);
            bar.reset_eta();
            if offset > 0 {
                let total = bar.length().unwrap_or(0).max(1);
                bar.set_message(format!(
                    "resuming at {:.1} % (verified)",
                    offset as f64 * 100.0 / total as f64
                ));
            }
        }
    }

    /// The transfer is interrupted: says why, and that it waits.
    pub fn suspend(&self, why: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(why.to_owned()),
            None => notice!("{why}"),
        }
    }

    /// `ok` of `of` receivers confirmed the transfer.
    pub fn done(&self, ok: usize, of: usize) {
        if let Some(bar) = &self.bar
            && of > 1
        {
            bar.set_message(format!("{ok}/{of} receivers done"));
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            output::all_bars().remove(bar);
        }
    }
}

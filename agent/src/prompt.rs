//! Questions to the person at the terminal: one at a time (several offers
//! at once are asked one after the other), each with a deadline, with the
//! progress bars lifted out of the way while it is asked so that neither
//! garbles the other. What was typed before a question does not answer it.
//! The question is on stderr; the answer is a line on stdin.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::os::fd::AsFd as _;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::termios::{QueueSelector, tcflush};

use crate::output;

/// The person's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `y` or `yes` (any case).
    Yes,
    /// Anything else, or the end of the input.
    No,
    /// Nothing within the time.
    NoAnswer,
}

/// Whether there is a person to ask: stdin and stderr are terminals.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks one question at a time.
#[derive(Debug, Default)]
pub struct Prompter {
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Prompter {
    /// A prompter for this process's terminal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks `question` (which ends in `[y/N]`) after any question asked
    /// before it, and waits for the answer until `within` from now: the
    /// time spent waiting for its turn counts (the sender waits no longer),
    /// and a question whose time ran out while others were asked is not
    /// shown at all.
    pub async fn ask(&self, question: String, within: Duration) -> Answer {
        let deadline = Instant::now() + within;
        let _turn = self.one_at_a_time.lock().await;
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_secs(1) {
            return Answer::NoAnswer;
        }
        tokio::task::spawn_blocking(move || ask_now(&question, left))
            .await
            .unwrap_or(Answer::No)
    }
}

/// Asks on this thread (blocking).
fn ask_now(question: &str, within: Duration) -> Answer {
    output::hide_bars();
    let stdin = std::io::stdin();
    // Keys pressed before the question was shown do not answer it.
    let _ = tcflush(stdin.as_fd(), QueueSelector::IFlush);
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{question} ");
    let _ = err.flush();
    drop(err);
    let answer = read_answer(within);
    let said = match answer {
        Answer::Yes => "accepted",
        Answer::No => "declined",
        Answer::NoAnswer => "no answer: refused",
    };
    if answer == Answer::NoAnswer {
        // The cursor still stands after the question.
        eprintln!();
    }
    eprintln!("  ({said})");
    output::show_bars();
    answer
}

/// Reads one line within `within`: `y`/`yes` is yes, anything else no.
fn read_answer(within: Duration) -> Answer {
    let deadline = Instant::now() + within;
    let stdin = std::io::stdin();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Answer::NoAnswer;
        }
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        let fd = stdin.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return Answer::No,
        }
    }
    // A terminal in its usual (canonical) mode is readable once a whole
    // line was typed.
    let mut line = String::new();
    match stdin.lock().read_line(&mut line) {
        Ok(0) | Err(_) => Answer::No,
        Ok(_) => match line.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => Answer::Yes,
            _ => Answer::No,
        },
    }
}

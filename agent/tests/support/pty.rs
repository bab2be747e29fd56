//! A real process on a pseudo-terminal, as a person would run it: keys typed
//! into the terminal, and the screen it draws read back (the terminal's
//! output fed to a `vt100` screen), for the tests of what a person does at
//! a terminal (the picker, the question before a transfer, the chat).

#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{Winsize, tcsetwinsize};

/// Keys as a terminal sends them.
pub mod keys {
    pub const UP: &[u8] = b"\x1b[A";
    pub const DOWN: &[u8] = b"\x1b[B";
    pub const ENTER: &[u8] = b"\r";
    pub const ESC: &[u8] = b"\x1b";
    pub const SPACE: &[u8] = b" ";
    pub const CTRL_D: &[u8] = b"\x04";
    pub const CTRL_C: &[u8] = b"\x03";
}

/// A process whose stdin, stdout and stderr are one pseudo-terminal.
pub struct Pty {
    pub child: Child,
    master: File,
    screen: Arc<Mutex<vt100::Parser>>,
    /// Everything it wrote, as text with the escape sequences in it.
    raw: Arc<Mutex<Vec<u8>>>,
    /// Set once the terminal's output was read to its end.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Pty {
    /// Starts `cmd` on a new terminal of 40 rows and 160 columns.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_sized(cmd, 40, 160)
    }

    /// Starts `cmd` on a new terminal of `rows` and `cols`.
    pub fn spawn_sized(mut cmd: Command, rows: u16, cols: u16) -> Self {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_noctty())
            .open(name.to_str().unwrap())
            .unwrap();
        tcsetwinsize(
            &master,
            Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .unwrap();
        cmd.env("TERM", "xterm-256color")
            .env("NO_COLOR", "1")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn().expect("binary starts");
        let master = File::from(master);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(rows, cols, 1000)));
        let raw: Arc<Mutex<Vec<u8>>> = Arc::default();
        let mut reader = master.try_clone().unwrap();
        let (s, r) = (Arc::clone(&screen), Arc::clone(&raw));
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let end = Arc::clone(&ended);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the process and its children closed the terminal.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().process(&buf[..n]);
                r.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            end.store(true, std::sync::atomic::Ordering::Release);
        });
        Self {
            child,
            master,
            screen,
            raw,
            ended,
        }
    }

    /// Types `bytes`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
        self.master.flush().unwrap();
    }

    /// Types `line` and Enter.
    pub fn line(&mut self, line: &str) {
        self.send(line.as_bytes());
        self.send(b"\r");
    }

    /// The screen as it stands, one string per row, trailing spaces cut.
    pub fn screen(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Everything the process wrote so far, escape sequences removed
    /// (lines that scrolled off the screen included).
    pub fn transcript(&self) -> String {
        let raw = self.raw.lock().unwrap().clone();
        let mut p = vt100::Parser::new(1, 1000, 0);
        let mut out = String::new();
        for line in raw.split(|b| *b == b'\n') {
            p.process(b"\x1b[2J\x1b[H");
            p.process(line);
            out.push_str(p.screen().contents().trim_end());
            out.push('\n');
        }
        out
    }

    /// Waits until the screen shows `needle`; returns the screen.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {needle:?} within {limit:?}; it shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; its exit code (None: killed by a signal).
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // What it wrote last may still be on its way to the screen:
                // read the terminal to its end first (bounded).
                let drained = Instant::now() + Duration::from_secs(5);
                while !self.ended.load(std::sync::atomic::Ordering::Acquire)
                    && Instant::now() < drained
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}; the screen shows:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `O_NOCTTY`: the test process must not take the terminal as its own.
fn libc_o_noctty() -> i32 {
    rustix::fs::OFlags::NOCTTY.bits() as i32
}

//! `dynexec chat` through a pseudo-terminal, as a user runs it: turns keep the conversation
//! and prefill only what is new, Ctrl-C stops an answer but not the program, /exit leaves.
#![cfg(unix)]

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A process on the slave side of a fresh pseudo-terminal, its controlling terminal.
struct Terminal {
    master: std::fs::File,
    screen: Arc<Mutex<String>>,
    child: std::process::Child,
}

impl Terminal {
    fn spawn(args: &[&str]) -> Self {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors we then own.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both descriptors are fresh and owned here alone.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut command = Command::new(env!("CARGO_BIN_EXE_dynexec"));
        command
            .args(["--device", "cpu"])
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Its own session, with the pty as controlling terminal: Ctrl-C typed there
                // reaches it as SIGINT, as in a real terminal.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start dynexec chat");
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(String::new()));
        let (mut reader, shared) = (master.try_clone().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shared
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            master,
            screen,
            child,
        }
    }

    fn type_line(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    fn screen(&self) -> String {
        self.screen.lock().unwrap().clone()
    }

    /// Waits until the screen after byte `from` contains `needle`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let screen = self.screen();
            if let Some(at) = screen.get(from..).and_then(|s| s.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` never appeared; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The numbers of the turn-statistics line after byte `from`, and where it ends.
    fn stats(&self, from: usize) -> ([usize; 4], String, usize) {
        let start = self.wait_for("[prompt ", from) - "[prompt ".len();
        let end = self.wait_for("]", start);
        let line = self.screen()[start..end].to_string();
        let numbers: Vec<usize> = line
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .filter_map(|w| w.parse().ok())
            .collect();
        // prompt, reused, prefilled, (ms), generated
        ([numbers[0], numbers[1], numbers[2], numbers[4]], line, end)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[test]
fn chat_keeps_context_prefills_only_new_turns_and_survives_ctrl_c() {
    let mut term = Terminal::spawn(&[
        "chat",
        "-n",
        "200",
        "--system",
        "You are a helpful assistant.",
    ]);
    let at = term.wait_for("> ", 0);
    term.type_line("My name is Ada. Say hello to me.");
    let ([prompt1, reused1, prefilled1, generated1], _, at) = term.stats(at);
    assert_eq!((reused1, prefilled1), (0, prompt1));
    let at = term.wait_for("> ", at);
    term.type_line("What is my name?");
    let ([prompt2, reused2, prefilled2, _], line, at) = term.stats(at);
    // The first turn's prompt and answer are in the cache; only the new turn is prefilled.
    assert!(prompt2 > prompt1 + generated1, "{line}");
    assert!(reused2 + 2 >= prompt1 + generated1, "{line}");
    assert_eq!(prefilled2, prompt2 - reused2, "{line}");
    assert!(prefilled2 < 20, "{line}");

    // Ctrl-C mid-answer stops the answer (200 tokens uninterrupted), and the program takes
    // the next line.
    let at = term.wait_for("> ", at);
    term.type_line("/reset");
    let at = term.wait_for("conversation forgotten", at);
    let at = term.wait_for("> ", at);
    term.type_line("List the numbers from 1 to 100.");
    let answering = term.wait_for("1, 2, 3", at);
    term.master.write_all(&[3]).unwrap();
    let ([_, _, _, generated], line, at) = term.stats(answering);
    assert!(line.contains("interrupted") && generated < 200, "{line}");
    term.wait_for("> ", at);
    term.type_line("/exit");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = term.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "/exit did not end the program:\n{}",
            term.screen()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", term.screen());
    assert!(!term.screen().contains("panicked"));
}

//! A child's output pipe, read without blocking the event loop and cut into lines.
//!
//! Used for `--exec` output (copied into the log) and for a rehearsal's hook (parsed into
//! the timeline). The owner watches `fd()` on the event loop, then calls `read_lines` once
//! per readiness; this module must never block beyond that one `read`. Each byte is looked at
//! once, and a line longer than `MAX_LINE` is handed over in pieces, so output without
//! newlines costs time in proportion to its size, and memory not at all.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The longest line handed over whole; a longer one comes in pieces of this size.
pub const MAX_LINE: usize = 64 * 1024;

pub struct LinePipe {
    file: Option<File>,
    /// The unfinished last line.
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no newline.
    scanned: usize,
}

impl LinePipe {
    pub fn new(fd: Option<impl Into<OwnedFd>>) -> LinePipe {
        LinePipe {
            file: fd.map(|fd| File::from(fd.into())),
            pending: Vec::new(),
            scanned: 0,
        }
    }

    /// The fd to poll; `None` once the pipe has reached its end.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(AsFd::as_fd)
    }

    pub fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Reads what is there (one `read`) and hands over each complete line, without its
    /// newline. At the end of the pipe, hands over the unfinished last line too.
    pub fn read_lines(&mut self, mut line: impl FnMut(&[u8])) {
        let Some(file) = &mut self.file else { return };
        let mut chunk = [0u8; 4096];
        match file.read(&mut chunk) {
            Ok(0) | Err(_) => {
                self.file = None;
                self.flush(line);
            }
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                let mut start = 0;
                loop {
                    let from = start.max(self.scanned);
                    match self.pending[from..].iter().position(|&b| b == b'\n') {
                        Some(at) => {
                            line(&self.pending[start..from + at]);
                            start = from + at + 1;
                        }
                        None if self.pending.len() - start >= MAX_LINE => {
                            line(&self.pending[start..start + MAX_LINE]);
                            start += MAX_LINE;
                        }
                        None => break,
                    }
                }
                self.pending.drain(..start);
                self.scanned = self.pending.len();
            }
        }
    }

    /// Hands over an unfinished last line, if any.
    pub fn flush(&mut self, mut line: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            line(&self.pending);
            self.pending.clear();
            self.scanned = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_are_cut_across_reads_and_the_last_is_flushed() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut writer = File::from(writer);
        let mut pipe = LinePipe::new(Some(reader));
        let mut got: Vec<String> = Vec::new();
        writer.write_all(b"one\ntw").unwrap();
        pipe.read_lines(|l| got.push(String::from_utf8_lossy(l).into()));
        writer.write_all(b"o\nthree").unwrap();
        drop(writer);
        while pipe.is_open() {
            pipe.read_lines(|l| got.push(String::from_utf8_lossy(l).into()));
        }
        assert_eq!(got, ["one", "two", "three"]);
    }

    #[test]
    fn a_line_without_end_comes_in_pieces() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut writer = File::from(writer);
        let mut pipe = LinePipe::new(Some(reader));
        let writing = std::thread::spawn(move || {
            let block = vec![b'x'; 1000];
            for _ in 0..300 {
                writer.write_all(&block).unwrap();
            }
            writer.write_all(b"\nend").unwrap();
        });
        let mut sizes = Vec::new();
        while pipe.is_open() {
            pipe.read_lines(|l| sizes.push(l.len()));
        }
        writing.join().unwrap();
        assert_eq!(
            sizes,
            [
                MAX_LINE,
                MAX_LINE,
                MAX_LINE,
                MAX_LINE,
                300_000 - 4 * MAX_LINE,
                3
            ]
        );
        assert!(pipe.pending.capacity() < 2 * MAX_LINE + 4096);
    }
}

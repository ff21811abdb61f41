//! Watches what the guest prints on its console.
//!
//! A guest kernel booted with `panic=-1` reboots right after a panic, which
//! to the VMM looks like an ordinary reboot. The watcher spots the kernel's
//! panic line on its way to the console so that the VMM can report the panic
//! and exit non-zero.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

const PANIC_PREFIX: &str = "Kernel panic - not syncing";
/// Lines longer than this are scanned only in their first part.
const MAX_LINE: usize = 512;

/// The first kernel panic line the guest printed, shared with the VMM.
#[derive(Clone, Default, Debug)]
pub struct GuestPanic(Arc<Mutex<Option<String>>>);

impl GuestPanic {
    /// The panic message, if the guest panicked.
    pub fn message(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, line: &str) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(line.to_string());
        }
    }
}

/// A `Write` that passes the guest's console output through to `out` and
/// records the first kernel panic line in a [`GuestPanic`].
pub struct ConsoleWatch<W: Write> {
    out: W,
    line: Vec<u8>,
    panic: GuestPanic,
}

impl<W: Write> ConsoleWatch<W> {
    /// Passes output on to `out`, noting panics in `panic`.
    pub fn new(out: W, panic: GuestPanic) -> Self {
        ConsoleWatch {
            out,
            line: Vec::with_capacity(128),
            panic,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' || b == b'\r' {
                if !self.line.is_empty() {
                    let line = String::from_utf8_lossy(&self.line);
                    if let Some(at) = line.find(PANIC_PREFIX) {
                        self.panic.record(line[at..].trim_end());
                    }
                    self.line.clear();
                }
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl<W: Write> Write for ConsoleWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // The console must never stop the guest: output that cannot be
        // written (closed stdout, full disk) is dropped.
        if let Err(e) = self.out.write_all(buf) {
            log::debug!("guest console output dropped: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_output_through_and_spots_the_panic_line() {
        let panic = GuestPanic::default();
        let mut w = ConsoleWatch::new(Vec::new(), panic.clone());
        let text = "[    0.5] Run /init as init process\r\n[    0.6] Kernel panic - not \
                    syncing: Attempted to kill init! exitcode=0x00000100\r\nrebooting\r\n";
        // Byte by byte, as the UART delivers it.
        for b in text.bytes() {
            w.write_all(&[b]).unwrap();
        }
        assert_eq!(w.out, text.as_bytes());
        assert_eq!(
            panic.message().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
    }

    #[test]
    fn keeps_the_first_panic_and_ignores_ordinary_output() {
        let panic = GuestPanic::default();
        let mut w = ConsoleWatch::new(io::sink(), panic.clone());
        w.write_all(b"hello\nnot a Kernel panic line? no: Kernel panic\n")
            .unwrap();
        assert_eq!(panic.message(), None);
        w.write_all(b"Kernel panic - not syncing: first\nKernel panic - not syncing: second\n")
            .unwrap();
        assert_eq!(
            panic.message().as_deref(),
            Some("Kernel panic - not syncing: first")
        );
    }

    #[test]
    fn a_failing_output_does_not_fail_the_guest() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
        }
        let mut w = ConsoleWatch::new(Broken, GuestPanic::default());
        assert_eq!(w.write(b"abc").unwrap(), 3);
        w.flush().unwrap();
    }
}

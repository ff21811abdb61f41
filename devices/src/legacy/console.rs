//! Watches what the guest prints on its console.
//!
//! Two kernel messages matter to the VMM and reach the console even with
//! `quiet` (they are KERN_EMERG):
//! - a panic: a guest booted with `panic=-1` reboots right after it, which
//!   to the VMM looks like an ordinary reboot, so the panic line is how the
//!   VMM knows to fail;
//! - "reboot: System halted" or "reboot: Power down": a micro-VM without
//!   ACPI has no power-off device, so the kernel turns a power-off into a
//!   halt and stops its CPUs forever; the line is how the VMM knows to end
//!   the VM cleanly.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

const PANIC_PREFIX: &str = "Kernel panic - not syncing";
/// `kernel_halt()` and `kernel_power_off()`; the first is what a guest
/// without a power-off method prints for `poweroff`.
const POWER_OFF: [&str; 2] = ["reboot: System halted", "reboot: Power down"];
/// Lines longer than this are scanned only in their first part.
const MAX_LINE: usize = 512;

#[derive(Default, Debug)]
struct State {
    panic: Option<String>,
    powered_off: bool,
}

/// What the console showed, shared between the UART and the VMM; signals an
/// `EventFd` when the guest powers off.
#[derive(Clone, Debug)]
pub struct ConsoleEvents {
    state: Arc<Mutex<State>>,
    power_off: Arc<EventFd>,
    marker: Option<(&'static str, Arc<EventFd>)>,
}

impl ConsoleEvents {
    /// Signals `power_off` when the guest powers off.
    pub fn new(power_off: EventFd) -> Self {
        ConsoleEvents {
            state: Arc::default(),
            power_off: Arc::new(power_off),
            marker: None,
        }
    }

    /// Also signals `evt` on the first line that contains `marker`. Only
    /// for a guest that is trusted (a template's own kernel and agent): the
    /// console of any other guest is the workload's to write.
    pub fn signal_on_line(mut self, marker: &'static str, evt: EventFd) -> Self {
        self.marker = Some((marker, Arc::new(evt)));
        self
    }

    /// The kernel's panic line, if the guest panicked (before any power-off).
    pub fn panic_message(&self) -> Option<String> {
        self.lock().panic.clone()
    }

    /// Whether the guest kernel powered off.
    pub fn powered_off(&self) -> bool {
        self.lock().powered_off
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn line(&self, line: &str) {
        let mut state = self.lock();
        if state.powered_off {
            // After a power-off, init's exit panics the kernel: not a failure.
            return;
        }
        if let Some((marker, evt)) = &self.marker {
            if line.contains(marker) {
                if let Err(e) = evt.write(1) {
                    log::error!("cannot signal the console line {marker:?}: {e}");
                }
            }
        }
        if let Some(at) = line.find(PANIC_PREFIX) {
            state
                .panic
                .get_or_insert_with(|| line[at..].trim_end().to_string());
        } else if POWER_OFF.iter().any(|p| line.contains(p)) && state.panic.is_none() {
            state.powered_off = true;
            drop(state);
            if let Err(e) = self.power_off.write(1) {
                log::error!("cannot signal the guest's power-off: {e}");
            }
        }
    }
}

/// A `Write` that passes the guest's console output through to `out` and
/// reports panics and power-off to [`ConsoleEvents`].
pub struct ConsoleWatch<W: Write> {
    out: W,
    line: Vec<u8>,
    events: ConsoleEvents,
}

impl<W: Write> ConsoleWatch<W> {
    /// Passes output on to `out`, noting events in `events`.
    pub fn new(out: W, events: ConsoleEvents) -> Self {
        ConsoleWatch {
            out,
            line: Vec::with_capacity(128),
            events,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' || b == b'\r' {
                if !self.line.is_empty() {
                    self.events.line(&String::from_utf8_lossy(&self.line));
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
        // The console must never stop the guest: output that cannot be
        // written (closed stdout, full disk) is dropped.
        if let Err(e) = self.out.write_all(buf) {
            log::debug!("guest console output dropped: {e}");
        }
        self.scan(buf);
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
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn events() -> (ConsoleEvents, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (ConsoleEvents::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn passes_output_through_and_spots_the_panic_line() {
        let (events, power_off) = events();
        let mut w = ConsoleWatch::new(Vec::new(), events.clone());
        let text = "[    0.5] Run /init as init process\r\n[    0.6] Kernel panic - not \
                    syncing: Attempted to kill init! exitcode=0x00000100\r\nrebooting\r\n";
        // Byte by byte, as the UART delivers it.
        for b in text.bytes() {
            w.write_all(&[b]).unwrap();
        }
        assert_eq!(w.out, text.as_bytes());
        assert_eq!(
            events.panic_message().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
        assert!(!events.powered_off());
        assert!(power_off.read().is_err(), "no power-off signalled");
    }

    #[test]
    fn a_marker_line_is_signalled_only_when_asked_for() {
        let (events, _) = events();
        let ready = EventFd::new(EFD_NONBLOCK).unwrap();
        let watched = events
            .clone()
            .signal_on_line("agent: ready", ready.try_clone().unwrap());
        let mut w = ConsoleWatch::new(io::sink(), watched);
        w.write_all(b"not yet\r\n[ 1.0] agent: rea").unwrap();
        assert!(ready.read().is_err(), "no whole line yet");
        w.write_all(b"dy\r\n").unwrap();
        assert_eq!(ready.read().unwrap(), 1);
        // Without asking, the same line signals nothing.
        let mut plain = ConsoleWatch::new(io::sink(), events);
        plain.write_all(b"agent: ready\n").unwrap();
        assert!(ready.read().is_err());
    }

    #[test]
    fn keeps_the_first_panic_and_ignores_ordinary_output() {
        let (events, _) = events();
        let mut w = ConsoleWatch::new(io::sink(), events.clone());
        w.write_all(b"hello\nnot a Kernel panic line? no: Kernel panic\n")
            .unwrap();
        assert_eq!(events.panic_message(), None);
        w.write_all(b"Kernel panic - not syncing: first\nKernel panic - not syncing: second\n")
            .unwrap();
        assert_eq!(
            events.panic_message().as_deref(),
            Some("Kernel panic - not syncing: first")
        );
    }

    #[test]
    fn power_off_is_signalled_and_the_panic_after_it_is_not_a_failure() {
        let (events, power_off) = events();
        let mut w = ConsoleWatch::new(io::sink(), events.clone());
        w.write_all(b"[ 1.0] reboot: Power down\r\n").unwrap();
        assert!(events.powered_off());
        assert_eq!(power_off.read().unwrap(), 1);
        w.write_all(b"Kernel panic - not syncing: Attempted to kill init! exitcode=0x0\r\n")
            .unwrap();
        assert_eq!(events.panic_message(), None);
    }

    #[test]
    fn a_halt_is_a_power_off_too() {
        let (events, power_off) = events();
        let mut w = ConsoleWatch::new(io::sink(), events.clone());
        w.write_all(b"reboot: System hal").unwrap();
        assert!(!events.powered_off(), "only whole lines count");
        w.write_all(b"ted\r\n").unwrap();
        assert!(events.powered_off());
        assert_eq!(power_off.read().unwrap(), 1);
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
        let mut w = ConsoleWatch::new(Broken, events().0);
        assert_eq!(w.write(b"abc").unwrap(), 3);
        w.flush().unwrap();
    }
}

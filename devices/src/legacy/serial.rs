//! 8250 UART (COM1) on the port-I/O bus, backed by vm-superio.

use std::io::Write;

use crate::{BusDevice, EventFdTrigger};

/// The guest's serial console: a vm-superio 16550A whose interrupt is an
/// irqfd and whose output goes to any `Write`.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART raising its interrupt through `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// A UART with the registers (and unread input) of `state`, as a
    /// template saved them.
    pub fn from_state(
        state: &vm_superio::serial::SerialState,
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        vm_superio::Serial::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map(|inner| Serial { inner })
            .map_err(|e| format!("{e:?}"))
    }

    /// The registers and unread input.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.inner.state()
    }

    /// Queues bytes for the guest to read; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.inner.fifo_capacity().min(input.len());
        match self.inner.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), &mut *data) {
            *byte = self.inner.read(offset);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(offset, *byte) {
                log::debug!("serial write failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_written_to_thr_and_raises_input_interrupts() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        for b in b"hi\n" {
            serial.write(0, &[*b]); // THR
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");

        // Enable the "received data available" interrupt (IER bit 0), queue input.
        serial.write(1, &[0x01]);
        assert_eq!(serial.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x01, 0x01, "LSR data ready");
        let mut rbr = [0u8];
        serial.read(0, &mut rbr);
        assert_eq!(rbr[0], b'o');
    }

    #[test]
    fn wide_accesses_read_as_all_ones() {
        let mut serial = Serial::new(
            EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            Box::new(std::io::sink()),
        );
        let mut data = [0u8; 2];
        serial.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }
}

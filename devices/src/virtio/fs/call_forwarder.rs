//! Turns virtiofsd's call eventfds into virtio-mmio interrupts.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::virtio::worker::{self, EpollCtl, EventHandler, EventSet, WorkerHandle};
use crate::virtio::VirtioInterrupt;

/// Waits on the call eventfds (on a [`worker`] thread) and raises the
/// device's interrupt with the "used buffers" bit set. Stopped and joined
/// on drop.
pub(super) struct CallForwarder {
    _worker: WorkerHandle,
}

struct Calls {
    calls: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
}

impl EventHandler for Calls {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        for (i, call) in self.calls.iter().enumerate() {
            ctl.add(call.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle(&mut self, _ctl: &EpollCtl, token: u64, _events: EventSet) {
        let Some(call) = self.calls.get(token as usize) else {
            return;
        };
        // Drain; a spurious wake-up reads EAGAIN.
        if call.read().is_ok() {
            if let Err(e) = self.interrupt.signal_used() {
                crate::error_limited!("virtio-fs interrupt: {e}");
            }
        }
    }
}

impl CallForwarder {
    pub(super) fn spawn(calls: Vec<EventFd>, interrupt: Arc<VirtioInterrupt>) -> io::Result<Self> {
        let worker = worker::spawn("virtio-fs-irq", Calls { calls, interrupt })?;
        Ok(CallForwarder { _worker: worker })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_call_raises_the_used_buffer_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let calls = vec![
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        let second = calls[1].try_clone().unwrap();
        let fwd = CallForwarder::spawn(calls, interrupt.clone()).unwrap();
        second.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while interrupt.status() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(interrupt.status(), crate::virtio::INT_VRING);
        assert!(irq.read().unwrap() >= 1);
        drop(fwd); // joins
    }
}

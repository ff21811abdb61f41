//! Turns virtiofsd's call eventfds into virtio-mmio interrupts.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::VirtioInterrupt;

/// A thread that waits on the call eventfds and raises the device's
/// interrupt with the "used buffers" bit set. Stopped and joined on drop.
pub(super) struct CallForwarder {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl CallForwarder {
    pub(super) fn spawn(calls: Vec<EventFd>, interrupt: Arc<VirtioInterrupt>) -> io::Result<Self> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let kill_token = calls.len() as u64;
        for (i, call) in calls.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, kill_token),
        )?;
        let thread = std::thread::Builder::new()
            .name("virtio-fs-irq".into())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); calls.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio-fs interrupt forwarder: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == kill_token {
                            return;
                        }
                        if let Some(call) = calls.get(token as usize) {
                            // Drain; a spurious wake-up reads EAGAIN.
                            if call.read().is_ok() {
                                if let Err(e) = interrupt.signal_used() {
                                    log::error!("virtio-fs interrupt: {e}");
                                }
                            }
                        }
                    }
                }
            })?;
        Ok(CallForwarder {
            kill,
            thread: Some(thread),
        })
    }
}

impl Drop for CallForwarder {
    fn drop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

//! The VMM's event loop (event-manager): waits for the guest's reset on the
//! i8042 or for a vCPU that stopped.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::Error;

/// Watches the events that end the VM.
struct ExitWatch {
    reset: EventFd,
    vcpu_stopped: EventFd,
    reset_seen: bool,
    done: bool,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            log::debug!("guest reset through the i8042");
            self.reset_seen = true;
        } else if fd == self.vcpu_stopped.as_raw_fd() {
            let _ = self.vcpu_stopped.read();
        }
        self.done = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset, &self.vcpu_stopped] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch VM exit events: {e}");
                self.done = true;
            }
        }
    }
}

/// Runs the event loop until the guest resets (`Ok(true)`) or a vCPU stops
/// (`Ok(false)`).
pub fn wait_for_exit(reset: EventFd, vcpu_stopped: EventFd) -> Result<bool, Error> {
    let err = |e: event_manager::Error| Error::EventLoop(e.to_string());
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(err)?;
    let watch = Arc::new(Mutex::new(ExitWatch {
        reset,
        vcpu_stopped,
        reset_seen: false,
        done: false,
    }));
    manager.add_subscriber(watch.clone());
    loop {
        {
            let w = watch.lock().unwrap_or_else(|e| e.into_inner());
            if w.done {
                return Ok(w.reset_seen);
            }
        }
        manager.run().map_err(err)?;
    }
}

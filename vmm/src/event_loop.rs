//! The VMM's event loop (event-manager): waits for whatever ends the VM,
//! the guest's reset on the i8042, its power-off seen on the console, or a
//! vCPU that stopped.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::Error;

/// What ended the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The guest reset the machine (i8042).
    Reset,
    /// The guest kernel powered off.
    PowerOff,
    /// A vCPU stopped on its own.
    VcpuStopped,
    /// A template guest's agent is ready to be saved.
    TemplateReady,
}

/// The events that end the VM, each with the [`Ending`] it means.
struct ExitWatch {
    sources: Vec<(EventFd, Ending)>,
    ending: Option<Ending>,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        for (fd, ending) in &self.sources {
            if fd.as_raw_fd() == events.fd() {
                let _ = fd.read();
                log::debug!("VM ending: {ending:?}");
                self.ending.get_or_insert(*ending);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, _) in &self.sources {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch VM exit events: {e}");
                self.ending = Some(Ending::VcpuStopped);
            }
        }
    }
}

/// Runs the event loop until one of `sources` fires; returns its meaning.
pub fn wait_for_exit(sources: Vec<(EventFd, Ending)>) -> Result<Ending, Error> {
    let err = |e: event_manager::Error| Error::EventLoop(e.to_string());
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(err)?;
    let watch = Arc::new(Mutex::new(ExitWatch {
        sources,
        ending: None,
    }));
    manager.add_subscriber(watch.clone());
    loop {
        if let Some(ending) = watch.lock().unwrap_or_else(|e| e.into_inner()).ending {
            return Ok(ending);
        }
        manager.run().map_err(err)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn returns_the_meaning_of_the_event_that_fired() {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let power = EventFd::new(EFD_NONBLOCK).unwrap();
        power.write(1).unwrap();
        let ending = wait_for_exit(vec![
            (reset.try_clone().unwrap(), Ending::Reset),
            (power.try_clone().unwrap(), Ending::PowerOff),
        ])
        .unwrap();
        assert_eq!(ending, Ending::PowerOff);
    }
}

//! Emulated devices for sandboxvm guests and the buses that route vCPU
//! port-I/O and MMIO exits to them.
//!
//! Each device sits behind its own lock on a [`Bus`]; there is no global lock
//! taken on every exit.

pub mod bus;
pub mod legacy;
pub mod log_limit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

use vmm_sys_util::eventfd::EventFd;

/// A [`vm_superio::Trigger`] that signals an `EventFd` (an irqfd or an exit
/// event).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an `EventFd`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The wrapped `EventFd`.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

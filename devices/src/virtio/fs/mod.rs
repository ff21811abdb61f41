//! virtio-fs through a vhost-user back end (the standard `virtiofsd`).
//!
//! The VMM only owns the transport side: feature negotiation, the config
//! space (tag, number of request queues) and handing the back end the guest
//! memory (memfd regions) and the rings. virtiofsd then serves the queues
//! itself; its "used buffers" notifications come back on call eventfds that
//! [`call_forwarder`] turns into virtio-mmio interrupts (the InterruptStatus
//! register must show them, so the irqfd cannot be handed over directly).

mod call_forwarder;
mod device;

pub use device::{Error, VhostUserFs};

/// Queue size, as Kata Containers configures virtio-fs.
pub const QUEUE_SIZE: u16 = 1024;
/// Request queues (plus the high-priority queue).
pub const NUM_REQUEST_QUEUES: usize = 1;
/// The longest tag the config space holds.
pub const TAG_LEN: usize = 36;

//! virtio-fs through a vhost-user back end (the standard `virtiofsd`).
//!
//! The VMM owns the transport side: feature negotiation, the config space
//! (tag, number of request queues) and what virtiofsd may map. Two ways:
//! - **direct** (a cold-booted guest, whose memory is a shared memfd):
//!   virtiofsd maps the guest's memory and serves the guest's own rings;
//!   its "used buffers" notifications come back on call eventfds that
//!   [`call_forwarder`] turns into virtio-mmio interrupts (the
//!   InterruptStatus register must show them, so the irqfd cannot be handed
//!   over directly);
//! - **relayed** (a guest restored from a template, whose memory is private
//!   copy-on-write so that restored guests share their untouched pages):
//!   the device serves the guest's rings and copies each request through
//!   memory of its own that virtiofsd maps ([`relay`]).

mod call_forwarder;
mod device;
mod relay;

pub use device::{Error, VhostUserFs};

/// Queue size, as Kata Containers configures virtio-fs.
pub const QUEUE_SIZE: u16 = 1024;
/// Request queues (plus the high-priority queue).
pub const NUM_REQUEST_QUEUES: usize = 1;
/// The longest tag the config space holds.
pub const TAG_LEN: usize = 36;

//! virtio-vsock (device type 19) with a userspace back end, Firecracker's
//! "hybrid vsock": guest streams end in Unix sockets on the host.
//!
//! - [`device`]: the [`crate::virtio::VirtioDevice`] ([`Vsock`]): features,
//!   config space (the guest CID), activation.
//! - [`queue_handler`]: the worker thread's glue between the virtqueues and
//!   the muxer.
//! - [`muxer`] and [`connection`]: the protocol, generic over
//!   [`muxer::GuestQueues`].

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod queue_handler;

pub use device::Vsock;
pub use muxer::{Error, GuestQueues, Muxer};

/// Queue size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

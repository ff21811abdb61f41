//! virtio-net (device type 1) on a host tap interface.
//!
//! - [`device`]: the [`crate::virtio::VirtioDevice`] ([`Net`]): features,
//!   config space (MAC, link status, MTU), activation.
//! - [`tap`]: the tap back end (`/dev/net/tun`, `IFF_VNET_HDR`, offloads).
//! - [`rxtx`]: moving frames between the rx/tx virtqueues and the tap,
//!   generic over the tap side ([`rxtx::TapIo`]) and the interrupt
//!   ([`rxtx::Signal`]); back-pressure both ways instead of drops.
//! - [`queue_handler`]: the worker thread's glue (which fds to wait on).
//!
//! Every frame crossing the device carries a 12-byte `virtio_net_hdr_v1`
//! in front (checksum and segmentation offload metadata); the tap is set to
//! the same header size, so headers pass through unchanged.

pub mod device;
pub mod queue_handler;
pub mod rxtx;
pub mod tap;

#[cfg(test)]
mod rxtx_tests;
#[cfg(test)]
pub(crate) mod test_util;

pub use device::Net;
pub use tap::{Tap, TapError};

/// Queue size of the rx and tx queues.
pub const QUEUE_SIZE: u16 = 256;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), what every frame on
/// the queues and on the tap starts with.
pub const VNET_HDR_LEN: usize = 12;

/// The largest frame (header included) the device moves in either
/// direction: a 64 KiB TSO/GSO packet plus Ethernet and VLAN headers, with
/// room to spare.
pub const MAX_FRAME_LEN: usize = 68 * 1024;

/// Feature bits of virtio-net (virtio 1.x, 5.1.3) and the transport bits
/// the device offers.
pub mod features {
    /// The device handles packets with partial checksum (guest tx csum offload).
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles packets with partial checksum (guest rx).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device reports its maximum MTU in the config space.
    pub const MTU: u64 = 1 << 3;
    /// The device has a MAC address in the config space.
    pub const MAC: u64 = 1 << 5;
    /// The driver can receive TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver can receive TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The device can receive TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device can receive TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The driver can merge receive buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The config space has a link status field.
    pub const STATUS: u64 = 1 << 16;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// Used/available event index notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Link status bit of the config space's `status` field.
pub const LINK_UP: u16 = 1;

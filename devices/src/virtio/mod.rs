//! virtio devices over the virtio-mmio transport (virtio 1.x).
//!
//! A device implements [`VirtioDevice`]: its features, config space and what
//! happens when the driver sets DRIVER_OK ([`VirtioDevice::activate`]). The
//! transport ([`mmio::MmioTransport`]) owns the register file, feature
//! negotiation and queue setup and hands the device ready queues, each with
//! the `EventFd` that the guest's notifications arrive on (a KVM ioeventfd
//! on the QueueNotify register), plus a [`VirtioInterrupt`] to signal used
//! buffers.

pub mod balloon;
pub mod common;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bit: the device used buffers in a queue.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the device's configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// `VIRTIO_F_VERSION_1`: every device here is a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type ids (virtio 1.x, 5 Device Types).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Memory balloon (here: free page reporting).
    pub const BALLOON: u32 = 5;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
    /// File system (virtio-fs).
    pub const FS: u32 = 26;
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus
/// register it shows the driver, and the irqfd that raises its GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// A line that raises the GSI behind `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` ([`INT_VRING`], [`INT_CONFIG`]) and raises the interrupt.
    pub fn signal(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Tells the driver that buffers were used.
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.signal(INT_VRING)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd (for registering it with KVM).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Copies the part of `config` at `offset` into `data`; bytes past the end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// A queue that the driver made ready, with the eventfd its notifications
/// arrive on.
pub struct ActiveQueue {
    /// The queue, its addresses and size as the driver set them.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: EventFd,
}

/// Errors a device returns from activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver made fewer queues ready than the device needs.
    #[error("the driver set up {got} queues, the device needs {want}")]
    Queues {
        /// Queues the device needs.
        want: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// The device's back end failed to start.
    #[error("device back end: {0}")]
    Backend(String),
}

/// A virtio device behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Its features, queue sizes and worker thread, which the provided
    /// methods below read.
    fn common(&self) -> &common::DeviceCommon;
    /// The same, to change.
    fn common_mut(&mut self) -> &mut common::DeviceCommon;
    /// The maximum size of each of the device's queues; its length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_sizes()
    }
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64 {
        self.common().features()
    }
    /// The features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64) {
        self.common_mut().ack_features(features);
    }
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving `queues` (one per entry of
    /// [`Self::queue_max_sizes`], in order).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues. Returns false
    /// if the device cannot be reset (the transport then marks it failed).
    fn reset(&mut self) -> bool {
        false
    }
}

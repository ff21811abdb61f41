//! The virtio-mmio transport, version 2 ("modern"), virtio 1.x spec 4.2.2.
//!
//! [`MmioTransport`] is a [`BusDevice`] that holds the register file of one
//! virtio-mmio device: identification, feature negotiation, queue setup,
//! the device status and the interrupt registers. The device-specific
//! configuration space (from offset 0x100) is delegated to the
//! [`VirtioDevice`]. When the driver sets DRIVER_OK the transport builds a
//! [`virtio_queue::Queue`] for each queue the driver made ready and hands
//! them to [`VirtioDevice::activate`].
//!
//! Queue notifications: the transport owns one `EventFd` per queue. The VMM
//! registers each as a KVM ioeventfd on `base + QUEUE_NOTIFY` with the queue
//! index as datamatch ([`MmioTransport::queue_notify_eventfds`]), so
//! notifications go straight to the device's worker thread. Without an
//! ioeventfd (unit tests) a QueueNotify write reaches the transport, which
//! then signals the eventfd itself.

use std::io;
use std::sync::Arc;

use crate::{error_limited as error, warn_limited as warn};
use log::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, VirtioDevice, VirtioInterrupt, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// The size of one virtio-mmio device's register window.
pub const MMIO_LEN: u64 = 0x1000;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("SBVM").
pub const VENDOR_ID: u32 = 0x4d56_4253;

/// Register offsets (virtio 1.x, 4.2.2 MMIO Device Register Layout).
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 0x01;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 0x02;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 0x04;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 0x08;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The kernel command line entry that declares a virtio-mmio device at
/// `base` with interrupt `irq` (`virtio_mmio.device=4K@0x<base>:<irq>`).
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// The registers of one queue, as the driver wrote them.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// A `Queue` from the registers, if the guest set up a valid one.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|e| e.to_string())?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| e.to_string())?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| e.to_string())?;
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err("rings lie outside guest memory".into());
        }
        Ok(q)
    }
}

/// Sets the low or high half of `v`.
fn set_half(v: &mut u64, high: bool, val: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(val) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(val);
    }
}

/// A virtio device behind a virtio-mmio v2 register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueRegs>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The device refused a reset: it cannot be activated again.
    broken: bool,
}

impl MmioTransport {
    /// Puts `device` behind a register window; creates one notify eventfd
    /// per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> io::Result<Self> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueRegs::new(m))
            .collect();
        let notify = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            broken: false,
        })
    }

    /// The notify eventfd of each queue, with its index: register each as
    /// a KVM ioeventfd on `base + 0x50` (QueueNotify), 4 bytes, with
    /// datamatch = the index.
    pub fn queue_notify_eventfds(&self) -> Vec<(u32, &EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u32, e))
            .collect()
    }

    /// The interrupt line (its irqfd is to be registered with KVM).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A queue register write; ignored once the queue is ready or the
    /// device runs (the driver must not change a live queue).
    fn write_queue(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        let live = self.status & status::DRIVER_OK != 0;
        match self.selected_queue() {
            Some(q) if !q.ready && !live => f(q),
            Some(_) => warn!("virtio-mmio: write to a live queue's registers ignored"),
            None => warn!("virtio-mmio: write to the registers of a queue that does not exist"),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, val: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = val,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = val,
            reg::DRIVER_FEATURES => {
                let negotiating =
                    self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
                if !negotiating {
                    warn!("virtio-mmio: DriverFeatures written outside negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => set_half(&mut self.driver_features, false, val),
                    1 => set_half(&mut self.driver_features, true, val),
                    _ if val != 0 => self.driver_features |= 1 << 63, // never offered
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = val,
            reg::QUEUE_NUM => self.write_queue(|q| q.size = val as u16),
            reg::QUEUE_READY => {
                let live = self.status & status::DRIVER_OK != 0;
                if let Some(q) = self.selected_queue() {
                    if !live {
                        q.ready = val == 1;
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Only without an ioeventfd on this register.
                if let Some(evt) = self.notify.get(val as usize) {
                    if let Err(e) = evt.write(1) {
                        error!("virtio-mmio: queue {val} notify: {e}");
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(val),
            reg::STATUS => self.write_status(val),
            reg::QUEUE_DESC_LOW => self.write_queue(|q| set_half(&mut q.desc, false, val)),
            reg::QUEUE_DESC_HIGH => self.write_queue(|q| set_half(&mut q.desc, true, val)),
            reg::QUEUE_DRIVER_LOW => self.write_queue(|q| set_half(&mut q.driver, false, val)),
            reg::QUEUE_DRIVER_HIGH => self.write_queue(|q| set_half(&mut q.driver, true, val)),
            reg::QUEUE_DEVICE_LOW => self.write_queue(|q| set_half(&mut q.device, false, val)),
            reg::QUEUE_DEVICE_HIGH => self.write_queue(|q| set_half(&mut q.device, true, val)),
            _ => debug!("virtio-mmio: write of {val:#x} to register {offset:#x} ignored"),
        }
    }

    fn write_status(&mut self, val: u32) {
        if val == 0 {
            self.reset();
            return;
        }
        // Bits only go away through a reset (the driver must not clear them):
        // clearing DRIVER_OK and setting it again would activate the device
        // a second time over live queues and workers.
        let keep = self.status & !status::DEVICE_NEEDS_RESET;
        if val & keep != keep {
            warn!(
                "virtio-mmio: status {val:#x} would clear bits of {:#x} without a reset; ignored",
                self.status
            );
            return;
        }
        let added = val & !self.status;
        let mut new = val;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if ok {
                self.device.ack_features(self.driver_features);
            } else {
                warn!(
                    "virtio-mmio: driver features {:#x} refused (device offers {offered:#x})",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
                new &= !status::DRIVER_OK;
            } else {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self) {
        if self.activated {
            warn!("virtio-mmio: device already active; activation ignored until a reset");
            return;
        }
        let result = if self.broken {
            Err("the device could not be reset".to_string())
        } else {
            self.ready_queues()
        };
        let result = result.and_then(|queues| {
            self.device
                .activate(self.mem.clone(), self.interrupt.clone(), queues)
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                error!(
                    "virtio-mmio: activating device type {}: {e}",
                    self.device.device_type()
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal(INT_CONFIG) {
                    error!("virtio-mmio: config interrupt: {e}");
                }
            }
        }
    }

    fn ready_queues(&self) -> Result<Vec<ActiveQueue>, String> {
        let mut queues = Vec::new();
        for (i, regs) in self.queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let queue = regs
                .build(&self.mem)
                .map_err(|e| format!("queue {i}: {e}"))?;
            let notify = self.notify[i]
                .try_clone()
                .map_err(|e| format!("queue {i} eventfd: {e}"))?;
            queues.push(ActiveQueue { queue, notify });
        }
        Ok(queues)
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            error!(
                "virtio-mmio: device type {} cannot be reset",
                self.device.device_type()
            );
            self.broken = true;
        }
        self.activated = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.status = 0;
        self.interrupt.ack(u32::MAX);
        // Drop notifications the old queues did not consume.
        for evt in &self.notify {
            let _ = evt.read();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if offset & 3 != 0 {
            warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;

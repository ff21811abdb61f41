//! The virtio-net device: two queues (rx, tx; no control queue), config
//! space = MAC, link status (always up), one queue pair, MTU; activation
//! sets the tap's offloads to what the driver accepted and starts the
//! worker thread.

use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::features::*;
use super::queue_handler::QueueHandler;
use super::rxtx::RxtxFeatures;
use super::tap::{offload, Tap, TapError};
use super::{LINK_UP, QUEUE_SIZE};
use crate::virtio::common::DeviceCommon;
use crate::virtio::{
    device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// The smallest MTU a driver accepts (virtio 1.x, 5.1.4.1: 68).
pub const MIN_MTU: u16 = 68;

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The MTU is below what IPv4 needs.
    #[error("MTU {0} is too small (at least {MIN_MTU})")]
    Mtu(u16),
    /// A multicast address cannot be a NIC's address.
    #[error("MAC {0} is a multicast address")]
    MulticastMac(String),
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Features offered for a device with or without a MAC and an MTU, on a
/// tap that does or does not take checksum/TSO offloads for its reader.
pub fn offered_features(mac: bool, mtu: bool, tap_offloads: bool) -> u64 {
    // The tap takes partial checksums and TSO frames from us whatever its
    // offload flags say; those only govern what it hands us.
    let mut f = VIRTIO_F_VERSION_1
        | RING_INDIRECT_DESC
        | RING_EVENT_IDX
        | MRG_RXBUF
        | STATUS
        | CSUM
        | HOST_TSO4
        | HOST_TSO6;
    if tap_offloads {
        f |= GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6;
    }
    if mac {
        f |= MAC;
    }
    if mtu {
        f |= MTU;
    }
    f
}

/// The tap offload flags for the features a driver accepted: what the
/// guest can receive.
pub fn tap_offload(acked: u64) -> u32 {
    if acked & GUEST_CSUM == 0 {
        // TSO frames come with partial checksums: no TSO without CSUM.
        return 0;
    }
    let mut flags = offload::CSUM;
    if acked & GUEST_TSO4 != 0 {
        flags |= offload::TSO4;
    }
    if acked & GUEST_TSO6 != 0 {
        flags |= offload::TSO6;
    }
    flags
}

/// Whether `mac` and `mtu` can be a NIC's.
fn check(mac: Option<[u8; 6]>, mtu: Option<u16>) -> Result<(), Error> {
    if let Some(m) = mtu.filter(|&m| m < MIN_MTU) {
        return Err(Error::Mtu(m));
    }
    if let Some(m) = mac.filter(|m| m[0] & 1 != 0) {
        return Err(Error::MulticastMac(format_mac(&m)));
    }
    Ok(())
}

/// The config space (`struct virtio_net_config` up to `mtu`).
fn config_space(mac: Option<[u8; 6]>, mtu: Option<u16>) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[..6].copy_from_slice(&mac.unwrap_or_default());
    c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
    c[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    c
}

/// A virtio-net device on a host tap.
pub struct Net {
    // First: its worker stops before the tap closes.
    common: DeviceCommon,
    tap: Tap,
    config: [u8; 12],
}

impl Net {
    /// A device on the tap `tap_name` (attached now, created if missing)
    /// with MAC `mac` (else the guest picks a random one) and MTU `mtu`
    /// (else the guest's default, 1500).
    pub fn open(tap_name: &str, mac: Option<[u8; 6]>, mtu: Option<u16>) -> Result<Self, Error> {
        check(mac, mtu)?; // before touching the host's interfaces
        Net::new(Tap::open(tap_name)?, mac, mtu)
    }

    /// A device on an open tap.
    pub fn new(tap: Tap, mac: Option<[u8; 6]>, mtu: Option<u16>) -> Result<Self, Error> {
        check(mac, mtu)?;
        let offloads = tap.supports_offload(offload::CSUM | offload::TSO4 | offload::TSO6);
        if !offloads {
            log::warn!(
                "tap {}: no checksum/TSO offloads; the guest gets plain frames",
                tap.name()
            );
        }
        Ok(Net {
            common: DeviceCommon::new(
                offered_features(mac.is_some(), mtu.is_some(), offloads),
                vec![QUEUE_SIZE; 2],
            ),
            tap,
            config: config_space(mac, mtu),
        })
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn common(&self) -> &DeviceCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let mut queues = self.common.queues::<2>(queues)?;
        // The old worker (a re-activation) stops before the tap's offloads
        // change under it.
        self.common.stop_worker();
        let acked = self.common.acked_features();
        for q in &mut queues {
            q.queue.set_event_idx(acked & RING_EVENT_IDX != 0);
        }
        let backend = |what: &str, e: std::io::Error| {
            ActivateError::Backend(format!("tap {}: {what}: {e}", self.tap.name()))
        };
        self.tap
            .set_offload(tap_offload(acked))
            .map_err(|e| backend("TUNSETOFFLOAD", e))?;
        let tap = self.tap.try_clone().map_err(|e| backend("dup", e))?;
        let features = RxtxFeatures {
            mrg_rxbuf: acked & MRG_RXBUF != 0,
            guest_csum: acked & GUEST_CSUM != 0,
        };
        let handler = QueueHandler::new(mem, interrupt, queues, tap, features);
        self.common.start_worker("virtio-net", handler)
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        if let Err(e) = self.tap.set_offload(0) {
            crate::warn_limited!("tap {}: turning offloads off: {e}", self.tap.name());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::net::test_util::in_new_netns;

    #[test]
    fn features_follow_mac_mtu_and_tap_offloads() {
        let base = VIRTIO_F_VERSION_1
            | RING_INDIRECT_DESC
            | RING_EVENT_IDX
            | MRG_RXBUF
            | STATUS
            | CSUM
            | HOST_TSO4
            | HOST_TSO6;
        assert_eq!(offered_features(false, false, false), base);
        let guest = GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6;
        assert_eq!(offered_features(false, false, true), base | guest);
        assert_eq!(offered_features(true, true, true), base | guest | MAC | MTU);
        // Bit numbers from the spec.
        assert_eq!(
            [CSUM, GUEST_CSUM, MTU, MAC, GUEST_TSO4, GUEST_TSO6],
            [1, 2, 8, 32, 128, 256]
        );
        assert_eq!(
            [HOST_TSO4, HOST_TSO6, MRG_RXBUF, STATUS],
            [1 << 11, 1 << 12, 1 << 15, 1 << 16]
        );
    }

    #[test]
    fn tap_offloads_follow_the_guest_rx_features() {
        assert_eq!(tap_offload(0), 0);
        assert_eq!(tap_offload(CSUM | HOST_TSO4 | HOST_TSO6), 0);
        assert_eq!(tap_offload(GUEST_CSUM), offload::CSUM);
        assert_eq!(
            tap_offload(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6),
            offload::CSUM | offload::TSO4 | offload::TSO6
        );
        // TSO without checksum offload is not a valid combination.
        assert_eq!(tap_offload(GUEST_TSO4), 0);
    }

    #[test]
    fn config_space_layout() {
        let c = config_space(Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]), Some(1400));
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1); // link up
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1); // one queue pair
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1400);
        let c = config_space(None, None);
        assert_eq!(&c[..6], &[0; 6]);
        assert_eq!(&c[10..], &[0, 0]);
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]),
            "52:54:00:ab:cd:ef"
        );
    }

    fn queue(base: u64) -> ActiveQueue {
        let mut q = virtio_queue::Queue::new(QUEUE_SIZE).unwrap();
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        q.set_ready(true);
        ActiveQueue {
            queue: q,
            notify: EventFd::new(0).unwrap(),
        }
    }

    #[test]
    fn device_on_a_real_tap() {
        in_new_netns(|| {
            let err = Net::open("sbxnet0", None, Some(60)).err().unwrap();
            assert_eq!(err.to_string(), "MTU 60 is too small (at least 68)");
            let err = Net::open("sbxnet0", Some([1, 0, 0, 0, 0, 1]), None).err();
            assert_eq!(
                err.unwrap().to_string(),
                "MAC 01:00:00:00:00:01 is a multicast address"
            );

            let mac = [0x52, 0x54, 0, 1, 2, 3];
            let mut dev = Net::open("sbxnet0", Some(mac), Some(1400)).unwrap();
            assert_eq!(dev.tap_name(), "sbxnet0");
            assert_eq!(dev.device_type(), 1);
            assert_eq!(dev.queue_max_sizes(), &[256, 256]);
            // A tap here takes all offloads.
            assert_eq!(dev.features(), offered_features(true, true, true));
            let mut b = [0u8; 8];
            dev.read_config(0, &mut b);
            assert_eq!(b, [0x52, 0x54, 0, 1, 2, 3, 1, 0]);
            let mut b = [0u8; 2];
            dev.read_config(10, &mut b);
            assert_eq!(u16::from_le_bytes(b), 1400);

            // The driver accepts a subset, plus a bit never offered.
            dev.ack_features(VIRTIO_F_VERSION_1 | MRG_RXBUF | GUEST_CSUM | GUEST_TSO4 | 1 << 40);
            assert_eq!(
                dev.common().acked_features(),
                VIRTIO_F_VERSION_1 | MRG_RXBUF | GUEST_CSUM | GUEST_TSO4
            );

            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
            let err = dev.activate(mem.clone(), irq.clone(), vec![queue(0)]);
            assert!(matches!(
                err,
                Err(ActivateError::Queues { want: 2, got: 1 })
            ));
            dev.activate(mem, irq, vec![queue(0), queue(0x8000)])
                .unwrap();
            assert!(dev.common().is_running());
            assert!(dev.reset());
            assert!(!dev.common().is_running());
            assert_eq!(dev.common().acked_features(), 0);
        });
    }
}

//! The virtio-vsock device: three queues (rx, tx, event), config space =
//! the guest CID; activation starts the worker thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::muxer::{Error, Muxer};
use super::queue_handler::QueueHandler;
use super::QUEUE_SIZE;
use crate::virtio::common::DeviceCommon;
use crate::virtio::{
    device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// A virtio-vsock device whose host end is the Unix socket `uds_path`.
pub struct Vsock {
    // First: its worker stops before the muxer goes.
    common: DeviceCommon,
    cid: u64,
    muxer: Arc<Mutex<Muxer>>,
}

impl Vsock {
    /// A device for guest `cid`; binds the host listener at `uds_path`
    /// now (the socket file is removed when the device is dropped).
    pub fn new(cid: u64, uds_path: PathBuf) -> Result<Self, Error> {
        Ok(Vsock {
            common: DeviceCommon::new(VIRTIO_F_VERSION_1, vec![QUEUE_SIZE; 3]),
            cid,
            muxer: Arc::new(Mutex::new(Muxer::new(cid, uds_path)?)),
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn common(&self) -> &DeviceCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let queues = self.common.queues::<3>(queues)?;
        let handler = QueueHandler::new(mem, interrupt, queues, self.muxer.clone());
        self.common.start_worker("vsock", handler)
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        self.muxer.lock().expect("vsock muxer").reset();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes};

    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn config_space_is_the_cid() {
        let dir = TempDir::new().unwrap();
        let dev = Vsock::new(0x1122_3344_5566_7788, dir.as_path().join("v.sock")).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        let mut b = [0xffu8; 4];
        dev.read_config(6, &mut b);
        assert_eq!(b, [0x22, 0x11, 0, 0]);
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(dev.features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn binds_at_construction_and_removes_the_socket_on_drop() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let dev = Vsock::new(3, path.clone()).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        // A second device on the same path is a clean error.
        let err = Vsock::new(3, path.clone()).err().unwrap();
        assert!(err.to_string().contains("v.sock"), "{err}");
        drop(dev);
        assert!(!path.exists());
        let err = Vsock::new(3, dir.as_path().join("no/such/dir.sock")).err();
        assert!(matches!(err, Some(Error::Bind { .. })));
    }

    #[test]
    fn activate_needs_three_queues_and_starts_the_worker() {
        let dir = TempDir::new().unwrap();
        let mut dev = Vsock::new(3, dir.as_path().join("v.sock")).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
        let queue = |i: u64| {
            let base = (i * 0x1_0000) as u32;
            let mut q = Queue::new(256).unwrap();
            q.set_desc_table_address(Some(base), Some(0));
            q.set_avail_ring_address(Some(base + 0x4000), Some(0));
            q.set_used_ring_address(Some(base + 0x8000), Some(0));
            q.set_ready(true);
            ActiveQueue {
                queue: q,
                notify: EventFd::new(0).unwrap(),
            }
        };
        let err = dev.activate(mem.clone(), irq.clone(), vec![queue(0)]);
        assert!(matches!(
            err,
            Err(ActivateError::Queues { want: 3, got: 1 })
        ));
        dev.activate(mem, irq, vec![queue(0), queue(1), queue(2)])
            .unwrap();
        assert!(dev.common().is_running());
        assert!(dev.reset());
        assert!(!dev.common().is_running());
    }

    #[test]
    fn host_connect_reaches_the_guest_rx_queue_through_the_worker() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let mut dev = Vsock::new(3, path.clone()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let w = VRING_DESC_F_WRITE as u16;
        let n = VRING_DESC_F_NEXT as u16;
        rxq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x10_0000, 44, w | n, 1)),
                RawDescriptor::from(Descriptor::new(0x11_0000, 4096, w, 0)),
            ],
            0,
        )
        .unwrap();
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
        let queues = [&rxq, &txq, &evq]
            .iter()
            .map(|m| ActiveQueue {
                queue: m.create_queue().unwrap(),
                notify: EventFd::new(0).unwrap(),
            })
            .collect();
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();

        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        let used_idx = rxq.used_addr().checked_add(2).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while mem.read_obj::<u16>(used_idx).unwrap() != 1 {
            assert!(Instant::now() < deadline, "no REQUEST reached the guest");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(u64::from_le_bytes(hdr[8..16].try_into().unwrap()), 3); // dst_cid
        assert_eq!(u32::from_le_bytes(hdr[20..24].try_into().unwrap()), 52); // dst_port
        assert_eq!(u16::from_le_bytes(hdr[30..32].try_into().unwrap()), 1); // REQUEST
        assert_ne!(irq.status() & crate::virtio::INT_VRING, 0);
        drop(dev);
        assert!(!path.exists());
    }
}

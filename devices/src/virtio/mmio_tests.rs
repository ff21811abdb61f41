//! Tests of the virtio-mmio transport (a fake device behind it).

use std::sync::Mutex;

use super::*;
use crate::virtio::common::DeviceCommon;
use crate::virtio::{ActivateError, INT_VRING};

#[derive(Default)]
struct Seen {
    acked: Option<u64>,
    queues: Vec<ActiveQueue>,
    resets: usize,
    activations: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct FakeDevice {
    common: DeviceCommon,
    need: usize,
    resettable: bool,
    seen: Arc<Mutex<Seen>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        19
    }
    fn common(&self) -> &DeviceCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }
    fn ack_features(&mut self, features: u64) {
        self.seen.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.seen
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.need {
            return Err(ActivateError::Queues {
                want: self.need,
                got: queues.len(),
            });
        }
        let mut seen = self.seen.lock().unwrap();
        seen.queues = queues;
        seen.activations += 1;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        let mut s = self.seen.lock().unwrap();
        s.resets += 1;
        s.queues.clear();
        self.resettable
    }
}

const FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b101;

fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let dev = FakeDevice {
        common: DeviceCommon::new(FEATURES, vec![256, 128]),
        need: 2,
        resettable: true,
        seen: seen.clone(),
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    (MmioTransport::new(Box::new(dev), mem, irq).unwrap(), seen)
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// ACKNOWLEDGE | DRIVER, then `features`, then FEATURES_OK; the status read back.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    wr(t, reg::STATUS, status::ACKNOWLEDGE);
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, features as u32);
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    rd(t, reg::STATUS)
}

fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32, base: u64) {
    wr(t, reg::QUEUE_SEL, idx);
    wr(t, reg::QUEUE_NUM, size);
    wr(t, reg::QUEUE_DESC_LOW, base as u32);
    wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
    wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    wr(t, reg::QUEUE_DRIVER_HIGH, 0);
    wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    wr(t, reg::QUEUE_DEVICE_HIGH, 0);
    wr(t, reg::QUEUE_READY, 1);
}

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identification_registers() {
    let (mut t, _) = transport();
    assert_eq!(rd(&mut t, reg::MAGIC_VALUE), 0x74726976);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), 19);
    assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 0);
    // Non-32-bit register accesses read as zero.
    let mut b = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn device_features_by_selector() {
    let (mut t, _) = transport();
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0b101);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_subset_with_version_1_are_accepted() {
    let (mut t, seen) = transport();
    let st = negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b1);
    assert_ne!(st & status::FEATURES_OK, 0);
    assert_eq!(seen.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1 | 1));
}

#[test]
fn features_not_offered_are_refused() {
    let (mut t, seen) = transport();
    let st = negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
    assert_eq!(st & status::FEATURES_OK, 0);
    assert_eq!(seen.lock().unwrap().acked, None);
}

#[test]
fn features_without_version_1_are_refused() {
    let (mut t, _) = transport();
    let st = negotiate(&mut t, 0b1);
    assert_eq!(st & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not activate.
    wr(&mut t, reg::STATUS, st | status::DRIVER_OK);
    assert!(!t.is_activated());
}

#[test]
fn queue_setup_and_activation() {
    let (mut t, seen) = transport();
    negotiate(&mut t, FEATURES);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 256);
    wr(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 128);
    wr(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x2_0000);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert!(t.is_activated());
    assert_eq!(rd(&mut t, reg::STATUS), ALL_OK);
    let s = seen.lock().unwrap();
    assert_eq!(s.queues.len(), 2);
    let q = &s.queues[0].queue;
    assert_eq!(q.size(), 64);
    assert_eq!(q.desc_table(), 0x1_0000);
    assert_eq!(q.avail_ring(), 0x1_1000);
    assert_eq!(q.used_ring(), 0x1_2000);
    assert!(q.ready());
    assert_eq!(s.queues[1].queue.size(), 128);
}

#[test]
fn a_live_device_is_activated_again_only_after_a_reset() {
    let (mut t, seen) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert_eq!(seen.lock().unwrap().activations, 1);
    // A hostile driver clears DRIVER_OK and sets it again, many times.
    for _ in 0..1000 {
        wr(&mut t, reg::STATUS, ALL_OK & !status::DRIVER_OK);
        wr(&mut t, reg::STATUS, ALL_OK);
    }
    assert_eq!(seen.lock().unwrap().activations, 1);
    assert_eq!(rd(&mut t, reg::STATUS), ALL_OK);
    assert!(t.is_activated());
    // After a reset, the device can be set up and activated again.
    wr(&mut t, reg::STATUS, 0);
    assert!(!t.is_activated());
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert_eq!(seen.lock().unwrap().activations, 2);
}

#[test]
fn activation_error_sets_needs_reset_and_config_interrupt() {
    let (mut t, _) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000); // only one of two queues
    wr(&mut t, reg::STATUS, ALL_OK);
    assert!(!t.is_activated());
    assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
}

#[test]
fn invalid_queue_size_or_rings_fail_activation() {
    let (mut t, _) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 100, 0x1_0000); // not a power of two
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);

    let (mut t, _) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x4000_0000); // outside memory
    wr(&mut t, reg::STATUS, ALL_OK);
    assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn reset_clears_everything_and_resets_the_device() {
    let (mut t, seen) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert!(t.is_activated());
    t.interrupt().signal_used().unwrap();
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert!(!t.is_activated());
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    // And it can be brought up again.
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert!(t.is_activated());
}

#[test]
fn live_queue_registers_are_read_only() {
    let (mut t, seen) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    wr(&mut t, reg::QUEUE_NUM, 32); // queue 0 is ready: ignored
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    assert_eq!(seen.lock().unwrap().queues[0].queue.size(), 64);
}

#[test]
fn interrupt_status_and_ack() {
    let (mut t, _) = transport();
    t.interrupt().signal(INT_VRING | INT_CONFIG).unwrap();
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn queue_notify_without_ioeventfd_signals_the_eventfd() {
    let (mut t, seen) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t, 0, 64, 0x1_0000);
    setup_queue(&mut t, 1, 128, 0x2_0000);
    wr(&mut t, reg::STATUS, ALL_OK);
    let fds = t.queue_notify_eventfds();
    assert_eq!(fds.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
    wr(&mut t, reg::QUEUE_NOTIFY, 1);
    wr(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
    let s = seen.lock().unwrap();
    // The device's copy shares the eventfd.
    assert_eq!(s.queues[1].notify.read().unwrap(), 1);
    assert!(s.queues[0].notify.read().is_err());
}

#[test]
fn config_space_goes_to_the_device() {
    let (mut t, seen) = transport();
    let mut b = [0u8; 3];
    t.read(reg::CONFIG + 4, &mut b);
    assert_eq!(b, [4, 5, 6]);
    t.write(reg::CONFIG + 2, &[9]);
    assert_eq!(seen.lock().unwrap().config_writes, [(2, vec![9])]);
}

#[test]
fn cmdline_entry_format() {
    assert_eq!(
        cmdline_entry(0xd000_0000, 5),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
}

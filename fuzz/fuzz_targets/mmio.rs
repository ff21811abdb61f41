//! The virtio-mmio register file (`MmioTransport` on a `Bus`): arbitrary
//! reads and writes of any width at any offset, with feature negotiation,
//! queue setup, activation and reset as the guest drives them, over guest
//! memory whose contents come from the input. Behind it: a fake device
//! (queue count and sizes, features, config space, activation outcome and
//! resettability from the input) or the real vsock device (its socket in a
//! per-process scratch directory).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::SharedDevice;
use devices::virtio::common::DeviceCommon;
use devices::virtio::mmio::{reg, status, MmioTransport, MAGIC_VALUE, MMIO_LEN, MMIO_VERSION};
use devices::virtio::{
    read_config_bytes, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use devices::Bus;
use libfuzzer_sys::fuzz_target;
use sandboxvm_fuzz::{guest_memory, poke, scratch_dir, Input};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = 0xd000_0000;

struct FakeDevice {
    common: DeviceCommon,
    config: Vec<u8>,
    activate_ok: bool,
    resettable: bool,
    active: Arc<Mutex<bool>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        26
    }
    fn common(&self) -> &DeviceCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }
    fn ack_features(&mut self, features: u64) {
        assert_eq!(
            features & !self.common.features(),
            0,
            "acked features never offered"
        );
        assert_ne!(features & VIRTIO_F_VERSION_1, 0, "acked without VERSION_1");
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(end) = start.checked_add(data.len()) {
            if end <= self.config.len() {
                self.config[start..end].copy_from_slice(data);
            }
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let mut active = self.active.lock().unwrap();
        assert!(!*active, "activated twice without a reset");
        assert!(
            queues.len() <= self.common.queue_sizes().len(),
            "more queues than the device has"
        );
        for q in &queues {
            use virtio_queue::QueueT;
            assert!(q.queue.is_valid(&mem), "an invalid queue was handed over");
            assert!(q.queue.ready());
        }
        if !self.activate_ok || queues.len() != self.common.queue_sizes().len() {
            return Err(ActivateError::Backend("refused".into()));
        }
        *active = true;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if self.resettable {
            *self.active.lock().unwrap() = false;
        }
        self.resettable
    }
}

/// A register offset: mostly a real register, sometimes anything in (or
/// just outside) the window.
fn offset(inp: &mut Input) -> u64 {
    const REGS: [u64; 24] = [
        reg::MAGIC_VALUE,
        reg::VERSION,
        reg::DEVICE_ID,
        reg::VENDOR_ID,
        reg::DEVICE_FEATURES,
        reg::DEVICE_FEATURES_SEL,
        reg::DRIVER_FEATURES,
        reg::DRIVER_FEATURES_SEL,
        reg::QUEUE_SEL,
        reg::QUEUE_NUM_MAX,
        reg::QUEUE_NUM,
        reg::QUEUE_READY,
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_STATUS,
        reg::INTERRUPT_ACK,
        reg::STATUS,
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_DESC_HIGH,
        reg::QUEUE_DRIVER_LOW,
        reg::QUEUE_DRIVER_HIGH,
        reg::QUEUE_DEVICE_LOW,
        reg::QUEUE_DEVICE_HIGH,
        reg::CONFIG_GENERATION,
        reg::CONFIG,
    ];
    let b = inp.u8();
    if (b as usize) < REGS.len() * 8 {
        REGS[b as usize % REGS.len()]
    } else {
        u64::from(inp.u16() % 0x1010)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let kind = inp.u8();
    let mem = guest_memory();
    let active = Arc::new(Mutex::new(false));
    let is_fake = kind & 1 == 0;
    let device: Box<dyn VirtioDevice> = if is_fake {
        let nq = usize::from(inp.u8() % 4);
        let sizes = (0..nq)
            .map(|_| match inp.u8() {
                0xff => inp.u16(),
                b => 1 << (b % 10),
            })
            .collect();
        let features = inp.u64() | if kind & 2 == 0 { VIRTIO_F_VERSION_1 } else { 0 };
        let config_len = usize::from(inp.u8() % 64);
        let config = inp.bytes(config_len).to_vec();
        Box::new(FakeDevice {
            common: DeviceCommon::new(features, sizes),
            config,
            activate_ok: kind & 4 == 0,
            resettable: kind & 8 == 0,
            active: active.clone(),
        })
    } else {
        let uds = scratch_dir().join("mmio-vsock.sock");
        let _ = std::fs::remove_file(&uds);
        Box::new(devices::virtio::vsock::Vsock::new(3, uds).expect("vsock device"))
    };
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(device, mem.clone(), irq).unwrap(),
    ));
    let mut bus = Bus::new();
    let shared: SharedDevice = transport.clone();
    bus.insert(shared, BASE, MMIO_LEN).unwrap();

    for _ in 0..512 {
        if inp.is_empty() {
            break;
        }
        let op = inp.u8();
        let width = [1usize, 2, 4, 8][usize::from(op >> 6)];
        match op % 8 {
            0..=2 => {
                let off = offset(&mut inp);
                let mut buf = [0xccu8; 8];
                let data = &mut buf[..width];
                let hit = bus.read(BASE + off, data);
                assert_eq!(hit, off < MMIO_LEN);
                if !hit {
                    continue;
                }
                if off < reg::CONFIG && (width != 4 || off & 3 != 0) {
                    assert!(data.iter().all(|&b| b == 0), "odd-sized register read");
                }
                if width == 4 {
                    let v = u32::from_le_bytes(data[..4].try_into().unwrap());
                    match off {
                        reg::MAGIC_VALUE => assert_eq!(v, MAGIC_VALUE),
                        reg::VERSION => assert_eq!(v, MMIO_VERSION),
                        reg::STATUS => assert_eq!(v, transport.lock().unwrap().status()),
                        _ => {}
                    }
                }
            }
            3..=5 => {
                let off = offset(&mut inp);
                let v = match inp.u8() % 4 {
                    // Status bits in driver order, or a full value.
                    0 => {
                        u64::from([0u32, 1, 3, 0xb, 0xf, 0x4, 0x8, 0x80][usize::from(inp.u8() % 8)])
                    }
                    1 => u64::from(inp.u8()),
                    2 => u64::from(inp.u32()),
                    _ => inp.u64(),
                };
                let bytes = v.to_le_bytes();
                bus.write(BASE + off, &bytes[..width]);
            }
            6 => poke(&mem, &mut inp),
            _ => {
                // A whole queue set up the way a driver does it.
                let q = u64::from(inp.u8() % 4);
                let w = |off: u64, v: u32| {
                    bus.write(BASE + off, &v.to_le_bytes());
                };
                w(reg::QUEUE_SEL, q as u32);
                w(reg::QUEUE_NUM, 1 << (inp.u8() % 10));
                let base = u64::from(inp.u16()) * 16;
                w(reg::QUEUE_DESC_LOW, base as u32);
                w(reg::QUEUE_DESC_HIGH, 0);
                w(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
                w(reg::QUEUE_DRIVER_HIGH, 0);
                w(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
                w(reg::QUEUE_DEVICE_HIGH, 0);
                w(reg::QUEUE_READY, 1);
            }
        }
        let t = transport.lock().unwrap();
        let s = t.status();
        if s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0 {
            assert_ne!(s & status::FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK");
        }
        if t.is_activated() {
            assert_ne!(s & status::DRIVER_OK, 0, "active without DRIVER_OK");
            if is_fake {
                assert!(*active.lock().unwrap(), "transport and device disagree");
            }
        }
        if s == 0 {
            assert!(!t.is_activated(), "active after a reset");
            assert_eq!(t.interrupt().status(), 0, "interrupt pending after a reset");
        }
    }
});

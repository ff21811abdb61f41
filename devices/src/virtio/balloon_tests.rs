use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

#[test]
fn offers_reporting_and_keeps_actual_in_config_space() {
    let mut dev = Balloon::new();
    assert_eq!(dev.device_type(), 5);
    assert_eq!(dev.features(), VIRTIO_F_VERSION_1 | F_REPORTING);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    dev.ack_features(VIRTIO_F_VERSION_1 | F_REPORTING | 1 << 1);
    assert_eq!(
        dev.common().acked_features(),
        VIRTIO_F_VERSION_1 | F_REPORTING
    );
    dev.write_config(4, &7u32.to_le_bytes());
    let mut c = [0xffu8; 8];
    dev.read_config(0, &mut c);
    assert_eq!(c, [0, 0, 0, 0, 7, 0, 0, 0], "num_pages 0, actual 7");
    dev.write_config(0, &9u32.to_le_bytes()); // num_pages is the device's
    dev.read_config(0, &mut c);
    assert_eq!(&c[..4], &[0; 4]);
}

/// A device activated on three mock queues in `mem`; the reporting
/// queue's mock and notify eventfd for the test to drive.
struct Rig {
    dev: Balloon,
    irq: Arc<VirtioInterrupt>,
    kick: EventFd,
}

fn rig<'a>(mem: &'a GuestMemoryMmap) -> (Rig, MockSplitQueue<'a, GuestMemoryMmap>) {
    let queues: Vec<_> = (0..3u64)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1_0000), 16))
        .collect();
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
    let notify: Vec<EventFd> = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
    let kick = notify[REPORTING].try_clone().unwrap();
    let active = queues
        .iter()
        .zip(notify)
        .map(|(m, notify)| ActiveQueue {
            queue: m.create_queue().unwrap(),
            notify,
        })
        .collect();
    let mut dev = Balloon::new();
    dev.ack_features(VIRTIO_F_VERSION_1 | F_REPORTING);
    dev.activate(mem.clone(), irq.clone(), active).unwrap();
    assert!(dev.common().is_running());
    let reporting = queues.into_iter().nth(REPORTING).unwrap();
    (Rig { dev, irq, kick }, reporting)
}

/// Kicks the reporting queue and waits until `n` buffers in all are used.
fn kick_and_wait(rig: &Rig, mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
    rig.kick.write(1).unwrap();
    let used_idx = q.used_addr().checked_add(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while mem.read_obj::<u16>(used_idx).unwrap() != n {
        assert!(Instant::now() < deadline, "the buffers did not come back");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn filled(mem: &GuestMemoryMmap, at: u64, len: u64) {
    mem.write_slice(&vec![0xa5u8; len as usize], GuestAddress(at))
        .unwrap();
}

fn is_zero(mem: &GuestMemoryMmap, at: u64, len: u64) -> bool {
    let mut buf = vec![0u8; len as usize];
    mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
    buf.iter().all(|&b| b == 0)
}

#[test]
fn reported_ranges_read_as_zero_and_the_rest_is_kept() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB_USIZE)]).unwrap();
    filled(&mem, 2 * MIB, 4 * MIB);
    let (rig, q) = rig(&mem);
    // One request of two ranges, as Linux sends them (device-writable).
    q.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(2 * MIB, (MIB) as u32, W | N, 1)),
            RawDescriptor::from(Descriptor::new(4 * MIB, (MIB) as u32, W, 0)),
        ],
        0,
    )
    .unwrap();
    kick_and_wait(&rig, &mem, &q, 1);
    assert!(is_zero(&mem, 2 * MIB, MIB));
    assert!(is_zero(&mem, 4 * MIB, MIB));
    assert!(
        !is_zero(&mem, 3 * MIB, 4096),
        "between the two ranges: kept"
    );
    assert!(!is_zero(&mem, 5 * MIB, MIB), "after them: kept");
    assert_ne!(rig.irq.status() & crate::virtio::INT_VRING, 0);
    let mut dev = rig.dev;
    assert!(dev.reset());
    assert!(!dev.common().is_running());
}

#[test]
fn a_hostile_driver_s_ranges_are_skipped_and_its_buffers_returned() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB_USIZE)]).unwrap();
    filled(&mem, 0x3_0000, 8 * MIB - 0x3_0000);
    let (rig, q) = rig(&mem);
    let bad = [
        (2 * MIB + 1, 4096),       // unaligned start
        (2 * MIB, 4095),           // part of a page
        (2 * MIB, 0),              // nothing
        (7 * MIB, 2 * MIB as u32), // past the end of guest memory
        (!4095u64, 4096),          // the top of the address space
        (64 * MIB, 4096),          // outside guest memory
        (4096, !4095u32),          // the whole space from page 1
    ];
    for (i, &(addr, len)) in bad.iter().enumerate() {
        q.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(addr, len, W, 0))],
            i as u16,
        )
        .unwrap();
    }
    kick_and_wait(&rig, &mem, &q, bad.len() as u16);
    assert!(
        !is_zero(&mem, 2 * MIB, 6 * MIB) && !is_zero(&mem, 7 * MIB, MIB),
        "nothing given back"
    );
    assert!(rig.dev.common().is_running(), "the device lives on");
    // A good report after the garbage is served.
    q.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(
            6 * MIB,
            MIB as u32,
            W,
            0,
        ))],
        bad.len() as u16,
    )
    .unwrap();
    kick_and_wait(&rig, &mem, &q, bad.len() as u16 + 1);
    assert!(is_zero(&mem, 6 * MIB, MIB));
}

#[test]
fn giving_back_shared_guest_memory_punches_a_hole_in_its_file() {
    // Guest RAM as the VMM makes it: a memfd, mapped shared.
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(8 * MIB).unwrap();
    let probe = file.try_clone().unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        8 * MIB_USIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    filled(&mem, 0, 8 * MIB);
    let before = probe.metadata().unwrap().blocks() * 512;
    assert!(before >= 8 * MIB, "{before}");
    give_back(&mem, GuestAddress(2 * MIB), 4 * MIB).unwrap();
    let after = probe.metadata().unwrap().blocks() * 512;
    assert_eq!(before - after, 4 * MIB, "the host got the pages back");
    assert!(is_zero(&mem, 2 * MIB, 4 * MIB));
    assert!(!is_zero(&mem, 6 * MIB, 4096));
}

#[test]
fn a_driver_without_reporting_gets_no_worker() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB_USIZE)]).unwrap();
    let mut dev = Balloon::new();
    dev.ack_features(VIRTIO_F_VERSION_1);
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
    dev.activate(mem, irq, Vec::new()).unwrap();
    assert!(!dev.common().is_running());
}

//! The relay between a guest's queue and virtiofsd's, with the test playing
//! both the guest driver and virtiofsd (which reads our ring in the shared
//! memory and answers on it).

use super::*;
use crate::virtio::net::test_util::{Driver, R, W};

const RING_BASE: u64 = 0x1000;
const BUF: u64 = 0x10_0000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn relay(mem: &GuestMemoryMmap, driver: &Driver) -> (Relay, EventFd, EventFd) {
    relay_with(mem, driver, false)
}

fn relay_with(
    mem: &GuestMemoryMmap,
    driver: &Driver,
    event_idx: bool,
) -> (Relay, EventFd, EventFd) {
    let shared = Arc::new(Shared::new(1).unwrap());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let q = RelayQueue::new(
        ActiveQueue {
            queue: driver.queue(event_idx),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        },
        kick.try_clone().unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    let relay = Relay::new(mem.clone(), shared, interrupt, vec![q]).unwrap();
    (relay, kick, irq)
}

/// A request virtiofsd found on our ring: its head descriptor, what it
/// reads, and where (and how much) it may write.
struct Seen {
    head: u16,
    request: Vec<u8>,
    reply_at: u64,
    reply_cap: u32,
}

/// Plays virtiofsd: takes every request on our ring 0 after `from`.
fn backend_take(shared: &Shared, from: u16) -> Vec<Seen> {
    let m = &shared.mem;
    let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    let mut seen = Vec::new();
    let mut i = from;
    while i != idx {
        let head: u16 = m
            .read_obj(GuestAddress(AVAIL + 4 + 2 * u64::from(i % RING)))
            .unwrap();
        let d: RawDescriptor = m.read_obj(GuestAddress(16 * u64::from(head))).unwrap();
        let d = Descriptor::from(d);
        assert!(!d.is_write_only());
        let mut request = vec![0u8; d.len() as usize];
        m.read_slice(&mut request, d.addr()).unwrap();
        let (mut reply_at, mut reply_cap) = (0, 0);
        if d.has_next() {
            let w: RawDescriptor = m.read_obj(GuestAddress(16 * u64::from(d.next()))).unwrap();
            let w = Descriptor::from(w);
            assert!(w.is_write_only());
            assert!(!w.has_next());
            (reply_at, reply_cap) = (w.addr().0, w.len());
        }
        seen.push(Seen {
            head,
            request,
            reply_at,
            reply_cap,
        });
        i = i.wrapping_add(1);
    }
    seen
}

/// Plays virtiofsd answering: writes `reply` for descriptor `id` and says
/// it wrote `len` bytes.
fn backend_use(shared: &Shared, used_idx: u16, id: u32, reply_at: u64, reply: &[u8], len: u32) {
    let m = &shared.mem;
    if !reply.is_empty() {
        m.write_slice(reply, GuestAddress(reply_at)).unwrap();
    }
    let elem = GuestAddress(USED + 4 + 8 * u64::from(used_idx % RING));
    m.write_obj(id, elem).unwrap();
    m.write_obj(len, GuestAddress(elem.0 + 4)).unwrap();
    m.write_obj(used_idx.wrapping_add(1), GuestAddress(USED + 2))
        .unwrap();
}

#[test]
fn a_request_goes_to_virtiofsd_and_its_reply_back_to_the_guest() {
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, RING_BASE, 16);
    let (mut relay, kick, irq) = relay_with(&mem, &driver, true);
    mem.write_slice(b"FUSE header+", GuestAddress(BUF)).unwrap();
    mem.write_slice(b"lookup name", GuestAddress(BUF + 0x100))
        .unwrap();
    // Two readable parts, two writable ones (the reply spans both).
    let head = driver.add(&[
        (BUF, 12, R),
        (BUF + 0x100, 11, R),
        (BUF + 0x1000, 8, W),
        (BUF + 0x2000, 100, W),
    ]);
    relay.pump(0);
    assert_eq!(kick.read().unwrap(), 1, "virtiofsd is kicked");
    assert_eq!(
        driver.avail_event(),
        1,
        "EVENT_IDX: kick at the next request"
    );
    let seen = backend_take(&relay.shared, 0);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request, b"FUSE header+lookup name");
    assert_eq!(seen[0].reply_cap, 108);
    let reply: Vec<u8> = (0..20u8).collect();
    backend_use(
        &relay.shared,
        0,
        seen[0].head.into(),
        seen[0].reply_at,
        &reply,
        20,
    );
    relay.complete(0);
    assert_eq!(driver.used_idx(), 1);
    assert_eq!(driver.used(0), (u32::from(head), 20));
    assert_eq!(driver.read(BUF + 0x1000, 8), reply[..8]);
    assert_eq!(driver.read(BUF + 0x2000, 12), reply[8..]);
    assert_eq!(driver.read(BUF + 0x2000 + 12, 4), [0; 4]);
    assert!(irq.read().unwrap() >= 1, "the guest is interrupted");
    assert_eq!(relay.arena.free, BTreeMap::from([(0, ARENA)]));
}

#[test]
fn a_reply_longer_than_the_guests_buffers_is_cut_to_them() {
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, RING_BASE, 16);
    let (mut relay, _kick, _irq) = relay(&mem, &driver);
    let head = driver.add(&[(BUF, 16, R), (BUF + 0x1000, 8, W)]);
    relay.pump(0);
    let seen = backend_take(&relay.shared, 0);
    // virtiofsd claims far more than the buffer it was given.
    backend_use(&relay.shared, 0, seen[0].head.into(), 0, &[], u32::MAX);
    relay.complete(0);
    assert_eq!(driver.used(0), (u32::from(head), 8));
}

#[test]
fn malformed_and_oversized_chains_are_answered_empty_and_never_reach_virtiofsd() {
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, RING_BASE, 16);
    let (mut relay, kick, _irq) = relay(&mem, &driver);
    // Writable before readable.
    let a = driver.add(&[(BUF + 0x1000, 8, W), (BUF, 16, R)]);
    // Nothing readable (no FUSE header).
    let b = driver.add(&[(BUF + 0x1000, 8, W)]);
    // More than the whole arena.
    let c = driver.add(&[(BUF, 16, R), (BUF, ARENA as u32 + 1, W)]);
    // Outside guest memory.
    let d = driver.add(&[(1 << 40, 16, R), (BUF, 16, W)]);
    relay.pump(0);
    assert_eq!(driver.used_idx(), 4);
    for (i, head) in [a, b, c, d].into_iter().enumerate() {
        assert_eq!(driver.used(i as u16), (u32::from(head), 0));
    }
    assert!(kick.read().is_err(), "virtiofsd is not kicked");
    assert!(backend_take(&relay.shared, 0).is_empty());
    assert_eq!(relay.arena.free, BTreeMap::from([(0, ARENA)]));
}

#[test]
fn a_request_that_does_not_fit_waits_for_a_reply_to_free_space() {
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, RING_BASE, 16);
    let (mut relay, _kick, _irq) = relay(&mem, &driver);
    let big = (ARENA / 2) as u32;
    let first = driver.add(&[(BUF, 64, R), (BUF, big, W)]);
    let second = driver.add(&[(BUF, 64, R), (BUF, big, W)]);
    relay.pump(0);
    let seen = backend_take(&relay.shared, 0);
    assert_eq!(seen.len(), 1, "the second request waits");
    backend_use(&relay.shared, 0, seen[0].head.into(), 0, &[], 0);
    // As the worker does on virtiofsd's call: complete, then pump.
    relay.complete(0);
    relay.pump(0);
    assert_eq!(driver.used(0), (u32::from(first), 0));
    let seen = backend_take(&relay.shared, 1);
    assert_eq!(seen.len(), 1, "the second request went");
    backend_use(&relay.shared, 1, seen[0].head.into(), 0, &[], 0);
    relay.complete(0);
    assert_eq!(driver.used(1), (u32::from(second), 0));
}

#[test]
fn used_entries_for_nothing_in_flight_are_dropped() {
    let mem = guest_memory();
    let driver = Driver::new(&mem, RING_BASE, 16);
    let (mut relay, _kick, _irq) = relay(&mem, &driver);
    // Odd id, out of range, and an even id never posted.
    backend_use(&relay.shared, 0, 3, 0, &[], 1);
    backend_use(&relay.shared, 1, u32::MAX, 0, &[], 1);
    backend_use(&relay.shared, 2, 4, 0, &[], 1);
    relay.complete(0);
    assert_eq!(driver.used_idx(), 0);
    assert_eq!(relay.queues[0].free_pairs.len(), usize::from(RING / 2));
}

#[test]
fn the_arena_reuses_the_lowest_space_and_merges_what_is_freed() {
    let mut a = Arena::new(4096);
    let x = a.alloc(100).unwrap();
    let y = a.alloc(1000).unwrap();
    let z = a.alloc(256).unwrap();
    assert_eq!((x, y, z), (0, 256, 1280));
    assert_eq!(a.alloc(4096), None);
    a.release(y, 1000);
    assert_eq!(a.alloc(10), Some(256), "first fit, lowest address");
    a.release(256, 10);
    a.release(x, 100);
    a.release(z, 256);
    assert_eq!(a.free, BTreeMap::from([(0, 4096)]));
}

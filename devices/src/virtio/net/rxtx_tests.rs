//! [`Rxtx`] against real split virtqueues in guest memory (a small driver
//! side below) and a scripted tap.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::rxtx::{RxStop, Rxtx, RxtxFeatures, Signal, TapIo, TxStop, BUDGET};
use super::test_util::{Driver, R, W};
use super::VNET_HDR_LEN;

/// A tap that serves `to_read` and records writes; the next `full` writes
/// say EAGAIN, and `write_error` makes every write fail.
#[derive(Default)]
struct FakeTap {
    to_read: VecDeque<Vec<u8>>,
    written: Vec<Vec<u8>>,
    full: usize,
    write_error: Option<i32>,
}

impl TapIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.to_read.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        buf[..frame.len()].copy_from_slice(&frame);
        Ok(frame.len())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if let Some(errno) = self.write_error {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if self.full > 0 {
            self.full -= 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.written.push(frame.to_vec());
        Ok(frame.len())
    }
}

#[derive(Default)]
struct Irq(Cell<u32>);

impl Signal for Irq {
    fn signal_used(&self) {
        self.0.set(self.0.get() + 1);
    }
}

impl Irq {
    fn take(&self) -> u32 {
        self.0.replace(0)
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

const TX_BASE: u64 = 0x1_0000;
const BUF: u64 = 0x10_0000;

/// A frame: vnet header `hdr` then `len` bytes of a pattern seeded by `seed`.
fn frame(hdr: [u8; VNET_HDR_LEN], len: usize, seed: u8) -> Vec<u8> {
    let mut f = hdr.to_vec();
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// A TSOv4 header with partial checksum (what a Linux guest sends).
const TSO_HDR: [u8; VNET_HDR_LEN] = [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0];
const MRG: RxtxFeatures = RxtxFeatures {
    mrg_rxbuf: true,
    guest_csum: true,
};

#[test]
fn a_tx_chain_becomes_one_tap_write_with_its_vnet_header() {
    let mem = memory();
    let mut d = Driver::new(&mem, TX_BASE, 16);
    let f = frame(TSO_HDR, 3000, 1);
    // Header alone, then the data in two pieces, as drivers do.
    let head = d.add_tx_frame(BUF, &f, &[VNET_HDR_LEN, 1000, 2000]);
    let mut q = d.queue(false);
    let (mut tap, irq) = (FakeTap::default(), Irq::default());
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
    assert_eq!(tap.written, vec![f]);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (u32::from(head), 0));
    assert_eq!(irq.take(), 1);
    // Notifications are back on for the next frame.
    assert_eq!(d.used_flags(), 0);
    assert!(!rxtx.tx_blocked());
}

#[test]
fn indirect_tx_chains_work() {
    let mem = memory();
    let mut d = Driver::new(&mem, TX_BASE, 16);
    let f = frame(TSO_HDR, 5000, 2);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    let parts = [(BUF, 12, R), (BUF + 12, 2000, R), (BUF + 2012, 3000, R)];
    let head = d.add_indirect(BUF + 0x10_0000, &parts);
    let mut q = d.queue(false);
    let (mut tap, irq) = (FakeTap::default(), Irq::default());
    let mut rxtx = Rxtx::new(MRG);
    rxtx.process_tx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(tap.written, vec![f]);
    assert_eq!(d.used(0), (u32::from(head), 0));
}

#[test]
fn eagain_keeps_the_tx_chain_and_retries_it_first() {
    let mem = memory();
    let mut d = Driver::new(&mem, TX_BASE, 16);
    let f1 = frame([0; 12], 100, 1);
    let f2 = frame([0; 12], 200, 2);
    d.add_tx_frame(BUF, &f1, &[112]);
    d.add_tx_frame(BUF + 0x1000, &f2, &[12, 200]);
    let mut q = d.queue(false);
    let irq = Irq::default();
    let mut tap = FakeTap {
        full: 2,
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::TapFull
    );
    assert!(rxtx.tx_blocked());
    assert_eq!(d.used_idx(), 0, "the refused chain is not used");
    assert_eq!(irq.take(), 0);
    // Still full (EPOLLOUT came early): still waiting, nothing lost.
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::TapFull
    );
    assert!(tap.written.is_empty());
    // Writable: both frames, in order.
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
    assert_eq!(tap.written, vec![f1, f2]);
    assert_eq!(d.used_idx(), 2);
    assert!(!rxtx.tx_blocked());
    assert_eq!(rxtx.stats(), Default::default());
}

#[test]
fn malformed_tx_chains_and_tap_errors_are_dropped_and_counted() {
    let mem = memory();
    let mut d = Driver::new(&mem, TX_BASE, 16);
    let bad = d.add(&[(BUF, 12, R), (BUF + 12, 100, W)]); // write-only part
    let short = d.add(&[(BUF, 8, R)]); // shorter than the header
    let outside = d.add(&[(0x4000_0000, 100, R)]); // not guest memory
    let f = frame([0; 12], 64, 3);
    d.add_tx_frame(BUF + 0x1000, &f, &[76]);
    let mut q = d.queue(false);
    let (mut tap, irq) = (FakeTap::default(), Irq::default());
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
    assert_eq!(tap.written, vec![f.clone()]);
    assert_eq!(rxtx.stats().tx_malformed, 3);
    assert_eq!(d.used_idx(), 4);
    for (i, head) in [bad, short, outside].into_iter().enumerate() {
        assert_eq!(d.used(i as u16), (u32::from(head), 0));
    }

    // A tap that refuses frames (link down: EIO) does not stall the queue.
    d.add_tx_frame(BUF, &f, &[76]);
    tap.write_error = Some(libc::EIO);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
    assert_eq!(rxtx.stats().tx_errors, 1);
    assert_eq!(d.used_idx(), 5);
}

#[test]
fn tx_yields_after_its_budget() {
    let mem = memory();
    let mut d = Driver::new(&mem, TX_BASE, 256);
    let f = frame([0; 12], 50, 4);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    for _ in 0..BUDGET + 10 {
        d.add(&[(BUF, f.len() as u32, R)]);
    }
    let mut q = d.queue(false);
    let (mut tap, irq) = (FakeTap::default(), Irq::default());
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::Budget
    );
    assert_eq!(tap.written.len(), BUDGET);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
    assert_eq!(tap.written.len(), BUDGET + 10);
}

#[test]
fn event_idx_suppresses_tx_interrupts_until_used_event() {
    let mem = memory();
    let mut d = Driver::new(&mem, TX_BASE, 16);
    let f = frame([0; 12], 50, 5);
    mem.write_slice(&f, GuestAddress(BUF)).unwrap();
    d.set_used_event(2); // interrupt when used idx passes 2
    let mut q = d.queue(true);
    let (mut tap, irq) = (FakeTap::default(), Irq::default());
    let mut rxtx = Rxtx::new(MRG);
    d.add(&[(BUF, 62, R)]);
    rxtx.process_tx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(irq.take(), 0);
    assert_eq!(d.avail_event(), 1, "kick me for the next chain");
    d.add(&[(BUF, 62, R)]);
    d.add(&[(BUF, 62, R)]);
    rxtx.process_tx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(irq.take(), 1);
    assert_eq!(tap.written.len(), 3);
}

/// rx buffers of `len` bytes each at BUF + i * 0x1_0000.
fn post_rx(d: &mut Driver, first: usize, count: usize, len: u32) -> Vec<u16> {
    (first..first + count)
        .map(|i| d.add(&[(BUF + i as u64 * 0x1_0000, len, W)]))
        .collect()
}

#[test]
fn a_big_rx_frame_spans_mergeable_buffers() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let heads = post_rx(&mut d, 0, 4, 1500);
    let mut q = d.queue(false);
    let irq = Irq::default();
    // A GSO frame from the tap: header (num_buffers not set by the tap).
    let mut hdr = TSO_HDR;
    hdr[10] = 0xaa;
    let f = frame(hdr, 4000 - VNET_HDR_LEN, 9);
    let mut tap = FakeTap {
        to_read: [f.clone()].into(),
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::TapEmpty
    );
    assert_eq!(d.used_idx(), 3);
    let lens: Vec<(u32, u32)> = (0..3).map(|i| d.used(i)).collect();
    assert_eq!(
        lens,
        [
            (u32::from(heads[0]), 1500),
            (u32::from(heads[1]), 1500),
            (u32::from(heads[2]), 1000)
        ]
    );
    let mut got = d.read(BUF, 1500);
    got.extend(d.read(BUF + 0x1_0000, 1500));
    got.extend(d.read(BUF + 0x2_0000, 1000));
    // num_buffers = 3; everything else as the tap gave it.
    let mut want = f;
    want[10..12].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(got, want);
    assert_eq!(irq.take(), 1);
}

#[test]
fn the_buffers_of_a_frame_reach_the_used_ring_together() {
    // A driver that sees a frame's first buffer (num_buffers = 3) must find
    // the other two: a concurrent reader of the used index only ever sees
    // whole frames.
    let mem = memory();
    for round in 0..5 {
        let mut d = Driver::new(&mem, 0, 256);
        post_rx(&mut d, 0, 240, 1500);
        let mut q = d.queue(false);
        let irq = Irq::default();
        let mut tap = FakeTap {
            to_read: (0..80).map(|i| frame([0; 12], 3988, i)).collect(),
            ..FakeTap::default()
        };
        let (watch_mem, at) = (mem.clone(), d.used_idx_addr());
        let watcher = std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            loop {
                let idx: u16 = watch_mem.read_obj(at).unwrap();
                seen.insert(idx);
                if idx == 240 {
                    return seen;
                }
            }
        });
        let mut rxtx = Rxtx::new(MRG);
        while rxtx.process_rx(&mem, &mut q, &mut tap, &irq) != RxStop::TapEmpty {}
        let seen = watcher.join().unwrap();
        assert!(
            seen.iter().all(|i| i % 3 == 0),
            "round {round}: split frames seen: {seen:?}"
        );
        assert_eq!(rxtx.stats(), Default::default());
    }
}

#[test]
fn event_idx_rx_interrupts_count_every_buffer_of_a_frame() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    post_rx(&mut d, 0, 8, 1500);
    let mut q = d.queue(true);
    let irq = Irq::default();
    let mut tap = FakeTap::default();
    let mut rxtx = Rxtx::new(MRG);
    // The driver asks for an interrupt as soon as buffer 0 is used: a
    // 3-buffer frame must raise it.
    d.set_used_event(0);
    tap.to_read.push_back(frame([0; 12], 3988, 1));
    rxtx.process_rx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(d.used_idx(), 3);
    assert_eq!(irq.take(), 1);
    // Not before used index 6 passes: the next 3-buffer frame (3..6) does
    // not interrupt, the one after (6..9) does.
    d.set_used_event(6);
    tap.to_read.push_back(frame([0; 12], 3988, 2));
    rxtx.process_rx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(irq.take(), 0);
    post_rx(&mut d, 8, 1, 1500);
    tap.to_read.push_back(frame([0; 12], 3988, 3));
    rxtx.process_rx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(d.used_idx(), 9);
    assert_eq!(irq.take(), 1);
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    // Header and data in separate descriptors of one chain.
    let head = d.add(&[(BUF, 12, W), (BUF + 0x100, 1514, W)]);
    let mut q = d.queue(false);
    let irq = Irq::default();
    let mut hdr = [0u8; 12];
    hdr[0] = 2; // DATA_VALID
    let f = frame(hdr, 1000, 1);
    let mut tap = FakeTap {
        to_read: [f.clone()].into(),
        ..FakeTap::default()
    };
    let features = RxtxFeatures {
        mrg_rxbuf: false,
        guest_csum: false,
    };
    let mut rxtx = Rxtx::new(features);
    rxtx.process_rx(&mem, &mut q, &mut tap, &irq);
    assert_eq!(d.used(0), (u32::from(head), 1012));
    let mut want = f;
    want[0] = 0; // no checksum flags for a driver without GUEST_CSUM
    want[10] = 1; // num_buffers
    let mut got = d.read(BUF, 12);
    got.extend(d.read(BUF + 0x100, 1000));
    assert_eq!(got, want);
}

#[test]
fn no_rx_buffers_means_stop_reading_the_tap_until_the_guest_adds_some() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let mut q = d.queue(false);
    q.disable_notification(&mem).unwrap(); // as if rx was busy before
    let irq = Irq::default();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame([0; 12], 1000, i)).collect();
    let mut tap = FakeTap {
        to_read: frames.iter().cloned().collect(),
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::NoBuffers
    );
    assert!(rxtx.rx_blocked());
    assert_eq!(tap.to_read.len(), 2, "only one frame read, and kept");
    assert_eq!(
        d.used_flags(),
        0,
        "the guest is asked to notify new buffers"
    );
    // Called again without new buffers (a spurious wakeup): nothing moves.
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::NoBuffers
    );
    assert_eq!(tap.to_read.len(), 2);

    // One buffer: the staged frame goes, the next one waits.
    post_rx(&mut d, 0, 1, 2048);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::NoBuffers
    );
    assert_eq!(d.used_idx(), 1);
    assert_eq!(irq.take(), 1);
    // Two more: the rest, in order.
    post_rx(&mut d, 1, 2, 2048);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::TapEmpty
    );
    assert!(!rxtx.rx_blocked());
    assert_eq!(d.used_idx(), 3);
    for (i, f) in frames.iter().enumerate() {
        let mut got = d.read(BUF + i as u64 * 0x1_0000, f.len());
        got[10] = 0; // num_buffers = 1
        assert_eq!(&got[..], &f[..], "frame {i}");
        assert_eq!(d.used(i as u16).1, f.len() as u32);
    }
    assert_eq!(rxtx.stats(), Default::default());
}

#[test]
fn a_frame_waits_until_enough_mergeable_buffers_are_there() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    post_rx(&mut d, 0, 2, 1500);
    let mut q = d.queue(true);
    let irq = Irq::default();
    let f = frame([0; 12], 3500, 7);
    let mut tap = FakeTap {
        to_read: [f.clone()].into(),
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::NoBuffers
    );
    assert_eq!(d.used_idx(), 0, "no partial frame");
    assert_eq!(d.avail_event(), 2, "EVENT_IDX: kick when buffer 3 comes");
    post_rx(&mut d, 2, 1, 1500);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::TapEmpty
    );
    assert_eq!(d.used_idx(), 3);
    assert_eq!(d.used(2).1, 3512 - 3000);
    assert_eq!(d.read(BUF, 12)[10], 3);
}

#[test]
fn frames_that_can_never_fit_are_dropped_and_counted_not_truncated() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 4);
    let no_mrg = RxtxFeatures::default();
    let big = frame([0; 12], 3000, 1);
    let small = frame([0; 12], 100, 2);
    let irq = Irq::default();

    // Without mergeable buffers: a frame bigger than a buffer.
    post_rx(&mut d, 0, 1, 1526);
    let mut q = d.queue(false);
    let mut tap = FakeTap {
        to_read: [big.clone(), small.clone()].into(),
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(no_mrg);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::TapEmpty
    );
    assert_eq!(rxtx.stats().rx_too_big, 1);
    assert_eq!(d.used_idx(), 1, "the buffer went to the next frame");
    assert_eq!(d.used(0).1, small.len() as u32);

    // Mergeable: bigger than the whole ring (4 x 500 bytes).
    let mut d = Driver::new(&mem, 0x8000, 4);
    post_rx(&mut d, 0, 4, 500);
    let mut q = d.queue(false);
    tap.to_read = [big, small.clone()].into();
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::TapEmpty
    );
    assert_eq!(rxtx.stats().rx_too_big, 1);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, small.len() as u32));
}

/// Offers one 500-byte frame from the tap to the rx buffers posted in `d`.
fn receive_one_frame(mem: &GuestMemoryMmap, d: &Driver) -> (Rxtx, Vec<u8>) {
    let mut q = d.queue(false);
    let f = frame([0; 12], 500, 3);
    let mut tap = FakeTap {
        to_read: [f.clone()].into(),
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(MRG);
    rxtx.process_rx(mem, &mut q, &mut tap, &Irq::default());
    (rxtx, f)
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 16);
    let ro = d.add(&[(BUF, 2048, R)]);
    let tiny = d.add(&[(BUF, 8, W)]);
    let good = post_rx(&mut d, 1, 1, 2048)[0];
    let (rxtx, f) = receive_one_frame(&mem, &d);
    assert_eq!(rxtx.stats().rx_bad_buffers, 2);
    assert_eq!(d.used(0), (u32::from(ro), 0));
    assert_eq!(d.used(1), (u32::from(tiny), 0));
    assert_eq!(d.used(2), (u32::from(good), f.len() as u32));
}

#[test]
fn zero_length_and_overlong_chains_are_refused_on_rx_and_tx() {
    let mem = memory();
    // rx: a zero-length descriptor in a chain, and an indirect table of
    // 4000 one-byte descriptors (the host would keep a region per entry).
    let mut d = Driver::new(&mem, 0, 16);
    let zero = d.add(&[(BUF, 12, W), (BUF + 12, 0, W), (BUF + 12, 2048, W)]);
    let many: Vec<_> = (0..4000).map(|i| (BUF + i, 1, W)).collect();
    let long = d.add_indirect(BUF + 0x10_0000, &many);
    let good = post_rx(&mut d, 4, 1, 2048)[0];
    let (rxtx, f) = receive_one_frame(&mem, &d);
    assert_eq!(rxtx.stats().rx_bad_buffers, 2);
    assert_eq!(d.used(0), (u32::from(zero), 0));
    assert_eq!(d.used(1), (u32::from(long), 0));
    assert_eq!(d.used(2), (u32::from(good), f.len() as u32));

    // tx: the same shapes are malformed frames, dropped and counted.
    let mut d = Driver::new(&mem, TX_BASE, 16);
    d.add(&[(BUF, 12, R), (BUF, 0, R), (BUF, 100, R)]);
    let many: Vec<_> = (0..4000).map(|i| (BUF + i, 1, R)).collect();
    d.add_indirect(BUF + 0x20_0000, &many);
    let mut q = d.queue(false);
    let mut tap = FakeTap::default();
    let mut rxtx = Rxtx::new(MRG);
    rxtx.process_tx(&mem, &mut q, &mut tap, &Irq::default());
    assert!(tap.written.is_empty());
    assert_eq!(rxtx.stats().tx_malformed, 2);
    assert_eq!(d.used_idx(), 2);
}

#[test]
fn rx_yields_after_its_budget() {
    let mem = memory();
    let mut d = Driver::new(&mem, 0, 256);
    for i in 0..BUDGET + 5 {
        d.add(&[(BUF + i as u64 * 0x1000, 2048, W)]);
    }
    let mut q = d.queue(false);
    let irq = Irq::default();
    let mut tap = FakeTap {
        to_read: (0..BUDGET + 5)
            .map(|i| frame([0; 12], 60, i as u8))
            .collect(),
        ..FakeTap::default()
    };
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::Budget
    );
    assert_eq!(usize::from(d.used_idx()), BUDGET);
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::TapEmpty
    );
    assert_eq!(usize::from(d.used_idx()), BUDGET + 5);
}

/// Found by fuzzing (fuzz/ `net_rxtx`): an available index more than a
/// queue's worth ahead, or an available ring at address 0, made
/// `enable_notification` report new buffers that `pop_descriptor_chain`
/// refuses, and both loops retried forever.
#[test]
fn an_available_index_too_far_ahead_does_not_spin() {
    // On the old code this spun forever: a failure, not a hung test run.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        an_available_index_too_far_ahead_body();
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the rx/tx loops spun on a bad available index (or failed)");
}

fn an_available_index_too_far_ahead_body() {
    let mem = memory();
    let d = Driver::new(&mem, TX_BASE, 16);
    let mut q = d.queue(false);
    mem.write_obj(17u16, GuestAddress(TX_BASE + 16 * 16 + 2))
        .unwrap();
    let (mut tap, irq) = (FakeTap::default(), Irq::default());
    let mut rxtx = Rxtx::new(MRG);
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
    assert!(tap.written.is_empty());
    assert_eq!(d.used_idx(), 0);

    let d = Driver::new(&mem, 0, 16);
    let mut q = d.queue(true);
    mem.write_obj(0x8000u16, GuestAddress(16 * 16 + 2)).unwrap();
    let mut tap = FakeTap {
        to_read: [frame([0; 12], 100, 0)].into_iter().collect(),
        ..FakeTap::default()
    };
    assert_eq!(
        rxtx.process_rx(&mem, &mut q, &mut tap, &irq),
        RxStop::NoBuffers
    );
    assert!(rxtx.rx_blocked());
    assert_eq!(d.used_idx(), 0);

    // The available ring at 0 (the transport takes it): one entry on it.
    let mut q = virtio_queue::Queue::new(16).unwrap();
    q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x2000)).unwrap();
    q.set_ready(true);
    assert!(q.is_valid(&mem));
    mem.write_obj(1u16, GuestAddress(2)).unwrap();
    assert_eq!(
        rxtx.process_tx(&mem, &mut q, &mut tap, &irq),
        TxStop::QueueEmpty
    );
}

//! virtio-net's frame mover (`Rxtx`) between real split virtqueues in
//! guest memory and a fake tap: the guest's descriptor tables, rings and
//! buffers, the queue layout and the tap's frames all come from the input.

#![no_main]

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;

use devices::virtio::net::rxtx::{Rxtx, RxtxFeatures, Signal, TapIo};
use devices::virtio::net::{MAX_FRAME_LEN, QUEUE_SIZE, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use sandboxvm_fuzz::{check_used, driver_step, guest_memory, rx_tx_queues, Input};
use virtio_queue::QueueT;

/// What the tap does with writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TapWrite {
    Accept,
    Full,
    Fail,
}

struct FakeTap {
    /// Frames to read (`None`: a read error).
    frames: VecDeque<Option<Vec<u8>>>,
    write: TapWrite,
    written: Vec<usize>,
}

impl TapIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.frames.pop_front() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(None) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(Some(f)) => {
                // A tap read truncates to the buffer, like read(2).
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        assert!(
            frame.len() >= VNET_HDR_LEN && frame.len() <= MAX_FRAME_LEN,
            "a {}-byte frame reached the tap",
            frame.len()
        );
        match self.write {
            TapWrite::Accept => {
                self.written.push(frame.len());
                Ok(frame.len())
            }
            TapWrite::Full => Err(io::ErrorKind::WouldBlock.into()),
            TapWrite::Fail => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

#[derive(Default)]
struct Irq(Cell<u64>);

impl Signal for Irq {
    fn signal_used(&self) {
        self.0.set(self.0.get() + 1);
    }
}

fn frame(inp: &mut Input) -> Option<Vec<u8>> {
    let tag = inp.u8();
    if tag == 0xff {
        return None;
    }
    let len = match tag % 4 {
        // Sometimes huge (a 64 KiB GSO frame, or beyond the staging buffer).
        0 => usize::from(inp.u16()) + usize::from(inp.u8() & 1) * 0x10000,
        _ => usize::from(inp.u16() % 2048),
    };
    // The header and the first bytes from the input, the rest a pattern.
    let head = inp.bytes(len.min(64));
    let mut f = vec![0xa5u8; len];
    f[..head.len()].copy_from_slice(head);
    Some(f)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let features = RxtxFeatures {
        mrg_rxbuf: flags & 1 != 0,
        guest_csum: flags & 2 != 0,
    };
    let mem = guest_memory();
    let Some((mut rxq, mut txq, strict)) = rx_tx_queues(&mut inp, &mem, QUEUE_SIZE) else {
        return;
    };
    let mut tap = FakeTap {
        frames: VecDeque::new(),
        write: TapWrite::Accept,
        written: Vec::new(),
    };
    let irq = Irq::default();
    let mut rxtx = Rxtx::new(features);
    // Chains the device took off each queue and has not used yet.
    let (mut rx_taken, mut tx_taken) = (0u64, 0u64);
    let (mut rx_seen_used, mut tx_seen_used) = (0u64, 0u64);
    let mut stats = rxtx.stats();

    for _ in 0..256 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 8 {
            0 | 1 => {
                if !driver_step(&mem, &rxq, &mut inp) {
                    break;
                }
            }
            2 | 3 => {
                if !driver_step(&mem, &txq, &mut inp) {
                    break;
                }
            }
            4 => {
                let f = frame(&mut inp);
                if tap.frames.len() < 16 {
                    tap.frames.push_back(f);
                }
            }
            5 => {
                tap.write = match inp.u8() % 3 {
                    0 => TapWrite::Accept,
                    1 => TapWrite::Full,
                    _ => TapWrite::Fail,
                }
            }
            6 => {
                let avail0 = rxq.next_avail();
                let used0 = rxq.next_used();
                rxtx.process_rx(&mem, &mut rxq, &mut tap, &irq);
                rx_taken += u64::from(rxq.next_avail().wrapping_sub(avail0));
                let used = rxq.next_used().wrapping_sub(used0);
                rx_seen_used += u64::from(used);
                // A used rx buffer holds at most one frame. (Its id may be
                // out of range: an unusable chain's head goes back as the
                // guest gave it, see README.)
                if strict {
                    // A driver that re-posts chains the device holds can get
                    // more entries at once than the queue has.
                    check_used(&mem, &rxq, used0, MAX_FRAME_LEN as u32, false, None);
                }
                assert!(rx_seen_used <= rx_taken, "rx used more chains than it took");
                // rx returns every chain it takes except the ones it holds
                // for a staged frame, or keeps after dropping a frame that
                // could not fit (unusable chains go back empty).
                // A driver that re-posts chains the device still holds can
                // make it hold more chains than the queue has entries, but
                // only until their capacity covers any frame.
                let held = rx_taken - rx_seen_used;
                let bound = 2 * u64::from(rxq.size()) + (MAX_FRAME_LEN / VNET_HDR_LEN) as u64;
                assert!(
                    held <= bound,
                    "rx holds {held} chains of a {}-entry queue",
                    rxq.size()
                );
                if !features.mrg_rxbuf {
                    assert!(held <= 1, "rx reserved several buffers");
                }
            }
            _ => {
                let avail0 = txq.next_avail();
                let used0 = txq.next_used();
                rxtx.process_tx(&mem, &mut txq, &mut tap, &irq);
                tx_taken += u64::from(txq.next_avail().wrapping_sub(avail0));
                let used = txq.next_used().wrapping_sub(used0);
                tx_seen_used += u64::from(used);
                // tx buffers are only read: used with length 0.
                if strict {
                    // A queue's worth, plus the chain held for the tap (a
                    // driver re-posting that one's slot gets one more).
                    check_used(&mem, &txq, used0, 0, true, Some(u32::from(txq.size()) + 1));
                }
                assert!(tx_seen_used <= tx_taken, "tx used more chains than it took");
                // A chain whose head is out of range cannot be used
                // (`add_used` refuses it), so only a lower bound here.
                let held = tx_taken - tx_seen_used;
                if rxtx.tx_blocked() {
                    assert!(held >= 1, "tx_blocked without a chain held");
                }
            }
        }
        let s = rxtx.stats();
        assert!(
            s.rx_too_big >= stats.rx_too_big
                && s.tx_malformed >= stats.tx_malformed
                && s.tx_errors >= stats.tx_errors
                && s.rx_bad_buffers >= stats.rx_bad_buffers,
            "counters went back"
        );
        stats = s;
    }
    // Every tx chain used was either written, malformed or refused.
    assert!(
        stats.tx_malformed + stats.tx_errors + tap.written.len() as u64 <= tx_taken,
        "more tx outcomes than chains"
    );
    assert!(stats.rx_bad_buffers <= rx_taken);
});

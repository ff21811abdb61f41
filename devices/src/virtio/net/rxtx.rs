//! Frames between the virtqueues and the tap.
//!
//! **tx** (guest -> tap): each tx chain holds one frame, vnet header first;
//! it is copied out of guest memory and written to the tap in one write.
//! If the tap says `EAGAIN`, the frame and its chain are kept and retried
//! first when the tap is writable again ([`Rxtx::tx_blocked`]: wait for
//! `EPOLLOUT`); no later chain is taken before it, so frames keep their
//! order.
//!
//! **rx** (tap -> guest): a frame is read from the tap into a staging
//! buffer, then copied into guest rx buffers: with `VIRTIO_NET_F_MRG_RXBUF`
//! across as many buffers as it needs (`num_buffers` in its header), else
//! into one. A frame's buffers reach the used ring with one used index
//! update, so the driver never sees part of a frame. If the guest has not
//! posted enough buffers, the frame stays staged and [`Rxtx::rx_blocked`]
//! says to stop reading the tap until the guest adds buffers (rx queue
//! notification); the kernel then queues (and eventually drops, as a real
//! link would) in the tap, not the VMM. A frame larger than the guest could
//! ever take (bigger than a whole non-mergeable buffer, or than every buffer
//! of the ring together) is dropped and counted, never truncated.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use crate::{error_limited as error, warn_limited as warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::VirtioInterrupt;

/// Frames moved per call before giving other work a turn.
pub const BUDGET: usize = 64;

/// Most descriptors in one chain (Linux uses at most MAX_SKB_FRAGS + 2 =
/// 19): a longer chain, possibly through an indirect table of 65535 entries,
/// is malformed, never a reason to allocate or loop that much per buffer.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Offset of `num_buffers` in the vnet header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// The tap side: whole frames, vnet header first, non-blocking.
pub trait TapIo {
    /// Reads one frame into `buf`; `WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame; `WouldBlock` when the tap cannot take it now.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
}

/// Raises the device's interrupt for used buffers.
pub trait Signal {
    /// Tells the driver that buffers were used.
    fn signal_used(&self);
}

impl Signal for VirtioInterrupt {
    fn signal_used(&self) {
        if let Err(e) = VirtioInterrupt::signal_used(self) {
            error!("virtio-net: interrupt: {e}");
        }
    }
}

/// What the device negotiated that changes how frames are moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxtxFeatures {
    /// `VIRTIO_NET_F_MRG_RXBUF`: a frame may span several rx buffers.
    pub mrg_rxbuf: bool,
    /// `VIRTIO_NET_F_GUEST_CSUM`: header checksum flags go to the guest.
    pub guest_csum: bool,
}

/// Frames dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// rx frames larger than the guest's buffers could ever hold.
    pub rx_too_big: u64,
    /// tx chains that were not a frame (write-only parts, too short or too
    /// long, outside guest memory).
    pub tx_malformed: u64,
    /// tx frames the tap refused with an error other than `EAGAIN`.
    pub tx_errors: u64,
    /// rx chains that were not a usable buffer (returned empty).
    pub rx_bad_buffers: u64,
}

/// Why rx stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The tap has nothing more to read.
    TapEmpty,
    /// A frame waits for guest buffers: stop reading the tap.
    NoBuffers,
    /// [`BUDGET`] frames were moved; the tap may have more.
    Budget,
}

/// Why tx stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStop {
    /// The guest has nothing more to send.
    QueueEmpty,
    /// The tap is full: wait until it is writable.
    TapFull,
    /// [`BUDGET`] frames were moved; the queue may have more.
    Budget,
}

/// An rx chain taken from the queue and not yet used: where its writable
/// bytes are.
#[derive(Debug)]
struct RxBuffer {
    head: u16,
    regions: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxBuffer {
    fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Self, u16> {
        let head = chain.head_index();
        let mut regions = Vec::new();
        let mut capacity = 0usize;
        for desc in chain {
            let len = desc.len() as usize;
            if len == 0
                || regions.len() == MAX_CHAIN_DESCRIPTORS
                || !desc.is_write_only()
                || !mem.check_range(desc.addr(), len)
            {
                return Err(head);
            }
            capacity += len;
            regions.push((desc.addr(), len));
        }
        if capacity < VNET_HDR_LEN {
            return Err(head);
        }
        Ok(RxBuffer {
            head,
            regions,
            capacity,
        })
    }
}

/// The state of one device's rx and tx paths.
pub struct Rxtx {
    features: RxtxFeatures,
    stats: Stats,
    /// A frame read from the tap (`rx_frame[..len]`) not yet in guest memory.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// Rx chains taken for the staged frame, in queue order.
    rx_reserved: VecDeque<RxBuffer>,
    /// A frame copied from a tx chain (`tx_frame[..len]`) that the tap did
    /// not take yet: (head, len).
    tx_frame: Vec<u8>,
    tx_pending: Option<(u16, usize)>,
}

impl Rxtx {
    /// Fresh state for a device that negotiated `features`.
    pub fn new(features: RxtxFeatures) -> Self {
        Rxtx {
            features,
            stats: Stats::default(),
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_reserved: VecDeque::new(),
            tx_frame: vec![0; MAX_FRAME_LEN],
            tx_pending: None,
        }
    }

    /// Frames dropped so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// A frame waits for guest rx buffers: the tap must not be read.
    pub fn rx_blocked(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// A frame waits for the tap to become writable.
    pub fn tx_blocked(&self) -> bool {
        self.tx_pending.is_some()
    }

    /// Moves frames from the tap into the guest's rx buffers: first a
    /// staged frame, then up to [`BUDGET`] frames read from the tap.
    /// Interrupts the guest if it used buffers.
    pub fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut impl TapIo,
        irq: &impl Signal,
    ) -> RxStop {
        let start = Wrapping(queue.next_used());
        let stop = self.rx_loop(mem, queue, tap);
        if rx_interrupt_needed(mem, queue, start) {
            irq.signal_used();
        }
        stop
    }

    fn rx_loop(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut impl TapIo,
    ) -> RxStop {
        for _ in 0..BUDGET {
            if self.rx_pending.is_none() {
                match tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n >= VNET_HDR_LEN => self.rx_pending = Some(n),
                    Ok(n) => {
                        warn!("virtio-net: {n}-byte read from the tap ignored");
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return RxStop::TapEmpty,
                    Err(e) => {
                        error!("virtio-net: reading the tap: {e}");
                        return RxStop::TapEmpty;
                    }
                }
            }
            loop {
                match self.deliver(mem, queue) {
                    Delivery::Done => break,
                    Delivery::NoBuffers => {
                        // Ask the guest to notify us of new buffers; if it
                        // added some meanwhile, try again at once.
                        match reenable_notification(mem, queue, "rx") {
                            Ok(true) => continue,
                            Ok(false) => return RxStop::NoBuffers,
                            Err(e) => {
                                error!("virtio-net: rx queue: {e}");
                                return RxStop::NoBuffers;
                            }
                        }
                    }
                }
            }
        }
        RxStop::Budget
    }

    /// Copies the staged frame into reserved (and newly taken) buffers, or
    /// drops it if it can never fit.
    fn deliver(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Delivery {
        let Some(len) = self.rx_pending else {
            return Delivery::Done;
        };
        let mrg = self.features.mrg_rxbuf;
        let mut capacity: usize = self.rx_reserved.iter().map(|b| b.capacity).sum();
        while capacity < len && (mrg || self.rx_reserved.is_empty()) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            match RxBuffer::parse(mem, chain) {
                Ok(buf) => {
                    capacity += buf.capacity;
                    self.rx_reserved.push_back(buf);
                }
                Err(head) => {
                    self.stats.rx_bad_buffers += 1;
                    warn!("virtio-net: unusable rx buffer (head {head}) returned empty");
                    publish_used(mem, queue, &[(head, 0)]);
                }
            }
        }
        if capacity >= len {
            self.write_frame_to_guest(mem, queue, len);
            self.rx_pending = None;
            return Delivery::Done;
        }
        let never_fits = if mrg {
            self.rx_reserved.len() >= usize::from(queue.size())
        } else {
            !self.rx_reserved.is_empty()
        };
        if never_fits {
            self.stats.rx_too_big += 1;
            if self.stats.rx_too_big.is_power_of_two() {
                warn!(
                    "virtio-net: {len}-byte frame dropped: larger than the guest's rx buffers \
                     ({capacity} bytes); {} so far",
                    self.stats.rx_too_big
                );
            }
            self.rx_pending = None;
            return Delivery::Done;
        }
        Delivery::NoBuffers
    }

    /// Writes `rx_frame[..len]` across the reserved buffers and uses them.
    fn write_frame_to_guest(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue, len: usize) {
        // How many buffers the frame takes.
        let mut count = 0;
        let mut covered = 0;
        for buf in &self.rx_reserved {
            count += 1;
            covered += buf.capacity;
            if covered >= len {
                break;
            }
        }
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        if !self.features.guest_csum {
            // DATA_VALID and NEEDS_CSUM mean nothing to such a driver.
            self.rx_frame[0] = 0;
        }
        let mut off = 0;
        let mut used = Vec::with_capacity(count);
        for _ in 0..count {
            let buf = self.rx_reserved.pop_front().expect("counted above");
            let start = off;
            for &(addr, region_len) in &buf.regions {
                if off == len {
                    break;
                }
                let n = region_len.min(len - off);
                if let Err(e) = mem.write_slice(&self.rx_frame[off..off + n], addr) {
                    // Checked when the buffer was taken; memory does not shrink.
                    error!("virtio-net: writing an rx buffer: {e}");
                }
                off += n;
            }
            used.push((buf.head, (off - start) as u32));
        }
        publish_used(mem, queue, &used);
    }

    /// Moves frames from the tx queue to the tap: first a frame the tap
    /// refused with `EAGAIN`, then up to [`BUDGET`] chains. Interrupts the
    /// guest if it used buffers.
    pub fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut impl TapIo,
        irq: &impl Signal,
    ) -> TxStop {
        let mut used = false;
        let stop = self.tx_loop(mem, queue, tap, &mut used);
        if used && queue.needs_notification(mem).unwrap_or(true) {
            irq.signal_used();
        }
        stop
    }

    fn tx_loop(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &mut impl TapIo,
        used: &mut bool,
    ) -> TxStop {
        let mut moved = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("virtio-net: tx queue: {e}");
            }
            loop {
                if self.tx_pending.is_none() {
                    if moved == BUDGET {
                        return TxStop::Budget;
                    }
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    moved += 1;
                    let head = chain.head_index();
                    match self.read_tx_chain(mem, chain) {
                        Some(len) => self.tx_pending = Some((head, len)),
                        None => {
                            self.stats.tx_malformed += 1;
                            if self.stats.tx_malformed.is_power_of_two() {
                                warn!(
                                    "virtio-net: malformed tx chain dropped; {} so far",
                                    self.stats.tx_malformed
                                );
                            }
                            add_used(mem, queue, head, 0, "tx");
                            *used = true;
                            continue;
                        }
                    }
                }
                let (head, len) = self.tx_pending.expect("set above");
                match tap.write_frame(&self.tx_frame[..len]) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TxStop::TapFull,
                    Err(e) => {
                        // EIO (link down), EINVAL (a bad GSO header) ...:
                        // the frame is lost, as on a wire.
                        self.stats.tx_errors += 1;
                        if self.stats.tx_errors.is_power_of_two() {
                            warn!(
                                "virtio-net: the tap refused a {len}-byte frame: {e}; {} so far",
                                self.stats.tx_errors
                            );
                        }
                    }
                }
                self.tx_pending = None;
                add_used(mem, queue, head, 0, "tx");
                *used = true;
            }
            match reenable_notification(mem, queue, "tx") {
                Ok(true) => continue,
                Ok(false) => return TxStop::QueueEmpty,
                Err(e) => {
                    error!("virtio-net: tx queue: {e}");
                    return TxStop::QueueEmpty;
                }
            }
        }
    }

    /// Copies a tx chain's frame into `tx_frame`; its length, or `None` if
    /// the chain is not a frame.
    fn read_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<usize> {
        let mut len = 0usize;
        for (i, desc) in chain.enumerate() {
            let n = desc.len() as usize;
            if n == 0
                || i == MAX_CHAIN_DESCRIPTORS
                || desc.is_write_only()
                || len + n > self.tx_frame.len()
            {
                return None;
            }
            mem.read_slice(&mut self.tx_frame[len..len + n], desc.addr())
                .ok()?;
            len += n;
        }
        (len >= VNET_HDR_LEN).then_some(len)
    }
}

enum Delivery {
    /// The staged frame went to the guest, or was dropped.
    Done,
    /// Not enough guest buffers yet.
    NoBuffers,
}

/// Puts `entries` (head, length) on `queue`'s used ring and shows them to
/// the driver at once, with one used index update: a driver that sees the
/// first buffer of a frame (`num_buffers` = n) must find the other n - 1
/// there too (`Queue::add_used` publishes each entry as it goes).
fn publish_used(mem: &GuestMemoryMmap, queue: &mut Queue, entries: &[(u16, u32)]) {
    let ring = GuestAddress(queue.used_ring());
    let base = queue.next_used();
    for (i, &(head, len)) in entries.iter().enumerate() {
        let slot = base.wrapping_add(i as u16) % queue.size();
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let at = ring.unchecked_add(4 + 8 * u64::from(slot));
        if let Err(e) = mem.write_slice(&elem, at) {
            error!("virtio-net: rx used ring: {e}");
        }
    }
    let next = base.wrapping_add(entries.len() as u16);
    queue.set_next_used(next);
    // Release: the entries are visible before the index that covers them.
    if let Err(e) = mem.store(next.to_le(), ring.unchecked_add(2), Ordering::Release) {
        error!("virtio-net: rx used index: {e}");
    }
}

/// Whether the driver wants an interrupt for the rx buffers used since
/// the used index was `old` (`Queue::needs_notification` counts only what
/// `add_used` added).
fn rx_interrupt_needed(mem: &GuestMemoryMmap, queue: &Queue, old: Wrapping<u16>) -> bool {
    let new = Wrapping(queue.next_used());
    if new == old {
        return false;
    }
    if !queue.event_idx_enabled() {
        return true;
    }
    // The used index is out before `used_event` is read.
    fence(Ordering::SeqCst);
    let at = GuestAddress(queue.avail_ring()).unchecked_add(4 + 2 * u64::from(queue.size()));
    match mem.read_obj::<u16>(at) {
        // virtio 1.x 2.7.10: interrupt if used_event is in [old, new).
        Ok(event) => new - Wrapping(u16::from_le(event)) - Wrapping(1) < new - old,
        Err(_) => true,
    }
}

/// `Queue::enable_notification`: whether the driver added buffers since the
/// queue was last drained, and the next one can be taken. The driver's
/// available index alone is not enough: `pop_descriptor_chain` refuses an
/// index more than a queue's worth ahead, or an available ring at address
/// 0, and retrying on those would spin forever. The queue then stays
/// stalled until the driver fixes it (or resets the device).
fn reenable_notification(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    which: &str,
) -> Result<bool, virtio_queue::Error> {
    if !queue.enable_notification(mem)? {
        return Ok(false);
    }
    if queue.pop_descriptor_chain(mem).is_none() {
        warn!("virtio-net: {which} available ring index refused; the queue is stalled");
        return Ok(false);
    }
    queue.go_to_previous_position();
    Ok(true)
}

fn add_used(mem: &GuestMemoryMmap, queue: &mut Queue, head: u16, len: u32, which: &str) {
    if let Err(e) = queue.add_used(mem, head, len) {
        error!("virtio-net: {which} add_used: {e}");
    }
}

//! virtio-fs for a guest whose memory virtiofsd cannot map.
//!
//! A VM restored from a template maps the template's memory private and
//! copy-on-write, so that restored VMs share every page their guests have
//! not written. virtiofsd, another process, would see none of a guest's
//! writes there. So the device serves the guest's queues itself and relays
//! each request through a small shared memory of its own (the "arena", a
//! memfd), as QEMU's shadow virtqueues do for vDPA: the request's readable
//! part is copied into the arena, virtiofsd finds it on a ring of our own
//! (two descriptors: what it reads, where it writes), and the reply is
//! copied back into the guest's writable buffers. virtiofsd maps the arena
//! and nothing else.
//!
//! Everything from the guest is checked: a chain whose writable buffers
//! come before its readable ones, that needs more than the whole arena, or
//! that points outside guest memory is answered with nothing written (the
//! FUSE driver fails that one request). What virtiofsd answers is checked
//! too: a used entry that names no request in flight is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::QueueT;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::worker::{EpollCtl, EventHandler, EventSet};
use crate::virtio::{ActiveQueue, VirtioInterrupt};
use crate::warn_limited as warn;

/// Entries of each of our rings (two descriptors per request in flight).
pub(super) const RING: u16 = 256;
/// Bytes of one ring's area: descriptor table, then the avail ring at
/// 4 KiB, the used ring at 8 KiB.
const RING_AREA: u64 = 16 << 10;
const AVAIL: u64 = 4 << 10;
const USED: u64 = 8 << 10;
/// Bytes for requests in flight: a FUSE request carries at most 1 MiB of
/// data (256 pages) plus headers, so several fit at once.
pub(super) const ARENA: u64 = 4 << 20;
/// Requests are placed at this granularity in the arena.
const GRAIN: u64 = 256;
/// The most descriptors a request may have (Linux sends at most 256 data
/// pages and a few headers).
const MAX_DESCS: usize = 512;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// The memory virtiofsd maps: one ring area per queue, then the arena.
pub(super) struct Shared {
    /// Mapped at guest address 0 of virtiofsd's address space (which holds
    /// nothing else).
    pub(super) mem: GuestMemoryMmap,
    queues: usize,
}

impl Shared {
    /// A memfd for `queues` rings and the arena, mapped here.
    pub(super) fn new(queues: usize) -> io::Result<Shared> {
        let len = Self::arena_base(queues) + ARENA;
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"sandboxvm-fs-relay".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(io::Error::other)?;
        Ok(Shared { mem, queues })
    }

    fn arena_base(queues: usize) -> u64 {
        queues as u64 * RING_AREA
    }

    /// Where queue `q`'s descriptor table, avail and used rings lie, as
    /// this process's addresses (what SET_VRING_ADDR takes).
    pub(super) fn ring_host_addrs(&self, q: usize) -> (u64, u64, u64) {
        let base = self.mem.iter().next().expect("one region").as_ptr() as u64;
        let ring = base + q as u64 * RING_AREA;
        (ring, ring + AVAIL, ring + USED)
    }

    /// Zeroes the rings (before virtiofsd is given them again).
    fn clear_rings(&self) -> io::Result<()> {
        let zeros = vec![0u8; RING_AREA as usize];
        for q in 0..self.queues {
            self.mem
                .write_slice(&zeros, GuestAddress(q as u64 * RING_AREA))
                .map_err(io::Error::other)?;
        }
        Ok(())
    }
}

/// First-fit allocation of arena space.
#[derive(Debug)]
pub(super) struct Arena {
    /// Free ranges: start -> length.
    free: BTreeMap<u64, u64>,
}

impl Arena {
    pub(super) fn new(len: u64) -> Arena {
        Arena {
            free: BTreeMap::from([(0, len)]),
        }
    }

    fn round(len: u64) -> u64 {
        len.max(1).div_ceil(GRAIN) * GRAIN
    }

    /// `len` bytes (rounded up), lowest address first, so that small
    /// requests keep reusing the same few pages.
    pub(super) fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = Self::round(len);
        let (&start, &have) = self.free.iter().find(|(_, &have)| have >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Some(start)
    }

    /// Gives back what `alloc(len)` returned at `start`, merged with its
    /// free neighbours.
    pub(super) fn release(&mut self, start: u64, len: u64) {
        let (mut start, mut len) = (start, Self::round(len));
        if let Some((&next, &next_len)) = self.free.range(start + len..).next() {
            if next == start + len {
                self.free.remove(&next);
                len += next_len;
            }
        }
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
            if prev + prev_len == start {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        self.free.insert(start, len);
    }
}

/// A guest request handed to virtiofsd.
struct InFlight {
    head: u16,
    at: u64,
    len: u64,
    readable: u64,
    writable: Buffers,
}

/// One queue: the guest's, and ours that virtiofsd serves.
pub(super) struct RelayQueue {
    pub(super) guest: ActiveQueue,
    /// virtiofsd's kick (we write it) and call (it writes, we wait).
    pub(super) kick: EventFd,
    pub(super) call: EventFd,
    next_avail: u16,
    next_used: u16,
    /// Requests in flight by descriptor pair (descriptors 2p and 2p+1).
    inflight: Vec<Option<InFlight>>,
    free_pairs: Vec<u16>,
}

impl RelayQueue {
    pub(super) fn new(guest: ActiveQueue, kick: EventFd, call: EventFd) -> Self {
        RelayQueue {
            guest,
            kick,
            call,
            next_avail: 0,
            next_used: 0,
            inflight: (0..RING / 2).map(|_| None).collect(),
            free_pairs: (0..RING / 2).rev().collect(),
        }
    }
}

/// The worker: guest notifications and virtiofsd's calls.
pub(super) struct Relay {
    pub(super) mem: GuestMemoryMmap,
    pub(super) shared: Arc<Shared>,
    pub(super) arena: Arena,
    pub(super) interrupt: Arc<VirtioInterrupt>,
    pub(super) queues: Vec<RelayQueue>,
}

/// Guest buffers: address and length of each.
type Buffers = Vec<(GuestAddress, u32)>;

/// What a guest chain asks: readable descriptors, then writable ones.
/// None for a chain of more than [`MAX_DESCS`], in the wrong order, or
/// cut short (virtio-queue ends a chain at a descriptor it refuses, so the
/// last one still says "next").
fn parse(descs: &[Descriptor]) -> Option<(Buffers, Buffers)> {
    if descs.len() > MAX_DESCS || descs.last().is_none_or(|d| d.has_next()) {
        return None;
    }
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    for d in descs {
        if d.is_write_only() {
            writable.push((d.addr(), d.len()));
        } else if writable.is_empty() {
            readable.push((d.addr(), d.len()));
        } else {
            return None;
        }
    }
    Some((readable, writable))
}

fn total(bufs: &[(GuestAddress, u32)]) -> u64 {
    bufs.iter().map(|&(_, len)| u64::from(len)).sum()
}

impl Relay {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        shared: Arc<Shared>,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<RelayQueue>,
    ) -> io::Result<Relay> {
        shared.clear_rings()?;
        Ok(Relay {
            mem,
            arena: Arena::new(ARENA),
            shared,
            interrupt,
            queues,
        })
    }

    /// Hands virtiofsd every guest request of queue `q` that fits; kicks
    /// it if any went; answers the malformed ones at once.
    fn pump(&mut self, q: usize) {
        let arena_base = Shared::arena_base(self.shared.queues);
        let (mut sent, mut answered, mut rechecked) = (false, false, false);
        loop {
            let rq = &mut self.queues[q];
            let Some(&pair) = rq.free_pairs.last() else {
                break;
            };
            let Some(chain) = rq.guest.queue.pop_descriptor_chain(&self.mem) else {
                // Drained: with EVENT_IDX, ask to be kicked at the next
                // request, and look once more for one that came meanwhile
                // (once only: a garbage avail index must not spin us).
                let more = rq.guest.queue.enable_notification(&self.mem);
                if more.unwrap_or(false) && !rechecked {
                    rechecked = true;
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(MAX_DESCS + 1).collect();
            let Some((readable, writable)) = parse(&descs) else {
                warn!("virtio-fs: a chain is too long or has readable buffers after writable ones");
                answered |= self.answer(q, head, 0);
                continue;
            };
            let (r_len, w_len) = (total(&readable), total(&writable));
            let len = Arena::round(r_len) + w_len;
            if r_len == 0 || len > ARENA {
                warn!("virtio-fs: a request of {r_len}+{w_len} bytes is refused");
                answered |= self.answer(q, head, 0);
                continue;
            }
            let Some(at) = self.arena.alloc(len) else {
                // Full: this request waits for a reply to free space.
                let queue = &mut self.queues[q].guest.queue;
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break;
            };
            if let Err(e) = self.copy_in(&readable, arena_base + at) {
                warn!("virtio-fs: a request's buffer: {e}");
                self.arena.release(at, len);
                answered |= self.answer(q, head, 0);
                continue;
            }
            let readable = Arena::round(r_len);
            if let Err(e) = self.post(q, pair, arena_base + at, r_len, readable, w_len) {
                warn!("virtio-fs: relay ring: {e}");
                self.arena.release(at, len);
                answered |= self.answer(q, head, 0);
                continue;
            }
            let rq = &mut self.queues[q];
            rq.free_pairs.pop();
            rq.inflight[usize::from(pair)] = Some(InFlight {
                head,
                at,
                len,
                readable,
                writable,
            });
            sent = true;
        }
        if sent {
            if let Err(e) = self.queues[q].kick.write(1) {
                warn!("virtio-fs: kick virtiofsd: {e}");
            }
        }
        if answered {
            self.notify_guest(q);
        }
    }

    /// Copies the guest's readable buffers to `to` in the shared memory.
    fn copy_in(&self, bufs: &[(GuestAddress, u32)], mut to: u64) -> io::Result<()> {
        for &(addr, len) in bufs {
            self.copy(addr, len as usize, to, false)?;
            to += u64::from(len);
        }
        Ok(())
    }

    /// Copies `len` bytes between guest memory at `guest` and the shared
    /// memory at `at`: into the guest if `into_guest`, out of it otherwise.
    fn copy(
        &self,
        guest: GuestAddress,
        len: usize,
        mut at: u64,
        into_guest: bool,
    ) -> io::Result<()> {
        let mut done = 0;
        for slice in self.mem.get_slices(guest, len) {
            let g = slice.map_err(io::Error::other)?;
            let s = self
                .shared
                .mem
                .get_slice(GuestAddress(at), g.len())
                .map_err(io::Error::other)?;
            if into_guest {
                s.copy_to_volatile_slice(g);
            } else {
                g.copy_to_volatile_slice(s);
            }
            at += g.len() as u64;
            done += g.len();
        }
        if done != len {
            let at = guest.0 + done as u64;
            return Err(io::Error::other(format!("{} bytes at {at:#x}", len - done)));
        }
        Ok(())
    }

    /// Puts descriptor pair `pair` (readable part at `at`, the writable
    /// part `readable` bytes further) on our ring `q`.
    fn post(
        &mut self,
        q: usize,
        pair: u16,
        at: u64,
        r_len: u64,
        readable: u64,
        w_len: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let ring = q as u64 * RING_AREA;
        let mem = &self.shared.mem;
        let first = 2 * pair;
        let desc = |i: u16| GuestAddress(ring + 16 * u64::from(i));
        let (flags, next) = if w_len > 0 {
            (VRING_DESC_F_NEXT, first + 1)
        } else {
            (0, 0)
        };
        let r = Descriptor::new(at, r_len as u32, flags, next);
        mem.write_obj(RawDescriptor::from(r), desc(first))?;
        if w_len > 0 {
            let w = Descriptor::new(at + readable, w_len as u32, VRING_DESC_F_WRITE, 0);
            mem.write_obj(RawDescriptor::from(w), desc(first + 1))?;
        }
        let rq = &mut self.queues[q];
        let slot = u64::from(rq.next_avail % RING);
        mem.write_obj(first, GuestAddress(ring + AVAIL + 4 + 2 * slot))?;
        rq.next_avail = rq.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        mem.store(
            rq.next_avail,
            GuestAddress(ring + AVAIL + 2),
            Ordering::Release,
        )
    }

    /// Takes what virtiofsd has used on ring `q` back to the guest.
    fn complete(&mut self, q: usize) {
        let ring = q as u64 * RING_AREA;
        let arena_base = Shared::arena_base(self.shared.queues);
        let mut answered = false;
        let used_idx = GuestAddress(ring + USED + 2);
        while let Ok(used_idx) = self.shared.mem.load::<u16>(used_idx, Ordering::Acquire) {
            if used_idx == self.queues[q].next_used {
                break;
            }
            fence(Ordering::Acquire);
            let slot = u64::from(self.queues[q].next_used % RING);
            self.queues[q].next_used = self.queues[q].next_used.wrapping_add(1);
            let elem = GuestAddress(ring + USED + 4 + 8 * slot);
            let (Ok(id), Ok(written)) = (
                self.shared.mem.read_obj::<u32>(elem),
                self.shared.mem.read_obj::<u32>(GuestAddress(elem.0 + 4)),
            ) else {
                break;
            };
            let request = (id % 2 == 0)
                .then(|| usize::try_from(id / 2).ok())
                .flatten()
                .and_then(|p| self.queues[q].inflight.get_mut(p))
                .and_then(Option::take);
            let Some(request) = request else {
                warn!("virtio-fs: virtiofsd used descriptor {id}, which is not in flight");
                continue;
            };
            self.queues[q].free_pairs.push((id / 2) as u16);
            let w_cap = request.len - request.readable;
            let written = u64::from(written).min(w_cap);
            let from = arena_base + request.at + request.readable;
            let copied = match self.copy_out(&request.writable, from, written) {
                Ok(()) => written,
                Err(e) => {
                    warn!("virtio-fs: a reply's buffer: {e}");
                    0
                }
            };
            self.arena.release(request.at, request.len);
            answered |= self.answer(q, request.head, copied as u32);
        }
        if answered {
            self.notify_guest(q);
        }
    }

    /// Copies `len` bytes from `from` in the shared memory into the
    /// guest's writable buffers, in order.
    fn copy_out(&self, bufs: &[(GuestAddress, u32)], mut from: u64, len: u64) -> io::Result<()> {
        let mut left = len;
        for &(addr, cap) in bufs {
            if left == 0 {
                break;
            }
            let n = u64::from(cap).min(left);
            self.copy(addr, n as usize, from, true)?;
            from += n;
            left -= n;
        }
        Ok(())
    }

    /// Returns guest chain `head` with `written` bytes; whether it went.
    fn answer(&mut self, q: usize, head: u16, written: u32) -> bool {
        match self.queues[q]
            .guest
            .queue
            .add_used(&self.mem, head, written)
        {
            Ok(()) => true,
            Err(e) => {
                warn!("virtio-fs: add_used: {e}");
                false
            }
        }
    }

    fn notify_guest(&mut self, q: usize) {
        let wants = self.queues[q]
            .guest
            .queue
            .needs_notification(&self.mem)
            .unwrap_or(true);
        if wants {
            if let Err(e) = self.interrupt.signal_used() {
                warn!("virtio-fs: interrupt: {e}");
            }
        }
    }
}

/// Tokens: guest notification of queue i is i, virtiofsd's call on queue i
/// is CALL + i.
const CALL: u64 = 1 << 16;

impl EventHandler for Relay {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        for (i, q) in self.queues.iter().enumerate() {
            ctl.add(q.guest.notify.as_raw_fd(), i as u64, EventSet::IN)?;
            ctl.add(q.call.as_raw_fd(), CALL + i as u64, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle(&mut self, _ctl: &EpollCtl, token: u64, _events: EventSet) {
        let (call, q) = (token >= CALL, (token % CALL) as usize);
        let Some(rq) = self.queues.get(q) else {
            return;
        };
        if call {
            let _ = rq.call.read();
            self.complete(q);
            // Space was freed: requests that waited for it go now.
            for q in 0..self.queues.len() {
                self.pump(q);
            }
        } else {
            let _ = rq.guest.notify.read();
            self.pump(q);
        }
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;

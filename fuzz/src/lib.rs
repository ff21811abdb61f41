//! Shared pieces of the fuzz targets: a reader that turns the fuzzer's bytes
//! into values (zeros once the input runs out), guest memory, virtqueues
//! whose addresses and sizes come from the input, driver-side ring writes,
//! and a per-process scratch directory for Unix sockets.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use devices::virtio::vsock::packet::Header;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Reads values off the front of the fuzzer's input.
pub struct Input<'a> {
    data: &'a [u8],
    /// Strict mode (chosen by the input's first byte): rings in the low
    /// region, disjoint; every buffer address in the high region. Then the
    /// device's writes to buffers cannot land on a used ring, and used
    /// entries can be read back and checked.
    pub strict: bool,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        let mut inp = Input {
            data,
            strict: false,
        };
        inp.strict = inp.u8() & 0x80 != 0;
        inp
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A buffer address: [`Self::addr`], in the high region in strict mode.
    pub fn buf_addr(&mut self) -> u64 {
        if self.strict {
            MEM_HIGH_START + u64::from(self.u32()) % (MEM_HIGH_END - MEM_HIGH_START)
        } else {
            self.addr()
        }
    }

    /// A guest address: mostly inside (or just past) guest memory, with a
    /// tag byte choosing a raw 64-bit value now and then.
    pub fn addr(&mut self) -> u64 {
        let tag = self.u8();
        if tag == 0xff {
            self.u64()
        } else {
            u64::from(self.u32()) % MEM_SPAN
        }
    }
}

/// Guest memory: 1 MiB at 0, a 64 KiB hole, then 256 KiB (descriptors may
/// straddle the hole or the end).
pub const MEM_LOW_END: u64 = 0x10_0000;
pub const MEM_HIGH_START: u64 = 0x11_0000;
pub const MEM_HIGH_END: u64 = 0x15_0000;
/// Addresses drawn by [`Input::addr`] fall below this (a little past the
/// end of memory).
pub const MEM_SPAN: u64 = 0x16_0000;

/// Fresh, zeroed guest memory.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_LOW_END as usize),
        (
            GuestAddress(MEM_HIGH_START),
            (MEM_HIGH_END - MEM_HIGH_START) as usize,
        ),
    ])
    .expect("guest memory")
}

/// Copies input bytes to an input-chosen address (errors ignored: the
/// fuzzer may aim outside guest memory).
pub fn poke(mem: &GuestMemoryMmap, inp: &mut Input) {
    let addr = inp.addr();
    let len = usize::from(inp.u16() % 2048);
    let bytes = inp.bytes(len);
    let _ = mem.write_slice(bytes, GuestAddress(addr));
}

/// Where a queue's parts are and how big it is, as the transport would
/// pass them on.
#[derive(Debug, Clone, Copy)]
pub struct QueueSpec {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub event_idx: bool,
}

impl QueueSpec {
    /// A spec from the input: usually a power-of-two size up to `max` and
    /// rings laid out one after another at an input-chosen base; sometimes
    /// raw sizes and addresses.
    pub fn from_input(inp: &mut Input, max: u16) -> Self {
        let mut mode = inp.u8();
        if inp.strict {
            mode &= !0x81;
        }
        let size = if mode & 0x80 != 0 {
            inp.u16()
        } else {
            (1u16 << (inp.u8() % 9)).min(max)
        };
        let event_idx = mode & 0x40 != 0;
        if mode & 1 == 0 {
            let span = if inp.strict { 0x7_0000 } else { MEM_SPAN };
            let base = (u64::from(inp.u16()) * 16) % span;
            let s = u64::from(size);
            let avail = base + 16 * s;
            let used = (avail + 6 + 2 * s + 3) & !3;
            QueueSpec {
                size,
                desc: base,
                avail,
                used,
                event_idx,
            }
        } else {
            QueueSpec {
                size,
                desc: inp.addr(),
                avail: inp.addr(),
                used: inp.addr(),
                event_idx,
            }
        }
    }

    /// Whether the two queues' rings overlap.
    pub fn overlaps(&self, other: &QueueSpec) -> bool {
        let parts = |q: &QueueSpec| {
            let s = u64::from(q.size);
            [
                (q.desc, q.desc.saturating_add(16 * s)),
                (q.avail, q.avail.saturating_add(6 + 2 * s)),
                (q.used, q.used.saturating_add(6 + 8 * s)),
            ]
        };
        parts(self)
            .iter()
            .any(|a| parts(other).iter().any(|b| a.0 < b.1 && b.0 < a.1))
    }

    /// The queue as the virtio-mmio transport builds it (`QueueRegs::build`):
    /// `None` where the transport would refuse it.
    pub fn build(&self, mem: &GuestMemoryMmap, max: u16) -> Option<Queue> {
        let mut q = Queue::new(max).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_ready(true);
        q.set_event_idx(self.event_idx);
        q.is_valid(mem).then_some(q)
    }
}

/// A device's rx and tx queues from the input, as the transport would
/// accept them (`None`: it would not), and whether used entries may be read
/// back (strict input whose rings do not overlap: no device write can hit
/// them).
pub fn rx_tx_queues(
    inp: &mut Input,
    mem: &GuestMemoryMmap,
    max: u16,
) -> Option<(Queue, Queue, bool)> {
    let rx_spec = QueueSpec::from_input(inp, max);
    let tx_spec = QueueSpec::from_input(inp, max);
    let rxq = rx_spec.build(mem, max)?;
    let txq = tx_spec.build(mem, max)?;
    let strict = inp.strict && !rx_spec.overlaps(&tx_spec);
    Some((rxq, txq, strict))
}

/// Driver side: writes descriptor `idx` of the table at `table`.
pub fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    idx: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
    let at = table.wrapping_add(16 * u64::from(idx));
    let _ = mem.write_obj(desc, GuestAddress(at));
}

/// Driver side: puts `head` on the available ring of `q` and bumps its
/// index.
pub fn make_available(mem: &GuestMemoryMmap, q: &Queue, head: u16) {
    let avail = q.avail_ring();
    let size = q.size().max(1);
    let Ok(idx) = mem.read_obj::<u16>(GuestAddress(avail.wrapping_add(2))) else {
        return;
    };
    let slot = avail.wrapping_add(4 + 2 * u64::from(idx % size));
    let _ = mem.write_obj(head, GuestAddress(slot));
    let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail.wrapping_add(2)));
}

/// One driver-side step from the input: a descriptor, a chain of
/// descriptors, an available-ring entry, a raw memory write, or a used
/// `avail_event`/`used_event` change. Returns false at the end of input.
pub fn driver_step(mem: &GuestMemoryMmap, q: &Queue, inp: &mut Input) -> bool {
    if inp.is_empty() {
        return false;
    }
    let size = q.size().max(1);
    match inp.u8() % 6 {
        0 => {
            // One descriptor in the queue's table (or an indirect table).
            let table = if inp.u8() & 0x7 == 0 {
                inp.addr()
            } else {
                q.desc_table()
            };
            let idx = inp.u16();
            let addr = inp.buf_addr();
            let len = inp.u32();
            let flags = inp.u16();
            let next = inp.u16();
            write_desc(mem, table, idx, addr, len, flags, next);
        }
        1 => {
            // A well-formed chain of n descriptors at the head, each
            // device-readable or -writable per the flag bits, lengths
            // mostly small.
            let head = inp.u16() % size;
            let n = u16::from(inp.u8() % 8) + 1;
            let writable = inp.u8();
            for i in 0..n {
                let idx = head.wrapping_add(i) % size;
                let next = head.wrapping_add(i + 1) % size;
                let addr = inp.buf_addr();
                let len = u32::from(inp.u16());
                let mut flags = 0u16;
                if writable & (1 << (i % 8)) != 0 {
                    flags |= 2; // VRING_DESC_F_WRITE
                }
                if i + 1 < n {
                    flags |= 1; // VRING_DESC_F_NEXT
                }
                write_desc(mem, q.desc_table(), idx, addr, len, flags, next);
            }
            make_available(mem, q, head);
        }
        2 => {
            // An indirect chain: a table of n descriptors at an input
            // address, its head descriptor in the ring.
            let head = inp.u16() % size;
            let table = inp.addr() & !0xf;
            let n = u16::from(inp.u8() % 16) + 1;
            let writable = inp.u16();
            for i in 0..n {
                let addr = inp.buf_addr();
                let len = u32::from(inp.u16());
                let mut flags = 0u16;
                if writable & (1 << (i % 16)) != 0 {
                    flags |= 2;
                }
                if i + 1 < n {
                    flags |= 1;
                }
                write_desc(mem, table, i, addr, len, flags, i + 1);
            }
            let tlen = if inp.u8() == 0xff {
                inp.u32()
            } else {
                16 * u32::from(n)
            };
            write_desc(mem, q.desc_table(), head, table, tlen, 4, 0);
            make_available(mem, q, head);
        }
        3 => {
            let head = inp.u16();
            make_available(mem, q, head);
        }
        4 => poke(mem, inp),
        _ => {
            // The avail index itself (e.g. far ahead of the device).
            let idx = inp.u16();
            let _ = mem.write_obj(idx, GuestAddress(q.avail_ring().wrapping_add(2)));
        }
    }
    true
}

/// Reads the used ring entry `i` (mod size) of `q`: (id, len).
pub fn used_entry(mem: &GuestMemoryMmap, q: &Queue, i: u16) -> Option<(u32, u32)> {
    let at = q
        .used_ring()
        .wrapping_add(4 + 8 * u64::from(i % q.size().max(1)));
    let id: u32 = mem.read_obj(GuestAddress(at)).ok()?;
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).ok()?;
    Some((id, len))
}

/// The used index as the driver sees it in guest memory.
pub fn used_idx(mem: &GuestMemoryMmap, q: &Queue) -> Option<u16> {
    mem.read_obj(GuestAddress(q.used_ring().wrapping_add(2)))
        .ok()
}

/// Checks the entries the device added to the used ring since its used
/// index was `old`: the index in memory matching the queue's, lengths no
/// larger than `max_len`, with `ids_in_range` ids within the queue, and no
/// more than `max_added` entries.
pub fn check_used(
    mem: &GuestMemoryMmap,
    q: &Queue,
    old: u16,
    max_len: u32,
    ids_in_range: bool,
    max_added: Option<u32>,
) {
    let new = q.next_used();
    let added = new.wrapping_sub(old);
    if let Some(max) = max_added {
        assert!(
            u32::from(added) <= max,
            "{added} used entries added in one go to a queue of {}",
            q.size()
        );
    }
    if added > 0 {
        assert_eq!(used_idx(mem, q), Some(new), "used index in memory");
    }
    for i in 0..added {
        let (id, len) = used_entry(mem, q, old.wrapping_add(i)).expect("used ring in memory");
        assert!(
            !ids_in_range || id < u32::from(q.size()),
            "used id {id} outside a queue of {}",
            q.size()
        );
        assert!(len <= max_len, "used length {len} > {max_len}");
    }
}

/// A scratch directory of this process (`$TMPDIR/sandboxvm-fuzz-<pid>`),
/// removed when the process exits normally.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sandboxvm-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        extern "C" fn cleanup() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function without captures.
        unsafe { libc::atexit(cleanup) };
        dir
    })
}

/// The size of a vsock packet header (`virtio_vsock_hdr`) in guest memory.
pub const VSOCK_HDR_LEN: usize = 44;

/// A vsock packet header as the guest lays it out (little endian).
pub fn encode_vsock_header(h: &Header) -> [u8; VSOCK_HDR_LEN] {
    let mut b = [0u8; VSOCK_HDR_LEN];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.type_.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

/// The header the guest laid out in `b`.
pub fn decode_vsock_header(b: &[u8; VSOCK_HDR_LEN]) -> Header {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    Header {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

//! The devices' hot paths, measured through real split virtqueues in guest
//! memory, as a guest driver would fill them:
//! - vsock tx: a 64 KiB RW packet from the guest to a host Unix socket
//!   (the muxer, its connection, the socket; the host end reads it);
//! - vsock rx: 64 KiB a host process wrote, into a guest rx buffer (with
//!   the CREDIT_UPDATE a guest sends back);
//! - net tx and rx: a 1514-byte frame and a 64 KiB GSO frame between the
//!   queues and a tap that is memory (so the figures are the device's
//!   work, not a tap's).
//!
//!   cargo bench -p devices --bench queues [-- FILTER]
//!
//! Each benchmark checks what the guest got (used lengths, bytes on the
//! socket) so that a path that stopped moving data cannot look fast.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use devices::virtio::net::rxtx::{Rxtx, RxtxFeatures, Signal, TapIo};
use devices::virtio::net::VNET_HDR_LEN;
use devices::virtio::vsock::queue_handler::VirtqQueues;
use devices::virtio::vsock::Muxer;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;
/// Payload of one vsock packet / one large frame.
const BIG: usize = 64 * 1024;
const HDR_ADDR: u64 = 0x10_0000;
const DATA_ADDR: u64 = 0x20_0000;
const RX_HDR_ADDR: u64 = 0x40_0000;
const RX_DATA_ADDR: u64 = 0x50_0000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// The driver's side of one split virtqueue: posts chains (wrapping
/// around the ring, as a driver does for ever) and reads the used ring.
struct Driver {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    next_desc: u16,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap, base: u64) -> (Driver, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        let queue: Queue = mock.create_queue().unwrap();
        let d = Driver {
            desc: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used: mock.used_addr(),
            avail_idx: 0,
            next_desc: 0,
        };
        (d, queue)
    }

    /// Posts one chain of (address, length, device-writable) parts.
    fn post(&mut self, mem: &GuestMemoryMmap, parts: &[(u64, usize, bool)]) {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let idx = (head + i as u16) % QUEUE_SIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = Descriptor::new(addr, len as u32, flags, (idx + 1) % QUEUE_SIZE);
            mem.write_obj(
                RawDescriptor::from(d),
                self.desc.unchecked_add(u64::from(idx) * 16),
            )
            .unwrap();
        }
        self.next_desc = (head + parts.len() as u16) % QUEUE_SIZE;
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, self.avail.unchecked_add(4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// (used index, length of the newest used entry).
    fn last_used(&self, mem: &GuestMemoryMmap) -> (u16, u32) {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let slot = u64::from(idx.wrapping_sub(1) % QUEUE_SIZE);
        let len: u32 = mem
            .read_obj(self.used.unchecked_add(4 + slot * 8 + 4))
            .unwrap();
        (idx, len)
    }
}

// --- vsock ----------------------------------------------------------------

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1000;
const HOST_PORT: u32 = 5000;
const PKT_HEADER: usize = 44;

/// A `virtio_vsock_hdr` from the guest to the host port.
fn vsock_header(op: u16, len: usize, buf_alloc: u32, fwd_cnt: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(PKT_HEADER);
    b.extend(GUEST_CID.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(GUEST_PORT.to_le_bytes());
    b.extend(HOST_PORT.to_le_bytes());
    b.extend((len as u32).to_le_bytes());
    b.extend(1u16.to_le_bytes()); // stream
    b.extend(op.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(buf_alloc.to_le_bytes());
    b.extend(fwd_cnt.to_le_bytes());
    b
}

/// A guest stream connected to a host Unix socket through the muxer.
struct VsockRig {
    mem: GuestMemoryMmap,
    tx: (Driver, Queue),
    rx: (Driver, Queue),
    muxer: Muxer,
    host: UnixStream,
    dir: PathBuf,
    /// What the guest has taken from rx (its fwd_cnt).
    received: Wrapping<u32>,
}

impl VsockRig {
    fn new() -> VsockRig {
        let dir = std::env::temp_dir().join(format!("sandboxvm-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
        let mem = guest_memory();
        let tx = Driver::new(&mem, 0);
        let rx = Driver::new(&mem, 0x8000);
        let muxer = Muxer::new(GUEST_CID, uds).unwrap();
        let mut rig = VsockRig {
            mem,
            tx,
            rx,
            muxer,
            host: UnixStream::pair().unwrap().0,
            dir,
            received: Wrapping(0),
        };
        rig.guest_sends(&vsock_header(1, 0, 256 * 1024, 0), 0); // REQUEST
        rig.host = listener.accept().unwrap().0;
        // The RESPONSE takes the first rx buffer.
        rig.post_rx();
        rig.process();
        assert_eq!(rig.rx.0.last_used(&rig.mem), (1, PKT_HEADER as u32));
        rig
    }

    fn process(&mut self) {
        let mut q = VirtqQueues::new(&self.mem, &mut self.rx.1, &mut self.tx.1, None);
        self.muxer.process(&mut q);
    }

    /// Posts a tx packet: `hdr` and `len` payload bytes at DATA_ADDR.
    fn guest_sends(&mut self, hdr: &[u8], len: usize) {
        self.mem.write_slice(hdr, GuestAddress(HDR_ADDR)).unwrap();
        let mut parts = vec![(HDR_ADDR, PKT_HEADER, false)];
        if len > 0 {
            parts.push((DATA_ADDR, len, false));
        }
        self.tx.0.post(&self.mem, &parts);
        self.process();
    }

    fn post_rx(&mut self) {
        self.rx.0.post(
            &self.mem,
            &[(RX_HDR_ADDR, PKT_HEADER, true), (RX_DATA_ADDR, BIG, true)],
        );
    }
}

impl Drop for VsockRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vsock(c: &mut Criterion) {
    let mut g = c.benchmark_group("vsock");
    g.throughput(Throughput::Bytes(BIG as u64));

    let mut rig = VsockRig::new();
    rig.mem
        .write_slice(&vec![0x5a; BIG], GuestAddress(DATA_ADDR))
        .unwrap();
    let rw = vsock_header(5, BIG, 256 * 1024, 0);
    let mut got = vec![0u8; BIG];
    g.bench_function("tx 64 KiB guest -> host socket", |b| {
        b.iter(|| {
            rig.guest_sends(&rw, BIG);
            rig.host.read_exact(&mut got).unwrap();
        })
    });
    assert!(got.iter().all(|&b| b == 0x5a), "the host read other bytes");
    drop(rig);

    let mut rig = VsockRig::new();
    let data = vec![0xa5; BIG];
    g.bench_function("rx 64 KiB host socket -> guest", |b| {
        b.iter(|| {
            rig.host.write_all(&data).unwrap();
            rig.post_rx();
            // The guest hands back what it took (its fwd_cnt), as a
            // driver's CREDIT_UPDATE; then the muxer fills the buffer.
            let credit = vsock_header(6, 0, 256 * 1024, rig.received.0);
            rig.guest_sends(&credit, 0);
            let (_, len) = rig.rx.0.last_used(&rig.mem);
            assert_eq!(len as usize, PKT_HEADER + BIG, "rx carried less");
            rig.received += BIG as u32;
        })
    });
    let mut first = [0u8; 16];
    rig.mem
        .read_slice(&mut first, GuestAddress(RX_DATA_ADDR))
        .unwrap();
    assert_eq!(first, [0xa5; 16], "the guest got other bytes");
    g.finish();
}

// --- net ------------------------------------------------------------------

/// A tap that is memory: it holds one frame to read at a time and counts
/// what is written.
struct MemTap {
    frame: Vec<u8>,
    ready: bool,
    written: usize,
}

impl TapIo for MemTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !std::mem::take(&mut self.ready) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        buf[..self.frame.len()].copy_from_slice(&self.frame);
        Ok(self.frame.len())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.written += frame.len();
        Ok(frame.len())
    }
}

struct NoIrq;

impl Signal for NoIrq {
    fn signal_used(&self) {}
}

fn net(c: &mut Criterion) {
    let mut g = c.benchmark_group("net");
    for (name, len) in [("1514 B", 1514usize), ("64 KiB GSO", BIG)] {
        let frame_len = VNET_HDR_LEN + len;
        g.throughput(Throughput::Bytes(len as u64));

        let mem = guest_memory();
        mem.write_slice(&vec![0x11; frame_len], GuestAddress(DATA_ADDR))
            .unwrap();
        let (mut driver, mut queue) = Driver::new(&mem, 0);
        let mut rxtx = Rxtx::new(RxtxFeatures::default());
        let mut tap = MemTap {
            frame: Vec::new(),
            ready: false,
            written: 0,
        };
        g.bench_function(format!("tx {name} guest -> tap"), |b| {
            b.iter(|| {
                driver.post(&mem, &[(DATA_ADDR, frame_len, false)]);
                rxtx.process_tx(&mem, &mut queue, &mut tap, &NoIrq);
            })
        });
        assert_eq!(
            tap.written % frame_len,
            0,
            "the tap got partial frames ({} bytes)",
            tap.written
        );
        assert!(tap.written > 0, "the tap got nothing");

        let mem = guest_memory();
        let (mut driver, mut queue) = Driver::new(&mem, 0);
        let mut rxtx = Rxtx::new(RxtxFeatures::default());
        let mut tap = MemTap {
            frame: vec![0x22; frame_len],
            ready: false,
            written: 0,
        };
        g.bench_function(format!("rx {name} tap -> guest"), |b| {
            b.iter(|| {
                tap.ready = true;
                driver.post(&mem, &[(RX_DATA_ADDR, BIG + 4096, true)]);
                rxtx.process_rx(&mem, &mut queue, &mut tap, &NoIrq);
                let (_, used) = driver.last_used(&mem);
                assert_eq!(used as usize, frame_len, "rx carried less");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, vsock, net);
criterion_main!(benches);

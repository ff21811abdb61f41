//! Test helpers: the driver side of a split virtqueue, a network namespace
//! of the test's own, links up, and an `AF_PACKET` socket on a tap to play
//! the host network's part.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::rxtx::TapIo;
use super::VNET_HDR_LEN;

/// An IEEE "local experimental" ethertype: nothing else on the test link
/// uses it.
pub const TEST_ETHERTYPE: u16 = 0x88b5;
/// Source MAC of frames the test host side sends.
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Runs `f` on a thread in a new network namespace (so taps made there
/// neither clash nor show up on the host); skips the test if that or
/// `/dev/net/tun` is not available.
pub fn in_new_netns<F: FnOnce() + Send + 'static>(f: F) {
    if !std::path::Path::new(super::tap::TUN_DEVICE).exists() {
        eprintln!("skipped: no {}", super::tap::TUN_DEVICE);
        return;
    }
    let result = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: cannot make a network namespace: {}",
                io::Error::last_os_error()
            );
            return;
        }
        f()
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> OwnedFd {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: the fd was just created and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sets `name` up, with IPv6 off first (no router solicitations or DAD
/// frames in the way of the test's frames).
pub fn link_up(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if std::path::Path::new(&path).exists() {
        std::fs::write(&path, "1").unwrap();
    }
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    let mut ifr = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS fills the flags of a `struct ifreq`-sized buffer.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
    assert_eq!(ret, 0, "SIOCGIFFLAGS: {}", io::Error::last_os_error());
    ifr.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`-sized buffer.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    assert_eq!(ret, 0, "SIOCSIFFLAGS: {}", io::Error::last_os_error());
}

/// An `AF_PACKET` socket on one interface for [`TEST_ETHERTYPE`] frames.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Binds to interface `name`.
    pub fn bind(name: &str) -> Self {
        let proto = TEST_ETHERTYPE.to_be();
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto));
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {name}");
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set next.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the length passed.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the length passed.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        PacketSocket { fd }
    }

    /// The next frame the interface received (waits up to 5 s).
    pub fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n >= 0, "packet recv: {}", io::Error::last_os_error());
        buf.truncate(n as usize);
        buf
    }

    /// Sends `payload` in a broadcast [`TEST_ETHERTYPE`] frame out of the
    /// interface (towards the tap's reader); returns the whole frame.
    pub fn send_to_tap(&self, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&HOST_MAC);
        frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
        frame.extend_from_slice(payload);
        // SAFETY: reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
        frame
    }
}

/// Reads the next [`TEST_ETHERTYPE`] frame (vnet header included) from a
/// non-blocking tap, waiting up to 5 s; returns its length.
pub fn read_retry(tap: &mut impl TapIo, buf: &mut [u8]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tap.read_frame(buf) {
            Ok(n) if n >= VNET_HDR_LEN + 14 => {
                let et = u16::from_be_bytes([buf[VNET_HDR_LEN + 12], buf[VNET_HDR_LEN + 13]]);
                if et == TEST_ETHERTYPE {
                    return n;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no frame on the tap");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("tap read: {e}"),
        }
    }
}

/// Device-writable descriptor.
pub const W: bool = true;
/// Device-readable descriptor.
pub const R: bool = false;

/// One split virtqueue as the driver sees it: descriptor table at `base`,
/// then the available ring, then the used ring (4-aligned). (virtio-queue's
/// `MockSplitQueue` places its used ring over the end of a full available
/// ring, which breaks `used_event`.)
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let zeros = vec![0u8; (used + 6 + 8 * u64::from(size) - base) as usize];
        mem.write_slice(&zeros, GuestAddress(base)).unwrap();
        Driver {
            mem,
            desc: base,
            avail,
            used,
            next_desc: 0,
            size,
        }
    }

    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q.set_event_idx(event_idx);
        assert!(q.is_valid(self.mem));
        q
    }

    pub fn write_desc(&self, table: u64, idx: u16, d: Descriptor) {
        let at = GuestAddress(table + 16 * u64::from(idx));
        self.mem.write_obj(RawDescriptor::from(d), at).unwrap();
    }

    /// Puts `head` on the available ring.
    pub fn make_available(&self, head: u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Descriptors for `parts` (address, length, device-writable) linked
    /// from index `first` of `table`.
    pub fn write_chain(&self, table: u64, first: u16, wrap: u16, parts: &[(u64, u32, bool)]) {
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let idx = (first + i as u16) % wrap;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(
                table,
                idx,
                Descriptor::new(addr, len, flags, (idx + 1) % wrap),
            );
        }
    }

    /// Makes a chain of (address, length, device-writable) available;
    /// returns its head index.
    pub fn add(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        self.write_chain(self.desc, head, self.size, parts);
        self.next_desc = (head + parts.len() as u16) % self.size;
        self.make_available(head);
        head
    }

    /// Makes an indirect chain of `parts`, its table at `table`, available.
    pub fn add_indirect(&mut self, table: u64, parts: &[(u64, u32, bool)]) -> u16 {
        self.write_chain(table, 0, parts.len() as u16, parts);
        let head = self.next_desc;
        let len = 16 * parts.len() as u32;
        let d = Descriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0);
        self.write_desc(self.desc, head, d);
        self.next_desc = (head + 1) % self.size;
        self.make_available(head);
        head
    }

    /// Adds a tx frame at `addr` split into chunks of the given sizes.
    pub fn add_tx_frame(&mut self, addr: u64, frame: &[u8], chunks: &[usize]) -> u16 {
        self.mem.write_slice(frame, GuestAddress(addr)).unwrap();
        let mut parts = Vec::new();
        let mut off = 0;
        for &c in chunks {
            parts.push((addr + off as u64, c as u32, R));
            off += c;
        }
        assert_eq!(off, frame.len());
        self.add(&parts)
    }

    pub fn used_idx_addr(&self) -> GuestAddress {
        GuestAddress(self.used + 2)
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (head, len) of used entry `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// The used ring's flags (NO_NOTIFY = 1).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used)).unwrap()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

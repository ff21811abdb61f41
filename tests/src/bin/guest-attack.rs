//! guest-attack: plays a guest kernel that its workload owns, from a
//! privileged container in a sandboxvm guest booted with the test-only
//! `devmem` kernel variant (`kernel-config/build --variant devmem`). It
//! drives the virtio-mmio registers through `/dev/mem` and, once it has
//! taken a device from its guest driver, writes the device's virtqueue rings
//! itself in memory whose guest-physical addresses it reads from
//! `/proc/self/pagemap`. Built static (`ci/build-static`, as the agent) and copied into a test
//! bundle's rootfs by the hostile-guest e2e tests (`tests/tests/hostile.rs`).
//!
//! ```text
//! guest-attack mmio-flood SECONDS     every register of every device, reads and bad writes
//! guest-attack console-flood SECONDS  the UART as fast as it takes bytes
//! guest-attack net                    bad descriptors on the net device's queues, then
//!                                     a good frame, then the device back to its driver
//! guest-attack vsock-no-rx SECONDS    connection requests with no receive buffers posted,
//!                                     and malformed packets (the agent is cut off)
//! ```
//! Each attack prints one line per step; the host side judges.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG: usize = 0x100;
}

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;
/// Entries of each queue this driver sets up.
const QSIZE: u16 = 16;
const PAGE: usize = 4096;
/// The guest's own sysfs (the agent's mount: a container's is read-only).
const SYS: &str = "/proc/1/root/sys";
/// A guest-physical address far above any guest's memory.
const OUTSIDE: u64 = 1 << 45;

fn die(msg: String) -> ! {
    eprintln!("guest-attack: {msg}");
    std::process::exit(2)
}

/// One virtio-mmio device's register window, mapped from /dev/mem.
struct Mmio {
    base: u64,
    regs: *mut u8,
}

impl Mmio {
    fn map(mem: &File, base: u64) -> Mmio {
        // SAFETY: a fresh shared mapping of one page of /dev/mem; the kernel
        // checks the range, and the pointer is only used through read/write
        // below, within the page.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            die(format!(
                "mmap /dev/mem at {base:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Mmio {
            base,
            regs: p.cast(),
        }
    }

    fn read(&self, off: usize) -> u32 {
        assert!(off + 4 <= PAGE);
        // SAFETY: within the mapped page, 4-byte aligned (register offsets).
        unsafe { ptr::read_volatile(self.regs.add(off).cast::<u32>()) }
    }

    fn write(&self, off: usize, val: u32) {
        assert!(off + 4 <= PAGE);
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile(self.regs.add(off).cast::<u32>(), val) }
    }

    fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }
}

/// The virtio-mmio devices the VMM put on the guest's command line.
fn devices(mem: &File) -> Vec<Mmio> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut out = Vec::new();
    for word in cmdline.split_whitespace() {
        let Some(spec) = word.strip_prefix("virtio_mmio.device=") else {
            continue;
        };
        let base = spec
            .split('@')
            .nth(1)
            .and_then(|s| s.split(':').next())
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| die(format!("cannot parse {word}")));
        let dev = Mmio::map(mem, base);
        if dev.read(reg::MAGIC) == 0x7472_6976 {
            out.push(dev);
        }
    }
    out
}

/// Pages locked in this process, with their guest-physical addresses.
struct Dma {
    virt: *mut u8,
    phys: u64,
}

impl Dma {
    fn new() -> Dma {
        // SAFETY: a fresh private anonymous page, populated and locked so
        // that its frame stays put while the device uses it.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            die(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let pagemap = File::open("/proc/self/pagemap")
            .unwrap_or_else(|e| die(format!("/proc/self/pagemap: {e}")));
        let mut entry = [0u8; 8];
        let index = p as u64 / PAGE as u64;
        // SAFETY: pread into a local buffer of the size passed.
        let n = unsafe {
            libc::pread(
                pagemap.as_raw_fd(),
                entry.as_mut_ptr().cast(),
                8,
                (index * 8) as libc::off_t,
            )
        };
        let entry = u64::from_le_bytes(entry);
        let pfn = entry & ((1 << 55) - 1);
        if n != 8 || entry >> 63 == 0 || pfn == 0 {
            die("no physical address in /proc/self/pagemap (CAP_SYS_ADMIN?)".into());
        }
        Dma {
            virt: p.cast(),
            phys: pfn * PAGE as u64,
        }
    }

    fn put<T: Copy>(&self, off: usize, val: T) {
        assert!(off + std::mem::size_of::<T>() <= PAGE);
        // SAFETY: within the page; unaligned writes are allowed.
        unsafe { ptr::write_volatile(self.virt.add(off).cast::<T>(), val) };
        fence(Ordering::SeqCst);
    }

    fn get<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= PAGE);
        fence(Ordering::SeqCst);
        // SAFETY: as in `put`.
        unsafe { ptr::read_volatile(self.virt.add(off).cast::<T>()) }
    }

    fn zero(&self) {
        // SAFETY: the whole page is ours.
        unsafe { ptr::write_bytes(self.virt, 0, PAGE) };
        fence(Ordering::SeqCst);
    }
}

/// One split virtqueue in one page: descriptors at 0, the available ring at
/// 256, the used ring at 512.
struct Queue {
    page: Dma,
    avail_idx: u16,
}

const AVAIL: usize = 256;
const USED: usize = 512;

impl Queue {
    fn new() -> Queue {
        Queue {
            page: Dma::new(),
            avail_idx: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let off = usize::from(i % QSIZE) * 16;
        self.page.put(off, addr);
        self.page.put(off + 8, len);
        self.page.put(off + 12, flags);
        self.page.put(off + 14, next);
    }

    /// Offers `head` to the device (without a notification).
    fn offer(&mut self, head: u16) {
        self.page
            .put(AVAIL + 4 + 2 * usize::from(self.avail_idx % QSIZE), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.page.put(AVAIL + 2, self.avail_idx);
    }

    fn used_idx(&self) -> u16 {
        self.page.get(USED + 2)
    }
}

/// Resets `dev` and sets it up with `queues` (feature VERSION_1 only).
/// `desc_at` overrides the first queue's descriptor table address.
fn set_up(dev: &Mmio, queues: &mut [Queue], desc_at: Option<u64>) -> u32 {
    dev.write(reg::STATUS, 0);
    dev.write(reg::STATUS, ACKNOWLEDGE);
    dev.write(reg::STATUS, ACKNOWLEDGE | DRIVER);
    dev.write(reg::DEVICE_FEATURES_SEL, 1);
    let high = dev.read(reg::DEVICE_FEATURES);
    dev.write(reg::DRIVER_FEATURES_SEL, 1);
    dev.write(reg::DRIVER_FEATURES, high & 1);
    dev.write(reg::DRIVER_FEATURES_SEL, 0);
    dev.write(reg::DRIVER_FEATURES, 0);
    dev.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for (i, q) in queues.iter_mut().enumerate() {
        q.page.zero();
        q.avail_idx = 0;
        let desc = match (i, desc_at) {
            (0, Some(at)) => at,
            _ => q.page.phys,
        };
        dev.write(reg::QUEUE_SEL, i as u32);
        dev.write(reg::QUEUE_NUM, u32::from(QSIZE));
        let halves = [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (
                reg::QUEUE_DRIVER_LOW,
                reg::QUEUE_DRIVER_HIGH,
                q.page.phys + AVAIL as u64,
            ),
            (
                reg::QUEUE_DEVICE_LOW,
                reg::QUEUE_DEVICE_HIGH,
                q.page.phys + USED as u64,
            ),
        ];
        for (low, high, addr) in halves {
            dev.write(low, addr as u32);
            dev.write(high, (addr >> 32) as u32);
        }
        dev.write(reg::QUEUE_READY, 1);
    }
    dev.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    dev.status()
}

/// Takes the device of `driver` from the guest kernel (unbinds it) and
/// returns its sysfs name, e.g. `virtio2`.
fn unbind(driver: &str) -> String {
    let dir = format!("{SYS}/bus/virtio/drivers/{driver}");
    let name = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| die(format!("{dir}: {e}")))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("virtio"))
        .unwrap_or_else(|| die(format!("no device bound to {driver}")));
    std::fs::write(format!("{dir}/unbind"), &name)
        .unwrap_or_else(|e| die(format!("unbind {name} from {driver}: {e}")));
    name
}

fn find(devs: &[Mmio], id: u32) -> &Mmio {
    devs.iter()
        .find(|d| d.read(reg::DEVICE_ID) == id)
        .unwrap_or_else(|| die(format!("no virtio device with id {id}")))
}

/// Waits (a little) for the device to use `want` chains of `q`.
fn wait_used(q: &Queue, want: u16, limit: Duration) -> u16 {
    let end = Instant::now() + limit;
    loop {
        let used = q.used_idx();
        if used == want || Instant::now() >= end {
            return used;
        }
        sleep(Duration::from_millis(2));
    }
}

fn mmio_flood(devs: &[Mmio], seconds: u64) {
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut reads, mut writes) = (0u64, 0u64);
    let mut sum = 0u32;
    while Instant::now() < end {
        for dev in devs {
            for off in (0..reg::CONFIG + 0x40).step_by(4) {
                sum = sum.wrapping_add(dev.read(off));
                reads += 1;
            }
            // Bad writes a live device must shrug off: clearing status bits
            // without a reset, a notification for a queue that does not
            // exist, a write to a reserved register.
            dev.write(reg::STATUS, ACKNOWLEDGE);
            dev.write(reg::QUEUE_NOTIFY, 0xffff);
            dev.write(0x0c0, 0xdead_beef);
            writes += 3;
        }
    }
    println!(
        "mmio-flood: {} devices, {reads} reads, {writes} bad writes in {seconds} s (sum {sum:#x})",
        devs.len()
    );
    for dev in devs {
        println!(
            "mmio-flood: device at {:#x} id {} status {:#x}",
            dev.base,
            dev.read(reg::DEVICE_ID),
            dev.status()
        );
    }
}

fn console_flood(seconds: u64) {
    let mut tty = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/proc/1/root/dev/ttyS0")
        .unwrap_or_else(|e| die(format!("/dev/ttyS0: {e}")));
    let line = [b'A'; 1023];
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut bytes = 0u64;
    while Instant::now() < end {
        match tty.write(&line) {
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sleep(Duration::from_millis(1)),
            Err(e) => die(format!("write /dev/ttyS0: {e}")),
        }
    }
    println!("console-flood: {bytes} bytes written in {seconds} s");
}

/// One bad chain on the net device's transmit queue, judged by the status
/// and used index it leaves.
fn net_attack(dev: &Mmio, queues: &mut [Queue], buf: &Dma, name: &str) {
    if name == "queue-outside-memory" {
        let status = set_up(dev, queues, Some(OUTSIDE));
        println!(
            "net {name}: status {status:#x} needs-reset {}",
            status & NEEDS_RESET != 0
        );
        return;
    }
    let status = set_up(dev, queues, None);
    if status & DRIVER_OK == 0 {
        die(format!(
            "net {name}: the device refused a clean set-up ({status:#x})"
        ));
    }
    let tx = &mut queues[1];
    let b = buf.phys;
    match name {
        "descriptor-loop" => {
            tx.desc(0, b, 64, DESC_NEXT, 1);
            tx.desc(1, b, 64, DESC_NEXT, 0);
            tx.offer(0);
        }
        "zero-length" => {
            tx.desc(0, b, 0, 0, 0);
            tx.offer(0);
        }
        "outside-memory" => {
            tx.desc(0, OUTSIDE, 1514, 0, 0);
            tx.offer(0);
        }
        "oversized" => {
            tx.desc(0, b, 0xffff_fff0, 0, 0);
            tx.offer(0);
        }
        "indirect-self" => {
            tx.desc(0, tx.page.phys, 16 * u32::from(QSIZE), DESC_INDIRECT, 0);
            tx.offer(0);
        }
        "write-only-tx" => {
            tx.desc(0, b, 1514, DESC_WRITE, 0);
            tx.offer(0);
        }
        "head-out-of-range" => {
            tx.offer(300);
        }
        "index-far-ahead" => {
            tx.page.put(AVAIL + 2, 0x9000u16);
        }
        "reactivate" => {
            // DRIVER_OK cleared and set again, a queue disabled and its
            // size changed, all without a reset.
            dev.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
            dev.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
            dev.write(reg::QUEUE_SEL, 1);
            dev.write(reg::QUEUE_READY, 0);
            dev.write(reg::QUEUE_NUM, 4096);
            dev.write(reg::QUEUE_READY, 1);
        }
        _ => die(format!("no net attack {name}")),
    }
    dev.write(reg::QUEUE_NOTIFY, 1);
    let used = wait_used(&queues[1], 1, Duration::from_millis(300));
    let status = dev.status();
    println!(
        "net {name}: status {status:#x} needs-reset {} used {used}",
        status & NEEDS_RESET != 0
    );
}

fn net(devs: &[Mmio]) {
    let dev = find(devs, 1);
    let name = unbind("virtio_net");
    println!("net: took {name} at {:#x} from its driver", dev.base);
    let mut queues = [Queue::new(), Queue::new()];
    let buf = Dma::new();
    for attack in [
        "descriptor-loop",
        "zero-length",
        "outside-memory",
        "oversized",
        "indirect-self",
        "write-only-tx",
        "head-out-of-range",
        "index-far-ahead",
        "queue-outside-memory",
        "reactivate",
    ] {
        net_attack(dev, &mut queues, &buf, attack);
    }
    // After all that, a reset brings back a device that sends a good
    // frame: a virtio-net header and a broadcast Ethernet frame.
    set_up(dev, &mut queues, None);
    buf.zero();
    for (i, byte) in [0xffu8; 6].iter().enumerate() {
        buf.put(12 + i, *byte);
    }
    buf.put(12 + 12, 0x88b5u16.to_be());
    let tx = &mut queues[1];
    tx.desc(0, buf.phys, 12 + 60, 0, 0);
    tx.offer(0);
    dev.write(reg::QUEUE_NOTIFY, 1);
    let used = wait_used(&queues[1], 1, Duration::from_secs(5));
    println!("net good-frame: status {:#x} used {used}", dev.status());
    dev.write(reg::STATUS, 0);
    std::fs::write(format!("{SYS}/bus/virtio/drivers/virtio_net/bind"), &name)
        .unwrap_or_else(|e| die(format!("bind {name} again: {e}")));
    let back = (0..100).any(|_| {
        sleep(Duration::from_millis(50));
        std::path::Path::new(&format!("{SYS}/class/net/eth0")).exists()
    });
    println!("net: driver bound again, eth0 back {back}");
}

/// A vsock packet header (44 bytes) at `off` of `page`.
fn vsock_hdr(page: &Dma, off: usize, src_cid: u64, dst_cid: u64, port: u32, len: u32, op: u16) {
    page.put(off, src_cid);
    page.put(off + 8, dst_cid);
    page.put(off + 16, 40_000 + port);
    page.put(off + 20, 10_000 + port);
    page.put(off + 24, len);
    page.put(off + 28, 1u16); // stream
    page.put(off + 30, op);
    page.put(off + 32, 0u32);
    page.put(off + 36, 65_536u32);
    page.put(off + 40, 0u32);
}

fn vsock_no_rx(devs: &[Mmio], seconds: u64) {
    let dev = find(devs, 19);
    let cid = u64::from(dev.read(reg::CONFIG)) | u64::from(dev.read(reg::CONFIG + 4)) << 32;
    let name = unbind("vmw_vsock_virtio_transport");
    let mut queues = [Queue::new(), Queue::new(), Queue::new()];
    let status = set_up(dev, &mut queues, None);
    println!("vsock: took {name} (cid {cid}), status {status:#x}, no receive buffers");
    let pkts = Dma::new();
    const REQUEST: u16 = 1;
    const RW: u16 = 5;
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut sent, mut port, mut malformed) = (0u64, 0u32, 0u64);
    while Instant::now() < end {
        let tx = &mut queues[1];
        for i in 0..QSIZE {
            let off = usize::from(i) * 64;
            port = port.wrapping_add(1) % 20_000;
            // Every fourth packet is malformed: a payload length far beyond
            // its buffer, the wrong source, an unknown operation.
            let (src, len, op) = match (i % 8, port % 3) {
                (3, 0) => (cid, 0x7fff_ffff, RW),
                (3, 1) => (cid + 7, 0, REQUEST),
                (3, _) => (cid, 0, 0xbeef),
                (7, _) => (cid, 0, 0),
                _ => (cid, 0, REQUEST),
            };
            if i % 4 == 3 {
                malformed += 1;
            }
            vsock_hdr(&pkts, off, src, 2, port, len, op);
            tx.desc(i, pkts.phys + off as u64, 44, 0, 0);
            tx.offer(i);
        }
        let want = tx.avail_idx;
        dev.write(reg::QUEUE_NOTIFY, 1);
        let used = wait_used(&queues[1], want, Duration::from_secs(2));
        if used != want {
            println!("vsock: the device stopped taking packets at {used} of {want}");
            break;
        }
        sent += u64::from(QSIZE);
    }
    println!(
        "vsock: {sent} packets sent ({malformed} malformed) in {seconds} s, status {:#x}, rx used {}",
        dev.status(),
        queues[0].used_idx()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = || {
        args.get(1)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| die("a number of seconds expected".into()))
    };
    let mem = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/proc/1/root/dev/mem")
            .unwrap_or_else(|e| die(format!("/dev/mem: {e} (the devmem kernel variant?)")))
    };
    match args.first().map(String::as_str) {
        Some("mmio-flood") => mmio_flood(&devices(&mem()), seconds()),
        Some("console-flood") => console_flood(seconds()),
        Some("net") => net(&devices(&mem())),
        Some("vsock-no-rx") => vsock_no_rx(&devices(&mem()), seconds()),
        _ => die("usage: guest-attack mmio-flood S | console-flood S | net | vsock-no-rx S".into()),
    }
    let _ = std::io::stdout().flush();
}

//! Attaches virtio-mmio devices: each gets a 4 KiB MMIO window and an IRQ,
//! its queue notifications become KVM ioeventfds (no vCPU exit to userspace
//! for a kick) and its interrupt an irqfd; the guest learns about it from a
//! `virtio_mmio.device=` entry on the kernel command line.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::balloon::Balloon;
use devices::virtio::fs::VhostUserFs;
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::net::Net;
use devices::virtio::vsock::Vsock;
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the first virtio-mmio window goes (in the MMIO gap, below the
/// IOAPIC).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The first IRQ for virtio devices (4 is the serial port's).
pub const FIRST_IRQ: u32 = 5;
/// The last usable IOAPIC pin.
pub const LAST_IRQ: u32 = 23;
/// The QueueNotify register's offset in the window.
const QUEUE_NOTIFY: u64 = 0x50;
/// The guest's vsock context id (2 is the host).
pub const GUEST_CID: u64 = 3;

/// A virtio-fs share served by a virtiofsd the caller started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
}

/// The vsock device and its host-side Unix socket bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Where host processes connect (`CONNECT <port>\n`); guest connections
    /// to host port P go to `<uds>_P`.
    pub uds: PathBuf,
}

/// A virtio-net device on a host tap interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap's name; attached if it exists (e.g. made with `ip tuntap add
    /// NAME mode tap`), created (and gone with the VM) if not.
    pub tap: String,
    /// The guest interface's MAC; the guest picks a random one without it.
    pub mac: Option<[u8; 6]>,
    /// The guest interface's MTU; 1500 without it.
    pub mtu: Option<u16>,
}

/// `SOCKET:TAG`, as `sandboxvm boot --fs` takes it.
impl std::fmt::Display for FsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.socket.display(), self.tag)
    }
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (socket, tag) = s
            .rsplit_once(':')
            .filter(|(p, t)| !p.is_empty() && !t.is_empty())
            .ok_or_else(|| format!("expected SOCKET:TAG, got {s:?}"))?;
        Ok(FsConfig {
            socket: socket.into(),
            tag: tag.to_string(),
        })
    }
}

/// `tap=NAME[,mac=MAC][,mtu=N]`, as `sandboxvm boot --net` takes it.
impl std::fmt::Display for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tap={}", self.tap)?;
        if let Some(mac) = self.mac {
            write!(f, ",mac={}", format_mac(&mac))?;
        }
        if let Some(mtu) = self.mtu {
            write!(f, ",mtu={mtu}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut mtu = None;
        for item in s.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {item:?}"))?;
            match key {
                "tap" if !value.is_empty() => tap = Some(value.to_string()),
                "mac" => mac = Some(parse_mac(value)?),
                "mtu" => {
                    mtu = Some(
                        value
                            .parse::<u16>()
                            .map_err(|_| format!("bad MTU {value:?}"))?,
                    )
                }
                _ => return Err(format!("unknown or empty option {item:?} (tap, mac, mtu)")),
            }
        }
        let tap = tap.ok_or_else(|| "tap=NAME is required".to_string())?;
        Ok(NetConfig { tap, mac, mtu })
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("bad MAC {s:?} (aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More devices than IRQ lines.
    #[error("too many virtio devices (at most {})", LAST_IRQ - FIRST_IRQ + 1)]
    TooMany,
    /// An eventfd, irqfd or ioeventfd.
    #[error("cannot set up {what} of the {device} device: {source}")]
    Events {
        /// Which device.
        device: &'static str,
        /// What failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The vsock device.
    #[error("vsock: {0}")]
    Vsock(#[from] devices::virtio::vsock::Error),
    /// The virtio-fs device.
    #[error("virtio-fs {tag}: {source}")]
    Fs {
        /// The share's tag.
        tag: String,
        /// The error.
        source: devices::virtio::fs::Error,
    },
    /// A virtio-net device.
    #[error("virtio-net: {source}")]
    Net {
        /// The tap's name.
        tap: String,
        /// The error.
        source: devices::virtio::net::device::Error,
    },
    /// The MMIO bus.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
}

/// Where the device in slot `index` (0 for the first attached) is: its
/// MMIO window's base and its IRQ.
pub fn slot(index: u32) -> Result<(u64, u32), Error> {
    let irq = FIRST_IRQ + index;
    if irq > LAST_IRQ {
        return Err(Error::TooMany);
    }
    Ok((MMIO_BASE + u64::from(index) * mmio::MMIO_LEN, irq))
}

/// The `virtio_mmio.device=` entries of `count` slots: what the guest is
/// told whether or not a device is attached behind each yet (a template
/// guest boots with the slots empty).
pub fn slot_cmdline(count: usize) -> Result<Vec<String>, Error> {
    (0..u32::try_from(count).map_err(|_| Error::TooMany)?)
        .map(|i| slot(i).map(|(base, irq)| mmio::cmdline_entry(base, irq)))
        .collect()
}

/// Places virtio devices one after another.
pub struct Attacher<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    next: u32,
}

impl<'a> Attacher<'a> {
    /// Attaches to `vm`'s `mmio` bus.
    pub fn new(vm: &'a VmFd, mem: &'a GuestMemoryMmap, mmio: &'a mut Bus) -> Self {
        Attacher {
            vm,
            mem,
            mmio,
            next: 0,
        }
    }

    /// How many devices are attached: they hold the first slots, whose
    /// command-line entries [`slot_cmdline`] gives.
    pub fn attached(&self) -> usize {
        self.next as usize
    }

    /// Attaches the vsock device.
    pub fn vsock(&mut self, config: &VsockConfig) -> Result<(), Error> {
        let dev = Vsock::new(GUEST_CID, config.uds.clone())?;
        self.attach("vsock", Box::new(dev))
    }

    /// Connects to virtiofsd and attaches a virtio-fs device.
    pub fn fs(&mut self, config: &FsConfig, relay: bool) -> Result<(), Error> {
        let dev = VhostUserFs::connect(
            &config.socket,
            &config.tag,
            std::time::Duration::from_secs(5),
            relay,
        )
        .map_err(|source| Error::Fs {
            tag: config.tag.clone(),
            source,
        })?;
        self.attach("virtio-fs", Box::new(dev))
    }

    /// Opens the tap and attaches a virtio-net device on it.
    pub fn net(&mut self, config: &NetConfig) -> Result<(), Error> {
        let dev = Net::open(&config.tap, config.mac, config.mtu).map_err(|source| Error::Net {
            tap: config.tap.clone(),
            source,
        })?;
        self.attach("virtio-net", Box::new(dev))
    }

    /// Attaches a virtio-balloon device for free page reporting.
    pub fn balloon(&mut self) -> Result<(), Error> {
        self.attach("virtio-balloon", Box::new(Balloon::new()))
    }

    fn attach(&mut self, name: &'static str, device: Box<dyn VirtioDevice>) -> Result<(), Error> {
        let (base, irq) = slot(self.next)?;
        let events = |what, source| Error::Events {
            device: name,
            what,
            source,
        };
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| events("irqfd", e))?;
        self.vm
            .register_irqfd(&irqfd, irq)
            .map_err(|e| events("irqfd", e.into()))?;
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
        let transport = MmioTransport::new(device, self.mem.clone(), interrupt)
            .map_err(|e| events("queues", e))?;
        for (index, evt) in transport.queue_notify_eventfds() {
            self.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), index)
                .map_err(|e| events("ioeventfd", e.into()))?;
        }
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, mmio::MMIO_LEN)?;
        log::debug!("{name} at {base:#x}, IRQ {irq}");
        self.next += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn the_net_and_fs_options_read_back_what_they_write() {
        let parse = |s: &str| s.parse::<NetConfig>();
        assert_eq!(
            parse("tap=sbx1,mac=52:54:00:AB:cd:0e,mtu=1400").unwrap(),
            NetConfig {
                tap: "sbx1".into(),
                mac: Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0e]),
                mtu: Some(1400)
            }
        );
        assert_eq!(
            parse("mtu=9000,tap=t").unwrap().mtu,
            Some(9000),
            "any order"
        );
        for d in [
            NetConfig {
                tap: "tap0_sbx".into(),
                mac: Some([0x02, 0xab, 0, 1, 2, 0xff]),
                mtu: Some(1400),
            },
            NetConfig {
                tap: "t".into(),
                mac: None,
                mtu: None,
            },
        ] {
            assert_eq!(parse(&d.to_string()).unwrap(), d, "{d}");
        }
        assert_eq!(
            NetConfig {
                tap: "tap0_sbx".into(),
                mac: Some([0x02, 0xab, 0, 1, 2, 0xff]),
                mtu: Some(1400),
            }
            .to_string(),
            "tap=tap0_sbx,mac=02:ab:00:01:02:ff,mtu=1400"
        );
        for (bad, why) in [
            ("mac=52:54:00:00:00:01", "tap=NAME is required"),
            ("tap=", "unknown or empty option \"tap=\""),
            ("tap0", "expected key=value"),
            ("tap=t,speed=10", "unknown or empty option \"speed=10\""),
            ("tap=t,mtu=70000", "bad MTU \"70000\""),
            ("tap=t,mac=52:54:00:00:00", "bad MAC"),
            ("tap=t,mac=52:54:00:00:00:01:02", "bad MAC"),
            ("tap=t,mac=5:54:00:00:00:01", "bad MAC"),
            ("tap=t,mac=zz:54:00:00:00:01", "bad MAC"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.starts_with(why), "{bad}: {err}");
        }
        let fs = FsConfig {
            socket: "/run/sandboxvm/c:1/fs.sock".into(),
            tag: "sbx-rootfs".into(),
        };
        assert_eq!(
            fs.to_string().parse::<FsConfig>().unwrap(),
            fs,
            "a colon in the path"
        );
        for bad in ["sock", ":tag", "/sock:"] {
            assert!(bad.parse::<FsConfig>().is_err(), "{bad}");
        }
    }

    /// Runs `f` on a thread in a new network namespace (its taps vanish
    /// with it); skipped without KVM, /dev/net/tun or the privilege.
    fn in_new_netns(f: impl FnOnce() + Send + 'static) {
        if !std::path::Path::new("/dev/kvm").exists()
            || !std::path::Path::new("/dev/net/tun").exists()
        {
            eprintln!("skipped: no /dev/kvm or /dev/net/tun");
            return;
        }
        let result = std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: {}", std::io::Error::last_os_error());
                return;
            }
            f()
        })
        .join();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn net_devices_get_a_window_an_irq_and_a_cmdline_entry_each() {
        in_new_netns(|| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            let vm = crate::vm::create(&kvm, &mem, 1).unwrap();
            let mut bus = Bus::new();
            let mut attacher = Attacher::new(&vm, &mem, &mut bus);
            let net = |tap: &str, mac, mtu| NetConfig {
                tap: tap.into(),
                mac,
                mtu,
            };
            attacher
                .net(&net("sbxvmm0", Some([0x52, 0x54, 0, 0, 0, 1]), Some(1400)))
                .unwrap();
            attacher.net(&net("sbxvmm1", None, None)).unwrap();
            let err = attacher.net(&net("sbxvmm2", None, Some(10))).unwrap_err();
            assert_eq!(
                err.to_string(),
                "virtio-net: MTU 10 is too small (at least 68)"
            );
            // The tap is taken: a second device on it is refused.
            let err = attacher.net(&net("sbxvmm0", None, None)).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("virtio-net: cannot attach to tap sbxvmm0: "),
                "{err}"
            );
            assert_eq!(attacher.attached(), 2, "a refused device takes no slot");
            assert_eq!(
                slot_cmdline(attacher.attached()).unwrap(),
                [
                    "virtio_mmio.device=4K@0xd0000000:5",
                    "virtio_mmio.device=4K@0xd0001000:6"
                ]
            );
            let read = |addr: u64| {
                let mut b = [0u8; 4];
                assert!(bus.read(addr, &mut b));
                b
            };
            assert_eq!(u32::from_le_bytes(read(MMIO_BASE + 8)), 1); // DeviceID: net
            assert_eq!(u32::from_le_bytes(read(MMIO_BASE + 0x1008)), 1);
            assert_eq!(read(MMIO_BASE + 0x100), [0x52, 0x54, 0, 0]); // MAC
        });
    }
}

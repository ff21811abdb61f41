//! The tap back end: a `/dev/net/tun` file attached to a named tap
//! interface with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, and
//! a `virtio_net_hdr_v1` (12 bytes) in front of every frame read or
//! written.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::rxtx::TapIo;
use super::VNET_HDR_LEN;

/// The tun/tap control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// `TUNSETOFFLOAD` flags: what the reader of the tap (the guest) accepts.
pub mod offload {
    /// Partial checksums.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCPv4 segmentation offload.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCPv6 segmentation offload.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
}

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has a NUL byte.
    #[error("invalid tap name {0:?} (1 to 15 bytes, no NUL)")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_DEVICE}: {0}")]
    OpenTun(io::Error),
    /// `TUNSETIFF` failed: no permission, or another process holds the tap.
    #[error("cannot attach to tap {name}: {source}")]
    Attach {
        /// The tap's name.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// A tap ioctl (`TUNSETVNETHDRSZ`) failed.
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        /// The tap's name.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` uses it: the name and the flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap `name`, creating it (not persistent: it goes
    /// away with the last file) if it does not exist. A persistent tap
    /// made with `ip tuntap add ... mode tap [multi_queue]` is attached as
    /// it was made (single or multi queue).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;
        let base = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let attached = match set_iff(&file, name, base) {
            // A multi-queue tap only takes multi-queue attachments.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                set_iff(&file, name, base | libc::IFF_MULTI_QUEUE)
            }
            other => other,
        };
        let name = attached.map_err(|source| TapError::Attach {
            name: name.to_string(),
            source,
        })?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points to a live local; the fd is a tun file we own.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap { file, name };
        // No offloads until a driver asks for them.
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            name: tap.name.clone(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads ([`offload`] flags) the reader
    /// accepts: frames read from the tap may then carry partial checksums
    /// or be up to 64 KiB TSO packets.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a tun
        // file we own.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the tap accepts the offload `flags` (tried, then all
    /// offloads turned off again).
    pub fn supports_offload(&self, flags: u32) -> bool {
        let ok = self.set_offload(flags).is_ok();
        if let Err(e) = self.set_offload(0) {
            log::warn!("tap {}: turning offloads off: {e}", self.name);
        }
        ok
    }

    /// Another file on the same tap queue (a dup of the fd).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

/// `TUNSETIFF` with `flags`; the name the kernel gave the interface.
fn set_iff(file: &File, name: &str, flags: libc::c_int) -> io::Result<String> {
    let mut ifr = IfReq {
        flags: flags as libc::c_short,
        ..IfReq::default()
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its
    // layout and size (40 bytes) and lives across the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = ifr
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ifr.name.len());
    Ok(String::from_utf8_lossy(&ifr.name[..len]).into_owned())
}

impl TapIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.file).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        loop {
            match (&self.file).write(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::test_util::{in_new_netns, link_up, PacketSocket, TEST_ETHERTYPE};

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for bad in ["", "sixteen-chars-xx", "a\0b"] {
            let err = Tap::open(bad).unwrap_err();
            assert!(matches!(err, TapError::Name(_)), "{bad:?}: {err}");
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn opens_a_tap_by_name_and_a_second_open_is_a_clean_error() {
        in_new_netns(|| {
            let tap = Tap::open("sbxtap0").unwrap();
            assert_eq!(tap.name(), "sbxtap0");
            // A template name gets the kernel's choice.
            let t2 = Tap::open("sbxtap%d").unwrap();
            assert!(t2.name().starts_with("sbxtap"), "{}", t2.name());
            assert_ne!(t2.name(), "sbxtap%d");
            // The tap is held by `tap` (single queue): busy.
            let err = Tap::open("sbxtap0").unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("cannot attach to tap sbxtap0: "),
                "{err}"
            );
        });
    }

    #[test]
    fn a_persistent_multi_queue_tap_is_attached_as_made() {
        in_new_netns(|| {
            // What `ip tuntap add sbxmq0 mode tap multi_queue` makes.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(TUN_DEVICE)
                .unwrap();
            let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
            set_iff(&file, "sbxmq0", flags).unwrap();
            // SAFETY: TUNSETPERSIST takes its argument by value.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1) };
            assert_eq!(ret, 0);
            drop(file);
            let tap = Tap::open("sbxmq0").unwrap();
            assert_eq!(tap.name(), "sbxmq0");
        });
    }

    #[test]
    fn offloads_for_checksum_and_tso_are_supported() {
        in_new_netns(|| {
            let tap = Tap::open("sbxtap1").unwrap();
            assert!(tap.supports_offload(offload::CSUM | offload::TSO4 | offload::TSO6));
            // TSO without checksum offload is refused by the kernel.
            assert!(!tap.supports_offload(offload::TSO4));
            tap.set_offload(offload::CSUM).unwrap();
        });
    }

    #[test]
    fn frames_cross_with_a_12_byte_vnet_header() {
        in_new_netns(|| {
            let mut tap = Tap::open("sbxtap2").unwrap();
            link_up("sbxtap2");
            let sock = PacketSocket::bind("sbxtap2");
            // Tap write = the interface receives the frame.
            let mut frame = vec![0u8; VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]); // dst
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // src
            frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
            frame.extend_from_slice(b"to the host");
            assert_eq!(tap.write_frame(&frame).unwrap(), frame.len());
            assert_eq!(sock.recv(), frame[VNET_HDR_LEN..]);
            // The interface sends = the tap reads, header first.
            let out = sock.send_to_tap(b"to the guest");
            let mut buf = vec![0u8; 2048];
            let n = crate::virtio::net::test_util::read_retry(&mut tap, &mut buf);
            assert_eq!(&buf[VNET_HDR_LEN..n], &out[..]);
            assert_eq!(buf[0], 0, "no checksum flags without offloads");
            assert_eq!(buf[1], 0, "no GSO without offloads");
            // Nothing else queued (no IPv6 chatter in the test namespace).
            let err = tap.read_frame(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        });
    }
}

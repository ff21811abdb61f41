//! Persistent taps: made with `/dev/net/tun` ioctls (netlink cannot make
//! them) in the calling thread's network namespace, with the flags the
//! VMM's tap back end attaches with (`IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, single queue), then let go: the VMM opens the tap by
//! name later, and a single-queue tap takes one file at a time.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

use super::Error;

/// `struct ifreq` as `TUNSETIFF` uses it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Attaches to the tap `name` in this thread's network namespace, making
/// it if it does not exist (gone with the file unless made persistent).
pub fn open(name: &str) -> Result<File, Error> {
    let err = |what: &'static str| {
        let name = name.to_string();
        move |source: io::Error| Error::Tap { name, what, source }
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(err("name")(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(err("open /dev/net/tun"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (same
    // layout: name, then the flags in the union); the fd is ours.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(err("TUNSETIFF")(io::Error::last_os_error()));
    }
    Ok(file)
}

/// Makes the persistent tap `name` in this thread's network namespace
/// (the caller checked that no interface has that name).
pub fn create_persistent(name: &str) -> Result<(), Error> {
    let file = open(name)?;
    // SAFETY: TUNSETPERSIST takes its argument by value; the fd is ours.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(Error::Tap {
            name: name.to_string(),
            what: "TUNSETPERSIST",
            source: io::Error::last_os_error(),
        });
    }
    // Closing the file leaves the persistent tap without a queue until the
    // VMM attaches.
    Ok(())
}

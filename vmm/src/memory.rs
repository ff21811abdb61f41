//! Guest RAM, backed by a memfd so that vhost-user back ends (virtiofsd) can
//! map the same pages.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestMemoryMmap};

use crate::layout;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Mapping the regions failed.
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    /// The requested size is too small to boot anything.
    #[error("guest memory of {0} MiB is too small (at least 16 MiB)")]
    TooSmall(u64),
}

/// Guest memory and the memfd that backs it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// The memfd behind them (for sharing with vhost-user back ends).
    pub file: File,
    /// Total size in bytes.
    pub size: u64,
}

/// Creates `mib` MiB of guest memory laid out as [`layout::ram_regions`] says.
pub fn create(mib: u64) -> Result<GuestRam, Error> {
    if mib < 16 {
        return Err(Error::TooSmall(mib));
    }
    let size = mib << 20;
    // SAFETY: the name is a valid NUL-terminated string; the call has no
    // other memory effects. The result is checked below.
    let fd = unsafe { libc::memfd_create(c"sandboxvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::Memfd)?;
    let ranges: Vec<_> = layout::ram_regions(size)
        .into_iter()
        .map(|(addr, len, offset)| {
            let file = file.try_clone().map_err(Error::Memfd)?;
            Ok((addr, len as usize, Some(FileOffset::new(file, offset))))
        })
        .collect::<Result<_, Error>>()?;
    let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(Error::Map)?;
    Ok(GuestRam { memory, file, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn memory_is_shared_with_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = create(64).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file.read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.file.metadata().unwrap().len(), 64 << 20);
    }

    #[test]
    fn rejects_tiny_memory() {
        assert!(matches!(create(8), Err(Error::TooSmall(8))));
    }
}

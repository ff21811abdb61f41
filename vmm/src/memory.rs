//! Guest RAM, backed by a memfd so that vhost-user back ends (virtiofsd) can
//! map the same pages.
//!
//! The mapping is advised for transparent huge pages, as Cloud Hypervisor
//! does by default: where the host allows them for shared memory
//! (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to `advise`,
//! `within_size` or `always`), the guest's memory is faulted in 2 MiB at a
//! time, and every fault a booting guest takes is one exit into the host
//! kernel fewer. Measured in the nested CI host, boot to the test guest's init
//! marker, medians of 6: 4.7 s with 4 KiB pages, 2.6-2.7 s with huge pages.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::layout;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Mapping the regions failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// The requested size is too small to boot anything.
    #[error("guest memory of {0} MiB is too small (at least 16 MiB)")]
    TooSmall(u64),
    /// Hot-pluggable memory not in whole blocks.
    #[error("hot-pluggable memory of {0} MiB is not a multiple of {block} MiB", block = layout::HOTPLUG_BLOCK >> 20)]
    Hotplug(u64),
    /// A template's memory file is not as long as the VM's memory.
    #[error("memory file of {0} bytes, the VM has {1}")]
    FileSize(u64, u64),
    /// More than the guest's physical address space holds.
    #[error("guest memory of {0} MiB (+ {1} MiB to add) does not fit the guest's address space")]
    TooLarge(u64, u64),
}

/// Guest memory and the memfd that backs it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// The file behind them: a memfd, or a template's memory.
    pub file: File,
    /// Whether another process that maps `file` sees the guest's writes
    /// (a memfd mapped shared, which vhost-user back ends can be given);
    /// false for a template's private copy-on-write mapping.
    pub shared: bool,
    /// Boot RAM in bytes (what the e820 map describes).
    pub size: u64,
    /// Memory the guest can add later: its guest address and length.
    pub hotplug: Option<(GuestAddress, u64)>,
}

/// Creates `mib` MiB of guest memory laid out as [`layout::ram_regions`]
/// says, and `hotplug_mib` MiB more at [`layout::hotplug_base`] for the
/// guest to add later. All of it is one sparse memfd: nothing is allocated
/// before the guest touches it.
pub fn create(mib: u64, hotplug_mib: u64) -> Result<GuestRam, Error> {
    let (size, hotplug_size) = sizes(mib, hotplug_mib)?;
    // SAFETY: the name is a valid NUL-terminated string; the call has no
    // other memory effects. The result is checked below.
    let fd = unsafe { libc::memfd_create(c"sandboxvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size + hotplug_size).map_err(Error::Memfd)?;
    let ram = map(file, size, hotplug_size, libc::MAP_SHARED)?;
    for region in ram.memory.iter() {
        advise_huge_pages(region.as_ptr(), region.len() as usize);
    }
    Ok(ram)
}

/// Guest memory as [`create`] lays it out, mapped private and
/// copy-on-write from `file` (a template's memory, as long as the memfd
/// would be): every VM restored from one template shares the page cache of
/// the pages its guest has not written, and a guest's writes stay its own.
/// Nothing else can map it: see [`GuestRam::shared`].
pub fn from_template(mib: u64, hotplug_mib: u64, file: File) -> Result<GuestRam, Error> {
    let (size, hotplug_size) = sizes(mib, hotplug_mib)?;
    let len = file.metadata().map_err(Error::Memfd)?.len();
    if len != size + hotplug_size {
        return Err(Error::FileSize(len, size + hotplug_size));
    }
    map(file, size, hotplug_size, libc::MAP_PRIVATE)
}

/// Boot RAM and hot-pluggable memory in bytes, checked.
fn sizes(mib: u64, hotplug_mib: u64) -> Result<(u64, u64), Error> {
    if mib < 16 {
        return Err(Error::TooSmall(mib));
    }
    let size = mib.checked_mul(1 << 20).ok_or(Error::TooLarge(mib, 0))?;
    let hotplug_size = hotplug_mib
        .checked_mul(1 << 20)
        .filter(|&h| {
            h.checked_add(layout::hotplug_base(size))
                .is_some_and(|end| end <= layout::GUEST_PHYS_END)
        })
        .ok_or(Error::TooLarge(mib, hotplug_mib))?;
    if !hotplug_size.is_multiple_of(layout::HOTPLUG_BLOCK) {
        return Err(Error::Hotplug(hotplug_mib));
    }
    Ok((size, hotplug_size))
}

/// Maps the regions of `file` (`flags`: MAP_SHARED or MAP_PRIVATE).
fn map(file: File, size: u64, hotplug_size: u64, flags: i32) -> Result<GuestRam, Error> {
    let hotplug =
        (hotplug_size > 0).then(|| (GuestAddress(layout::hotplug_base(size)), hotplug_size));
    let regions = layout::ram_regions(size)
        .into_iter()
        .chain(hotplug.map(|(addr, len)| (addr, len, size)))
        .map(|(addr, len, offset)| {
            let file = file.try_clone().map_err(Error::Memfd)?;
            let mapping = MmapRegionBuilder::new(len as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_NORESERVE | flags)
                .with_file_offset(FileOffset::new(file, offset))
                .build()
                .map_err(|e| Error::Map(e.to_string()))?;
            GuestRegionMmap::new(mapping, addr)
                .ok_or_else(|| Error::Map(format!("a region at {:#x} overflows", addr.0)))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map(e.to_string()))?;
    Ok(GuestRam {
        memory,
        file,
        shared: flags & libc::MAP_SHARED != 0,
        size,
        hotplug,
    })
}

/// Asks for transparent huge pages on a guest RAM mapping. Only advice: a
/// host that does not give them to shared memory keeps 4 KiB pages, which
/// work the same, only slower to fault in.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: `addr..addr+len` is a live mapping owned by the caller's
    // GuestMemoryMmap; MADV_HUGEPAGE only changes how its pages are
    // allocated, never its contents or its validity.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "no transparent huge pages for guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether this host gives huge pages to shared memory that asks for them
/// (`shmem_enabled` is not `never`/`deny`); `None` when it cannot tell.
pub fn shmem_huge_pages() -> Option<bool> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok()?;
    shmem_setting_allows_advice(&text)
}

/// Parses `shmem_enabled` ("always within_size advise [never] deny force"):
/// the bracketed word is the setting in force.
fn shmem_setting_allows_advice(text: &str) -> Option<bool> {
    let current = text.split_whitespace().find(|w| w.starts_with('['))?;
    Some(matches!(
        current,
        "[always]" | "[within_size]" | "[advise]" | "[force]"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_shared_with_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = create(64, 0).unwrap();
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
    fn the_shmem_setting_in_force_is_the_bracketed_one() {
        let all = "always within_size advise never deny force";
        let with = |word: &str| all.replace(word, &format!("[{word}]"));
        assert_eq!(shmem_setting_allows_advice(&with("never")), Some(false));
        assert_eq!(shmem_setting_allows_advice(&with("deny")), Some(false));
        assert_eq!(shmem_setting_allows_advice(&with("advise")), Some(true));
        assert_eq!(
            shmem_setting_allows_advice(&with("within_size")),
            Some(true)
        );
        assert_eq!(shmem_setting_allows_advice(&with("always")), Some(true));
        assert_eq!(shmem_setting_allows_advice("garbage"), None);
    }

    #[test]
    fn guest_ram_asks_for_huge_pages() {
        let ram = create(64, 0).unwrap();
        let region = ram.memory.iter().next().unwrap();
        let start = region.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_region = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, _)) = range.split_once('-') {
                    if lo.chars().all(|c| c.is_ascii_hexdigit()) && !lo.is_empty() {
                        in_region = usize::from_str_radix(lo, 16).unwrap() == start;
                        continue;
                    }
                }
            }
            if in_region {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.to_string());
                }
            }
        }
        let flags = flags.expect("the guest RAM mapping in smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "VmFlags:{flags}"
        );
    }

    #[test]
    fn hot_pluggable_memory_is_mapped_above_the_ram_and_shares_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = create(64, 256).unwrap();
        let (addr, len) = ram.hotplug.unwrap();
        assert_eq!((addr.0, len), (layout::hotplug_base(64 << 20), 256 << 20));
        assert_eq!(ram.size, 64 << 20);
        assert_eq!(ram.memory.num_regions(), 2);
        ram.memory
            .write_obj(0x1234_5678_u32, GuestAddress(addr.0 + len - 4))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file
            .read_exact_at(&mut buf, (64 << 20) + len - 4)
            .unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        assert!(matches!(create(64, 100), Err(Error::Hotplug(100))));
        assert!(matches!(create(64, u64::MAX), Err(Error::TooLarge(..))));
        assert!(matches!(create(u64::MAX, 0), Err(Error::TooLarge(..))));
    }

    #[test]
    fn rejects_tiny_memory() {
        assert!(matches!(create(8, 0), Err(Error::TooSmall(8))));
    }
}

//! Direct kernel boot: loads the kernel (ELF `vmlinux`, preferring its PVH
//! entry, or a `bzImage`), the initramfs and the command line, and writes the
//! boot parameters (zero page or PVH start info) with the e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::regs::EntryMode;
use crate::layout::*;

/// Errors from loading the kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(String),
    /// linux-loader rejected the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The path given.
        path: String,
        /// What linux-loader said.
        source: linux_loader::loader::Error,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest memory next to the kernel.
    #[error("initramfs of {size} bytes does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot data into guest memory failed.
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

/// Where the loaded kernel is entered, and what the loader learned.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Entry mode and address.
    pub entry: EntryMode,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    setup_header: Option<setup_header>,
}

/// Kernel image formats.
#[derive(Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(Format::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let p = path.display().to_string();
    let kernel_err = |source| Error::KernelFile {
        path: p.clone(),
        source,
    };
    let mut file = File::open(path).map_err(kernel_err)?;
    let format = detect_format(&mut file)
        .map_err(kernel_err)?
        .ok_or_else(|| Error::NotAKernel(p.clone()))?;
    let load_err = |source| Error::Load {
        path: p.clone(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh(addr),
                _ => EntryMode::Linux64(r.kernel_load),
            };
            Ok(LoadedKernel {
                entry,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Format::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                // The 64-bit entry point sits 0x200 past the protected-mode code.
                entry: EntryMode::Linux64(GuestAddress(r.kernel_load.0 + 0x200)),
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// A loaded initramfs: guest address and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Where an initramfs of `size` bytes goes: page-aligned, as high as
/// possible in low RAM, above the kernel.
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let top = low_ram_end(mem_size).min(u64::from(u32::MAX));
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Copies the initramfs at `path` into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<Initrd, Error> {
    let err = |source| Error::InitrdFile {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let addr = initrd_address(mem_size, kernel.end, size).ok_or(Error::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Memory(e.to_string()))?;
    Ok(Initrd { addr, size })
}

/// Builds the kernel command line from the VMM's defaults and the user's part.
pub fn build_cmdline(defaults: &str, extra: &str) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    for part in [defaults, extra] {
        let part = part.trim();
        if !part.is_empty() {
            cmdline
                .insert_str(part)
                .map_err(|e| Error::Cmdline(e.to_string()))?;
        }
    }
    Ok(cmdline)
}

/// Writes the command line and the boot parameters the entry mode needs.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<Initrd>,
) -> Result<(), Error> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| Error::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    let mem_err = |e: linux_loader::configurator::Error| Error::Memory(e.to_string());
    match kernel.entry {
        EntryMode::Pvh(_) => {
            let params = pvh_params(mem_size, cmdline_len, initrd);
            PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(mem_err)
        }
        EntryMode::Linux64(_) => {
            let zero_page = zero_page(mem_size, kernel.setup_header, cmdline_len, initrd);
            let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
                .map_err(mem_err)
        }
    }
}

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

fn pvh_params(mem_size: u64, cmdline_len: usize, initrd: Option<Initrd>) -> BootParams {
    let memmap: Vec<hvm_memmap_table_entry> = e820_ram(mem_size)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let _ = cmdline_len; // PVH finds the command line by its NUL terminator.
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params
}

/// The Linux zero page: the image's setup header (bzImage) with what the
/// loader fills in, and the e820 map.
fn zero_page(
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_ram(mem_size);
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Reads back the boot_params at the zero page (for tests and diagnostics).
pub fn read_zero_page(mem: &GuestMemoryMmap) -> Result<boot_params, Error> {
    mem.read_obj(GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn linux64() -> LoadedKernel {
        LoadedKernel {
            entry: EntryMode::Linux64(GuestAddress(0x100_0000)),
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn cmdline_joins_defaults_and_extra() {
        let c = build_cmdline("console=ttyS0 reboot=k", " quiet ").unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k quiet"
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(build_cmdline("a", &long), Err(Error::Cmdline(_))));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned_but_above_the_kernel() {
        assert_eq!(
            initrd_address(256 * MIB, 32 * MIB, 5000),
            Some(256 * MIB - 2 * PAGE_SIZE)
        );
        assert_eq!(initrd_address(256 * MIB, 32 * MIB, 250 * MIB), None);
        // Above the MMIO hole the initrd still goes below 3 GiB.
        let a = initrd_address(8192 * MIB, 32 * MIB, MIB).unwrap();
        assert_eq!(a, MMIO_GAP_START - MIB);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let m = mem(128 * MIB);
        let cmdline = build_cmdline("console=ttyS0", "").unwrap();
        let initrd = Initrd {
            addr: 0x700_0000,
            size: 0x1234,
        };
        write_boot_params(&m, 128 * MIB, &linux64(), &cmdline, Some(initrd)).unwrap();
        let zp = read_zero_page(&m).unwrap();
        let hdr = zp.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x700_0000, 0x1234)
        );
        assert_eq!(zp.e820_entries, 2);
        let e1 = zp.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (HIMEM_START, 127 * MIB, 1)
        );
        let mut text = [0u8; 14];
        m.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_module() {
        let m = mem(64 * MIB);
        let kernel = LoadedKernel {
            entry: EntryMode::Pvh(GuestAddress(0x100_0000)),
            ..linux64()
        };
        let cmdline = build_cmdline("console=ttyS0", "").unwrap();
        let initrd = Initrd {
            addr: 0x300_0000,
            size: 0x10,
        };
        write_boot_params(&m, 64 * MIB, &kernel, &cmdline, Some(initrd)).unwrap();
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!((si.memmap_paddr, si.memmap_entries), (PVH_MEMMAP_START, 2));
        assert_eq!((si.nr_modules, si.modlist_paddr), (1, PVH_MODLIST_START));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x10));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (HIMEM_START, 63 * MIB, 1));
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let m = mem(64 * MIB);
        assert!(matches!(load_kernel(&m, &junk), Err(Error::NotAKernel(_))));
        assert!(matches!(
            load_kernel(&m, &dir.join("missing")),
            Err(Error::KernelFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Guest physical memory layout (x86_64) and the e820 map that describes it.

use vm_memory::GuestAddress;

/// Page size.
pub const PAGE_SIZE: u64 = 0x1000;
/// Boot GDT (four entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (one empty entry).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol "zero page" (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages = the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line the guest accepts (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the kernel is loaded ("high memory").
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (device registers, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// Identity-map page KVM needs below 4 GiB (one page), then the TSS (three).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// KVM's TSS.
pub const KVM_TSS_START: u64 = KVM_IDENTITY_MAP_START + PAGE_SIZE;

// Compile-time layout checks.
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + PAGE_SIZE);
const _: () = assert!(KVM_TSS_START + 3 * PAGE_SIZE <= MMIO_GAP_END);
const _: () = assert!(IOAPIC_START > MMIO_GAP_START && APIC_START > MMIO_GAP_START);

/// The RAM regions for `size` bytes of guest memory: below the MMIO hole,
/// and the rest above 4 GiB. Each is `(guest address, length, offset in the
/// backing file)`.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size, 0)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START, 0),
            (
                GuestAddress(MMIO_GAP_END),
                size - MMIO_GAP_START,
                MMIO_GAP_START,
            ),
        ]
    }
}

/// The unit in which memory is added to a running guest: Linux's memory
/// block on x86_64 (128 MiB below 64 GiB of boot RAM).
pub const HOTPLUG_BLOCK: u64 = 128 << 20;
/// Where the hot-pluggable memory starts is aligned to this (any memory
/// block size Linux picks for a guest, up to 2 GiB, divides it).
pub const HOTPLUG_ALIGN: u64 = 2 << 30;
/// The end of the guest physical addresses the VMM uses: 1 TiB, within the
/// 40 physical address bits of any x86_64 CPU that runs KVM guests.
pub const GUEST_PHYS_END: u64 = 1 << 40;

/// The start of the memory a guest of `size` bytes of boot RAM can add
/// later: above 4 GiB and above its RAM, aligned to [`HOTPLUG_ALIGN`].
pub fn hotplug_base(size: u64) -> u64 {
    let ram_end = match size.checked_sub(MMIO_GAP_START) {
        Some(high) if high > 0 => MMIO_GAP_END + high,
        _ => MMIO_GAP_END,
    };
    ram_end.div_ceil(HOTPLUG_ALIGN) * HOTPLUG_ALIGN
}

/// One e820 RAM range: `(start, length)`.
pub type E820Entry = (u64, u64);

/// The e820 RAM map for `size` bytes of guest memory: base memory below the
/// EBDA, then everything from 1 MiB on, with the MMIO hole left out.
pub fn e820_ram(size: u64) -> Vec<E820Entry> {
    let mut map = vec![(0, EBDA_START)];
    let low_end = size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START));
    }
    if size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, size - MMIO_GAP_START));
    }
    map
}

/// The highest address below the MMIO hole that holds RAM, plus one.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(256 * MIB),
            vec![(GuestAddress(0), 256 * MIB, 0)]
        );
        assert_eq!(
            e820_ram(256 * MIB),
            vec![(0, EBDA_START), (HIMEM_START, 255 * MIB)]
        );
        assert_eq!(low_ram_end(256 * MIB), 256 * MIB);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let size = 4096 * MIB;
        let regions = ram_regions(size);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START, 0),
                (GuestAddress(MMIO_GAP_END), 1024 * MIB, MMIO_GAP_START)
            ]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, size);
        assert_eq!(
            e820_ram(size),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START),
                (MMIO_GAP_END, 1024 * MIB)
            ]
        );
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }

    #[test]
    fn hot_pluggable_memory_starts_above_ram_and_4_gib() {
        assert_eq!(hotplug_base(256 * MIB), MMIO_GAP_END);
        assert_eq!(hotplug_base(MMIO_GAP_START), MMIO_GAP_END);
        // 4 GiB of RAM ends at 5 GiB (1 GiB above the hole).
        assert_eq!(hotplug_base(4096 * MIB), 6 << 30);
        assert_eq!(hotplug_base(5120 * MIB), 6 << 30);
        assert_eq!(hotplug_base(5120 * MIB + 1), 8 << 30);
        for size in [64 * MIB, 3 << 30, 7 << 30] {
            let base = hotplug_base(size);
            assert_eq!(base % HOTPLUG_ALIGN, 0);
            let end = ram_regions(size)
                .iter()
                .map(|(a, l, _)| a.0 + l)
                .max()
                .unwrap();
            assert!(base >= end && base >= MMIO_GAP_END, "{size:#x}");
        }
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 32),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (ZERO_PAGE_START, PAGE_SIZE),
            (PML4_START, PAGE_SIZE),
            (PDPTE_START, PAGE_SIZE),
            (PDE_START, PAGE_SIZE),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x?} overlaps {:#x?}",
                w[0],
                w[1]
            );
        }
    }
}

//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! finds its CPUs, the IOAPIC and the ISA interrupt routing.
//!
//! The floating pointer and the table go at the start of the EBDA, where
//! Linux scans for them.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};

/// Most vCPUs whose entries fit in the EBDA.
pub const MAX_CPUS: u8 = 32;
/// Legacy IRQ lines routed through the IOAPIC.
const IRQ_LINES: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP configuration table (header + entries) for `cpus` CPUs, to be
/// placed at `table_addr`, and the floating pointer that points at it.
pub fn build(cpus: u8, table_addr: u32) -> Result<(Vec<u8>, Vec<u8>), Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, conforming polarity and trigger.
    for irq in 0..IRQ_LINES {
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // ExtINT to LINT0 of the boot CPU, NMI to LINT1 of all CPUs.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SANDBXVM");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    Ok((mpf, table))
}

/// Writes the MP floating pointer and table for `cpus` CPUs at the EBDA.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let table_addr = EBDA_START + 16;
    let (mpf, table) = build(cpus, table_addr as u32)?;
    mem.write_slice(&mpf, GuestAddress(EBDA_START))
        .map_err(Error::Memory)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(Error::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_lengths_are_valid() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let (mpf, table) = build(cpus, 0x9fc10).unwrap();
            assert_eq!(mpf.len(), 16);
            assert_eq!(sum(&mpf), 0);
            assert_eq!(sum(&table), 0);
            assert_eq!(&mpf[..4], b"_MP_");
            assert_eq!(u32::from_le_bytes(mpf[4..8].try_into().unwrap()), 0x9fc10);
            assert_eq!(
                u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize,
                table.len()
            );
            // Everything fits between the EBDA start and 640 KiB.
            assert!(
                16 + table.len() <= 0x400,
                "{cpus} cpus: {} bytes",
                table.len()
            );
        }
    }

    #[test]
    fn lists_each_cpu_once_with_the_first_as_boot_cpu() {
        let (_, table) = build(3, 0).unwrap();
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(count as usize, 3 + 1 + 1 + IRQ_LINES as usize + 2);
        let cpus: Vec<&[u8]> = table[44..44 + 3 * 20].chunks(20).collect();
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu[0], 0, "entry type CPU");
            assert_eq!(cpu[1], i as u8, "APIC id");
        }
        assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(cpus[1][3], CPU_ENABLED);
        // The IOAPIC entry follows the bus entry.
        let ioapic = &table[44 + 60 + 8..44 + 60 + 16];
        assert_eq!(ioapic[..2], [2, 4]);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xfec0_0000
        );
    }

    #[test]
    fn rejects_zero_or_too_many_cpus() {
        assert!(matches!(build(0, 0), Err(Error::TooManyCpus(0))));
        assert!(matches!(build(MAX_CPUS + 1, 0), Err(Error::TooManyCpus(_))));
    }
}

//! vCPU register state at the kernel's entry point: the 64-bit Linux boot
//! protocol (long mode, identity-mapped first GiB, `rsi` = zero page) or PVH
//! (32-bit protected mode, paging off, `rbx` = start info).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{gdt_entry, segment};
use crate::layout::*;

/// Errors from setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU registers ({0}): {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot page tables or GDT: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol at this address.
    Linux64(GuestAddress),
    /// PVH (Xen HVM direct boot ABI) at this address.
    Pvh(GuestAddress),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Initial FPU state: x87 control word and MXCSR as after reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("fpu", e))
}

/// General registers at the entry point.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Linux64(entry) => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh(entry) => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// The boot GDT for `mode`: null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Linux64(_) => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        EntryMode::Pvh(_) => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

/// Writes the GDT/IDT (and, for the 64-bit entry, identity page tables for
/// the first GiB) into guest memory and returns `sregs` adjusted for `mode`.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, Error> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(Error::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(Error::Memory)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);

    match mode {
        EntryMode::Linux64(_) => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// PML4 -> PDPT -> PD with 512 2 MiB pages: identity map of the first GiB.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(Error::Memory)
    };
    write(PDPTE_START | 0x03, PML4_START)?;
    write(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Sets FPU, general and special registers of `vcpu` for entering the kernel.
pub fn setup(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), Error> {
    setup_fpu(vcpu)?;
    vcpu.set_regs(&boot_regs(mode))
        .map_err(|e| Error::Kvm("regs", e))?;
    let sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("sregs", e))?;
    let sregs = boot_sregs(mem, mode, sregs)?;
    vcpu.set_sregs(&sregs).map_err(|e| Error::Kvm("sregs", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn linux64_entry_is_long_mode_with_identity_paging() {
        let m = mem();
        let mode = EntryMode::Linux64(GuestAddress(0x100_0000));
        let sregs = boot_sregs(&m, mode, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 8));
        assert_eq!((sregs.ss.selector, sregs.tr.selector), (16, 24));
        assert_eq!(sregs.gdt.limit, 31);

        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let last: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, boot_gdt(mode)[1]);

        let regs = boot_regs(mode);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode_without_paging() {
        let m = mem();
        let mode = EntryMode::Pvh(GuestAddress(0x100_1000));
        let start = kvm_sregs {
            cr0: 0x6000_0010,
            efer: EFER_LME,
            ..Default::default()
        };
        let sregs = boot_sregs(&m, mode, start).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!(
            (sregs.cs.l, sregs.cs.db, sregs.cs.limit),
            (0, 1, 0xffff_ffff)
        );
        assert_eq!(sregs.tr.limit, 0x67);
        let regs = boot_regs(mode);
        assert_eq!((regs.rip, regs.rbx), (0x100_1000, PVH_INFO_START));
    }
}

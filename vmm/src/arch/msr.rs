//! Model-specific registers set before the first instruction.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Errors from setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM_SET_MSRS ioctl failed.
    #[error("cannot set MSRs: {0}")]
    Kvm(kvm_ioctls::Error),
    /// KVM accepted only some of them.
    #[error("KVM accepted {set} of {wanted} MSRs (rejected {rejected:#x})")]
    Partial {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
        /// The first one KVM refused.
        rejected: u32,
    },
}

/// The time stamp counter (also read by [`super::tsc`]).
pub(crate) const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The MSRs and their values at boot.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Sets [`boot_msrs`] on `vcpu`; every one must be accepted.
pub fn setup(vcpu: &VcpuFd) -> Result<(), Error> {
    set(vcpu, &boot_msrs())
}

/// Sets every `(index, value)` of `msrs` on `vcpu` (as many calls as
/// KVM's limit per call needs); every one must be accepted.
pub fn set(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), Error> {
    for wanted in msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).expect("a chunk fits a kvm_msrs");
        let set = vcpu.set_msrs(&list).map_err(Error::Kvm)?;
        if set != wanted.len() {
            return Err(Error::Partial {
                set,
                wanted: wanted.len(),
                rejected: wanted[set].0,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_are_unique_and_enable_wb_mtrrs() {
        let msrs = boot_msrs();
        let mut idx: Vec<u32> = msrs.iter().map(|m| m.0).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), msrs.len());
        let mtrr = msrs.iter().find(|m| m.0 == MSR_MTRR_DEF_TYPE).unwrap().1;
        assert_eq!(mtrr, 0x806);
    }
}

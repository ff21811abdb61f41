//! CPUID for each vCPU: what KVM supports, with topology and identity patched
//! so that the guest sees `cpus` single-threaded cores in one package, each
//! with its own APIC id.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors from building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports: {0}")]
    Supported(kvm_ioctls::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_AMD: u32 = 0x8000_001e;
const LEAF_ADDR_SIZES_AMD: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// The CPUID KVM supports on this host.
pub fn supported(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::Supported)
}

/// Bits needed to hold `n` distinct ids (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// Patches one entry for vCPU `cpu` of `cpus`.
pub fn patch_entry(entry: &mut kvm_cpuid_entry2, cpu: u8, cpus: u8, tsc_deadline: bool) {
    let (id, n) = (u32::from(cpu), u32::from(cpus));
    match entry.function {
        LEAF_FEATURES => {
            // EBX: APIC id [31:24], logical CPUs per package [23:16],
            // CLFLUSH line size in 8-byte units [15:8].
            entry.ebx = (id << 24) | (n << 16) | (8 << 8) | (entry.ebx & 0xff);
            entry.ecx |= ECX_HYPERVISOR;
            if tsc_deadline {
                entry.ecx |= ECX_TSC_DEADLINE;
            }
            if n > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: logical CPUs
            // sharing this cache - 1 (L3 shared by all, the rest per core).
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { n - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
        }
        LEAF_PMU => {
            // No virtual PMU.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY => {
            entry.edx = id; // x2APIC id
            match entry.index {
                0 => {
                    // SMT level: one thread per core.
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    // Core level: `cpus` cores.
                    entry.eax = id_bits(n);
                    entry.ebx = n;
                    entry.ecx = (2 << 8) | 1;
                }
                index => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = index & 0xff;
                }
            }
        }
        LEAF_ADDR_SIZES_AMD => {
            // ECX: APIC id size [15:12], cores - 1 [7:0].
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1);
        }
        LEAF_EXT_TOPOLOGY_AMD => {
            entry.eax = id; // extended APIC id
            entry.ebx = id & 0xff; // one thread per core, core id = cpu
            entry.ecx = 0; // one node
            entry.edx = 0;
        }
        _ => {}
    }
}

/// CPUID for vCPU `cpu` of `cpus`, derived from `base` (what KVM supports).
pub fn for_vcpu(base: &CpuId, cpu: u8, cpus: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, cpu, cpus, tsc_deadline);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn base() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0),
            entry(LEAF_FEATURES, 0),
            kvm_cpuid_entry2 {
                eax: (1 << 5) | 0x1, // L1 data cache
                ..entry(LEAF_CACHE, 0)
            },
            kvm_cpuid_entry2 {
                eax: (3 << 5) | 0x3, // L3 unified cache
                ..entry(LEAF_CACHE, 3)
            },
            entry(LEAF_PMU, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_ADDR_SIZES_AMD, 0),
            entry(0x4000_0000, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_cpu_count() {
        let b = base();
        for cpu in 0..4u8 {
            let c = for_vcpu(&b, cpu, 4, false);
            let f1 = find(&c, LEAF_FEATURES, 0);
            assert_eq!(f1.ebx >> 24, u32::from(cpu));
            assert_eq!((f1.ebx >> 16) & 0xff, 4);
            assert_eq!((f1.ebx >> 8) & 0xff, 8);
            assert_ne!(f1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(f1.edx & EDX_HTT, 0);
            assert_eq!(find(&c, LEAF_TOPOLOGY, 0).edx, u32::from(cpu));
            assert_eq!(find(&c, LEAF_TOPOLOGY, 1).edx, u32::from(cpu));
        }
    }

    #[test]
    fn topology_describes_single_thread_cores() {
        let c = for_vcpu(&base(), 0, 3, false);
        let smt = find(&c, LEAF_TOPOLOGY, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 1 << 8));
        let core = find(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.ecx), (2, 3, (2 << 8) | 1));
        let beyond = find(&c, LEAF_TOPOLOGY, 2);
        assert_eq!((beyond.eax, beyond.ebx, beyond.ecx), (0, 0, 2));
        let l1 = find(&c, LEAF_CACHE, 0);
        assert_eq!(l1.eax >> 26, 2);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        let l3 = find(&c, LEAF_CACHE, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        assert_eq!(find(&c, LEAF_ADDR_SIZES_AMD, 0).ecx & 0xff, 2);
    }

    #[test]
    fn single_cpu_has_no_htt_and_pmu_is_hidden() {
        let c = for_vcpu(&base(), 0, 1, true);
        let f1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(f1.edx & EDX_HTT, 0);
        assert_ne!(f1.ecx & ECX_TSC_DEADLINE, 0);
        let pmu = find(&c, LEAF_PMU, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        // KVM's hypervisor leaves pass through untouched.
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0xffff_ffff);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}

//! The KVM virtual machine: guest memory slots, in-kernel IRQ chip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};

/// Errors from creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("cannot set up the KVM virtual machine ({0}): {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The host cannot run this many vCPUs.
    #[error("{wanted} vCPUs asked for, but this host's KVM allows {max}")]
    TooManyVcpus {
        /// Asked for.
        wanted: u8,
        /// KVM's limit.
        max: usize,
    },
}

/// Creates the VM, registers every guest memory region as a slot and
/// creates the in-kernel IOAPIC/PIC/LAPIC and PIT.
pub fn create(kvm: &Kvm, mem: &GuestMemoryMmap, vcpus: u8) -> Result<VmFd, Error> {
    // KVM_CAP_NR_VCPUS is only the recommended count (the host CPUs); overcommit
    // up to KVM_CAP_MAX_VCPUS is allowed and works, as on a one-CPU CI host.
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(Error::TooManyVcpus { wanted: vcpus, max });
    }
    let vm = kvm.create_vm().map_err(|e| Error::Kvm("create VM", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(|e| Error::Kvm("identity map", e))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(|e| Error::Kvm("TSS", e))?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `mem`, which the VMM keeps alive (and mapped) for as long as the VM.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| Error::Kvm("memory slot", e))?;
    }
    vm.create_irq_chip()
        .map_err(|e| Error::Kvm("IRQ chip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(|e| Error::Kvm("PIT", e))?;
    Ok(vm)
}

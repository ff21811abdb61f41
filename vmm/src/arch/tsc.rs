//! A vCPU's time stamp counter: KVM must run it before the guest boots.
//!
//! A host kernel can hand a new vCPU a TSC that does not advance. Linux 6.1
//! (`arch/x86/kvm/x86.c`, `set_tsc_khz`) does it when the TSC frequency KVM
//! took at load (`kvm_amd`/`kvm_intel` loaded before the host's final TSC
//! calibration, on a CPU without a constant TSC) is more than 250 ppm below
//! the host's current one and the CPU cannot scale TSCs: it logs "user
//! requested TSC rate below hardware speed" and leaves the vCPU's TSC
//! multiplier at zero. KVM then reads the guest's TSC as a constant, so
//! every TSC-deadline timer the guest sets fires only after about the host's
//! uptime: the guest's timers stall ("rcu_sched kthread timer wakeup didn't
//! happen ... timer-softirq=1"), for every VMM. Nested CI hosts under QEMU
//! TCG met it at boot (issue 9).
//!
//! So each vCPU's TSC is read twice as the VMM sees it (KVM_GET_MSRS); if it
//! stood still, the vCPU is given the host's own TSC frequency
//! (`KVM_SET_TSC_KHZ` with 0), which writes the multiplier, and checked
//! again. It runs before the boot MSRs (whose TSC write of 0 then starts the
//! guest's TSC at 0 with the right multiplier).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::msr::MSR_IA32_TSC;

/// What to do about a host KVM that freezes vCPU TSCs.
const REMEDY: &str = "reload the KVM module (modprobe -r kvm_amd kvm_intel; modprobe kvm_amd or \
                      kvm_intel) once the host's TSC calibration is final";

/// Errors from checking a vCPU's TSC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TSC could not be read.
    #[error("cannot read the vCPU's TSC: {0}")]
    Read(kvm_ioctls::Error),
    /// It stood still and KVM refused the host's frequency.
    #[error(
        "the host's KVM gives vCPUs a TSC that does not advance (dmesg: \"user requested TSC \
         rate below hardware speed\") and refused to reset its frequency ({0}): guest timers \
         would stall; {REMEDY}"
    )]
    Reset(kvm_ioctls::Error),
    /// It stood still, and still does after the reset.
    #[error(
        "the host's KVM gives vCPUs a TSC that does not advance (dmesg: \"user requested TSC \
         rate below hardware speed\"), also at the host's own frequency: guest timers would \
         stall; {REMEDY}"
    )]
    StillFrozen,
}

/// What [`ensure_running`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscCheck {
    /// The TSC advanced: nothing done.
    Running,
    /// It stood still at KVM's frequency `was_khz`; it runs at the host's
    /// `now_khz` now.
    Repaired {
        /// The frequency KVM gave the vCPU.
        was_khz: u32,
        /// The host's, which it has now.
        now_khz: u32,
    },
}

impl TscCheck {
    /// What a repair says (the VMM's warning, `sandboxvm check`'s line):
    /// `None` when nothing was repaired.
    pub fn warning(&self) -> Option<String> {
        match *self {
            TscCheck::Running => None,
            TscCheck::Repaired { was_khz, now_khz } => Some(format!(
                "the host's KVM gives new vCPUs a TSC that does not advance (it took the TSC \
                 frequency, {was_khz} kHz, before the host's final calibration, {now_khz} kHz): \
                 sandboxvm sets each vCPU to the host's rate, other VMMs' guests stall; {REMEDY}"
            )),
        }
    }
}

/// Reads the vCPU's TSC as the VMM sees it (the guest's, before offsets of
/// a nested guest).
fn read(vcpu: &VcpuFd) -> Result<u64, Error> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .expect("one MSR fits a kvm_msrs");
    let n = vcpu.get_msrs(&mut msrs).map_err(Error::Read)?;
    if n != 1 {
        return Err(Error::Read(kvm_ioctls::Error::new(libc::EINVAL)));
    }
    Ok(msrs.as_slice()[0].data)
}

/// Whether two successive reads show a TSC that runs. Between two ioctls a
/// running TSC moves by thousands of cycles; a stalled one not at all. A
/// TSC that went backwards is not this bug (and not ours to judge).
fn moved(first: u64, second: u64) -> bool {
    second != first
}

/// Checks that KVM runs `vcpu`'s TSC and repairs it if it does not (see the
/// module's text).
pub fn ensure_running(vcpu: &VcpuFd) -> Result<TscCheck, Error> {
    let first = read(vcpu)?;
    if moved(first, read(vcpu)?) {
        return Ok(TscCheck::Running);
    }
    let was_khz = vcpu.get_tsc_khz().unwrap_or(0);
    vcpu.set_tsc_khz(0).map_err(Error::Reset)?;
    let first = read(vcpu)?;
    if !moved(first, read(vcpu)?) {
        return Err(Error::StillFrozen);
    }
    let now_khz = vcpu.get_tsc_khz().unwrap_or(0);
    Ok(TscCheck::Repaired { was_khz, now_khz })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tsc_that_did_not_move_is_frozen_and_one_that_moved_either_way_runs() {
        assert!(!moved(5, 5));
        assert!(!moved(0, 0));
        assert!(moved(5, 6));
        assert!(moved(6, 5));
    }

    #[test]
    fn only_a_repair_warns_and_the_warning_names_both_rates_and_the_remedy() {
        assert_eq!(TscCheck::Running.warning(), None);
        let w = TscCheck::Repaired {
            was_khz: 2593500,
            now_khz: 2596107,
        }
        .warning()
        .unwrap();
        assert!(w.contains("TSC that does not advance"), "{w}");
        assert!(
            w.contains("2593500 kHz") && w.contains("2596107 kHz"),
            "{w}"
        );
        assert!(
            w.ends_with("once the host's TSC calibration is final"),
            "{w}"
        );
        assert!(Error::StillFrozen
            .to_string()
            .contains("modprobe -r kvm_amd"));
    }
}

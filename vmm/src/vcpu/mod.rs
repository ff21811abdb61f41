//! A virtual CPU: created, configured for the kernel's entry, then run on
//! its own thread until the guest or the VMM stops it.
//!
//! State machine: `Created` --configure--> `Configured` --start--> running on
//! a thread --> stopped with a [`VcpuStop`] reported to the VMM. Stopping is
//! cooperative: the VMM sets the shared stop flag and kicks the thread with a
//! signal, which interrupts KVM_RUN.

mod exit;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

pub use exit::{handle_exit, VcpuAction, VcpuStop};

use crate::arch::{msr, regs, tsc};

/// Errors from creating, configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    /// Setting CPUID failed.
    #[error("cannot set CPUID on vCPU {0}: {1}")]
    Cpuid(u8, kvm_ioctls::Error),
    /// Setting MSRs failed.
    #[error("vCPU {0}: {1}")]
    Msr(u8, msr::Error),
    /// KVM does not run its TSC.
    #[error("vCPU {0}: {1}")]
    Tsc(u8, tsc::Error),
    /// Setting registers failed.
    #[error("vCPU {0}: {1}")]
    Regs(u8, regs::Error),
    /// Setting up the local APIC failed.
    #[error("cannot set up the local APIC of vCPU {0}: {1}")]
    Lapic(u8, kvm_ioctls::Error),
    /// The vCPU is not in the state the operation needs.
    #[error("vCPU {id} is {state:?}, not {wanted:?}")]
    State {
        /// The vCPU.
        id: u8,
        /// Its state.
        state: VcpuState,
        /// The state needed.
        wanted: VcpuState,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A template's state was refused.
    #[error("cannot restore vCPU {0}: {1}")]
    Restore(u8, crate::snapshot::Error),
    /// The thread could not be spawned.
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
}

/// Where a vCPU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Created in KVM, registers untouched.
    Created,
    /// Ready to enter the guest.
    Configured,
}

/// Shared between the VMM and the vCPU threads.
#[derive(Default)]
pub struct VcpuControl {
    stop: AtomicBool,
}

impl VcpuControl {
    /// Asks every vCPU to stop at its next exit (see [`VcpuHandle::stop`]).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A vCPU that has not started running yet.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    state: VcpuState,
}

/// LAPIC local vector table entries and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, Error> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Create(id, e))?;
        Ok(Vcpu {
            id,
            fd,
            state: VcpuState::Created,
        })
    }

    /// The vCPU's index (and APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The state it is in.
    pub fn state(&self) -> VcpuState {
        self.state
    }

    /// The KVM file descriptor (for tests that set up special guests).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets CPUID, MSRs and the local APIC: everything but the registers.
    pub fn configure_platform(&mut self, cpuid: &CpuId) -> Result<(), Error> {
        self.expect_state(VcpuState::Created)?;
        let id = self.id;
        self.fd.set_cpuid2(cpuid).map_err(|e| Error::Cpuid(id, e))?;
        // Before the boot MSRs: their TSC write must meet the right multiplier.
        let check = tsc::ensure_running(&self.fd).map_err(|e| Error::Tsc(id, e))?;
        if let Some(warning) = check.warning() {
            static ONCE: Once = Once::new();
            ONCE.call_once(|| log::warn!("vCPU {id}: {warning}"));
        }
        msr::setup(&self.fd).map_err(|e| Error::Msr(id, e))?;
        let mut lapic = self.fd.get_lapic().map_err(|e| Error::Lapic(id, e))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
                .iter()
                .map(|b| *b as u8)
                .collect();
            let reg = u32::from_le_bytes(bytes.try_into().expect("four bytes"));
            let new = set_delivery_mode(reg, mode).to_le_bytes();
            for (dst, src) in lapic.regs[offset..offset + 4].iter_mut().zip(new) {
                *dst = src as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(|e| Error::Lapic(id, e))?;
        Ok(())
    }

    /// Configures the vCPU to enter the kernel (CPUID, MSRs, LAPIC, registers).
    pub fn configure(
        &mut self,
        mem: &GuestMemoryMmap,
        cpuid: &CpuId,
        entry: regs::EntryMode,
    ) -> Result<(), Error> {
        self.configure_platform(cpuid)?;
        regs::setup(&self.fd, mem, entry).map_err(|e| Error::Regs(self.id, e))?;
        self.state = VcpuState::Configured;
        Ok(())
    }

    /// Configures the vCPU as a template saved it: CPUID and the platform
    /// as for a boot, then every register, MSR and event of `saved`.
    pub fn restore(
        &mut self,
        cpuid: &CpuId,
        saved: &crate::snapshot::VcpuSnapshot,
    ) -> Result<(), Error> {
        self.configure_platform(cpuid)?;
        crate::snapshot::restore_vcpu(&self.fd, saved).map_err(|e| Error::Restore(self.id, e))?;
        self.state = VcpuState::Configured;
        Ok(())
    }

    /// Saves a stopped vCPU's state (see [`crate::snapshot::save_vcpu`]).
    pub fn save(
        &mut self,
        msr_list: &[u32],
    ) -> Result<crate::snapshot::VcpuSnapshot, crate::snapshot::Error> {
        crate::snapshot::save_vcpu(&mut self.fd, msr_list)
    }

    /// Marks a vCPU whose registers a test set by hand as ready to run.
    #[cfg(test)]
    pub(crate) fn mark_configured(&mut self) {
        self.state = VcpuState::Configured;
    }

    fn expect_state(&self, wanted: VcpuState) -> Result<(), Error> {
        if self.state == wanted {
            Ok(())
        } else {
            Err(Error::State {
                id: self.id,
                state: self.state,
                wanted,
            })
        }
    }

    /// Starts running the guest on a new thread. When the vCPU stops it sends
    /// its id and reason on `report` and signals `wake`.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Arc<VcpuControl>,
        report: Sender<(u8, VcpuStop)>,
        wake: EventFd,
    ) -> Result<VcpuHandle, Error> {
        self.expect_state(VcpuState::Configured)?;
        install_kick_handler()?;
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut vcpu = self;
                let stop = vcpu.run(&pio, &mmio, &control);
                log::debug!("vCPU {id} stopped: {stop}");
                let _ = report.send((id, stop));
                let _ = wake.write(1);
                vcpu
            })
            .map_err(|e| Error::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
        })
    }

    /// The run loop: enter the guest, handle the exit, until something stops it.
    fn run(&mut self, pio: &Bus, mmio: &Bus, control: &VcpuControl) -> VcpuStop {
        loop {
            if control.stop_requested() {
                return VcpuStop::Requested;
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let VcpuAction::Stop(stop) = handle_exit(exit, pio, mmio) {
                        return stop;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or the run was interrupted): check the stop flag.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return VcpuStop::KvmError(e.to_string()),
            }
        }
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    thread: Option<JoinHandle<Vcpu>>,
}

impl VcpuHandle {
    /// Stops the thread (the caller has called [`VcpuControl::request_stop`])
    /// and waits for it, kicking it out of KVM_RUN until it is gone. The
    /// vCPU comes back (to be saved in a template), unless its thread
    /// panicked.
    pub fn stop(&mut self) -> Option<Vcpu> {
        let thread = self.thread.take()?;
        while !thread.is_finished() {
            if let Err(e) = thread.kill(kick_signal()) {
                log::debug!("cannot kick vCPU {}: {e}", self.id);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match thread.join() {
            Ok(vcpu) => Some(vcpu),
            Err(_) => {
                log::error!("vCPU {} thread panicked", self.id);
                None
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only interrupts KVM_RUN with EINTR.
}

fn install_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(Error::Signal);
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }
}

//! What to do with each kind of vCPU exit. A free function, so every exit
//! kind is unit tested without KVM.

use devices::Bus;
use kvm_ioctls::VcpuExit;

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked it to stop.
    Requested,
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault,
    /// The guest executed HLT with nothing that can wake it.
    Halted,
    /// The guest asked KVM to power off.
    SystemShutdown,
    /// The guest asked KVM to reset.
    SystemReset,
    /// The guest reported a crash to KVM.
    SystemCrash,
    /// KVM could not enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// The physical CPU.
        cpu: u32,
    },
    /// KVM hit an internal error (e.g. it could not emulate an instruction).
    InternalError,
    /// An exit the VMM does not handle.
    Unexpected(String),
    /// The KVM_RUN ioctl failed.
    KvmError(String),
}

impl VcpuStop {
    /// Whether this is an orderly end of the guest (reset or power-off) rather
    /// than a failure.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            VcpuStop::Requested | VcpuStop::SystemShutdown | VcpuStop::SystemReset
        )
    }
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::Requested => write!(f, "stopped by the VMM"),
            VcpuStop::TripleFault => write!(f, "guest triple fault (CPU reset)"),
            VcpuStop::Halted => write!(f, "guest halted its CPU for good"),
            VcpuStop::SystemShutdown => write!(f, "guest powered off"),
            VcpuStop::SystemReset => write!(f, "guest reset"),
            VcpuStop::SystemCrash => write!(f, "guest reported a crash"),
            VcpuStop::FailEntry { reason, cpu } => {
                write!(
                    f,
                    "KVM could not enter the guest (reason {reason:#x} on CPU {cpu})"
                )
            }
            VcpuStop::InternalError => write!(
                f,
                "KVM internal error (often an instruction KVM cannot emulate)"
            ),
            VcpuStop::Unexpected(what) => write!(f, "unexpected vCPU exit: {what}"),
            VcpuStop::KvmError(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

/// The outcome of handling one exit.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuAction {
    /// Run the guest again.
    Continue,
    /// Stop this vCPU.
    Stop(VcpuStop),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Handles one exit: port I/O and MMIO go to the buses (reads of unclaimed
/// addresses return all ones, as on a real bus); the rest stops the vCPU with
/// a reason.
pub fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> VcpuAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            VcpuAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                log::trace!("unclaimed port write {port:#x} {data:x?}");
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                log::debug!("unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                log::debug!("unclaimed MMIO write at {addr:#x}");
            }
            VcpuAction::Continue
        }
        VcpuExit::Hlt => VcpuAction::Stop(VcpuStop::Halted),
        VcpuExit::Shutdown => VcpuAction::Stop(VcpuStop::TripleFault),
        VcpuExit::SystemEvent(kind, _) => VcpuAction::Stop(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::SystemShutdown,
            KVM_SYSTEM_EVENT_RESET => VcpuStop::SystemReset,
            KVM_SYSTEM_EVENT_CRASH => VcpuStop::SystemCrash,
            other => VcpuStop::Unexpected(format!("system event {other}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => VcpuAction::Stop(VcpuStop::FailEntry { reason, cpu }),
        VcpuExit::InternalError => VcpuAction::Stop(VcpuStop::InternalError),
        // Interrupt-window and similar exits need nothing from us.
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => VcpuAction::Continue,
        other => VcpuAction::Stop(VcpuStop::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Reg {
        value: u8,
    }
    impl BusDevice for Reg {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.value);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.value = data[0];
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Reg>>, Arc<Mutex<Reg>>) {
        let (p, m) = (
            Arc::new(Mutex::new(Reg::default())),
            Arc::new(Mutex::new(Reg::default())),
        );
        let mut pio = Bus::new();
        pio.insert(p.clone(), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(m.clone(), 0xd000_0000, 0x1000).unwrap();
        (pio, mmio, p, m)
    }

    #[test]
    fn port_io_goes_to_the_pio_bus() {
        let (pio, mmio, p, _) = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f9, &[0x42]), &pio, &mmio),
            VcpuAction::Continue
        );
        assert_eq!(p.lock().unwrap().value, 0x42);
        let mut data = [0u8];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f8, &mut data), &pio, &mmio),
            VcpuAction::Continue
        );
        assert_eq!(data, [0x42]);
    }

    #[test]
    fn unclaimed_port_reads_float_high() {
        let (pio, mmio, _, _) = buses();
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x2f8, &mut data), &pio, &mmio);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x80, &[1]), &pio, &mmio),
            VcpuAction::Continue
        );
    }

    #[test]
    fn mmio_goes_to_the_mmio_bus() {
        let (pio, mmio, _, m) = buses();
        handle_exit(VcpuExit::MmioWrite(0xd000_0010, &[7, 0, 0, 0]), &pio, &mmio);
        assert_eq!(m.lock().unwrap().value, 7);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0ffc, &mut data), &pio, &mmio);
        assert_eq!(data, [7; 4]);
        handle_exit(VcpuExit::MmioRead(0xe000_0000, &mut data), &pio, &mmio);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn hlt_stops_as_halted() {
        let (pio, mmio, _, _) = buses();
        assert_eq!(
            handle_exit(VcpuExit::Hlt, &pio, &mmio),
            VcpuAction::Stop(VcpuStop::Halted)
        );
    }

    #[test]
    fn shutdown_is_a_triple_fault() {
        let (pio, mmio, _, _) = buses();
        let action = handle_exit(VcpuExit::Shutdown, &pio, &mmio);
        assert_eq!(action, VcpuAction::Stop(VcpuStop::TripleFault));
        assert!(!VcpuStop::TripleFault.is_clean());
    }

    #[test]
    fn system_events_map_to_clean_or_failed_stops() {
        let (pio, mmio, _, _) = buses();
        let stop = |kind| match handle_exit(VcpuExit::SystemEvent(kind, &[]), &pio, &mmio) {
            VcpuAction::Stop(s) => s,
            other => panic!("{other:?}"),
        };
        assert!(stop(1).is_clean() && stop(2).is_clean());
        assert_eq!(stop(3), VcpuStop::SystemCrash);
        assert!(!stop(3).is_clean());
        assert!(matches!(stop(9), VcpuStop::Unexpected(_)));
    }

    #[test]
    fn entry_failures_and_internal_errors_stop() {
        let (pio, mmio, _, _) = buses();
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x21, 1), &pio, &mmio),
            VcpuAction::Stop(VcpuStop::FailEntry {
                reason: 0x21,
                cpu: 1
            })
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &pio, &mmio),
            VcpuAction::Stop(VcpuStop::InternalError)
        );
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &pio, &mmio),
            VcpuAction::Stop(VcpuStop::Unexpected(_))
        ));
        assert_eq!(
            handle_exit(VcpuExit::IrqWindowOpen, &pio, &mmio),
            VcpuAction::Continue
        );
    }
}

//! The VMM on real KVM with tiny real-mode guests: the run loop, port I/O,
//! MMIO exits, the console's panic watch and how the VM ends. These run on
//! any host with /dev/kvm, PVM included (real-mode code runs there).
//!
//! A triple fault is not among them: PVM restarts such a guest instead of
//! reporting KVM_EXIT_SHUTDOWN, so that exit is covered by the unit tests of
//! `vcpu::exit` only.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::{Bus, BusDevice};
use kvm_bindings::CpuId;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vcpu::{self, Vcpu};
use crate::{Console, Error, GuestExit, Payload, Vmm, VmmConfig};

/// Guest code is loaded here and entered in real mode with CS = 0.
const CODE_START: u64 = 0x1000;
/// The data segment of the test guests starts here, so that real-mode
/// `mov [offset], al` reaches the MMIO test device.
const TEST_MMIO_BASE: u64 = 0xd000_0000;

/// A vCPU in real mode at `CODE_START`, DS based at `TEST_MMIO_BASE`.
pub(crate) fn real_mode_vcpu(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    cpuid: &CpuId,
    code: &[u8],
) -> Result<Vcpu, crate::Error> {
    mem.write_slice(code, GuestAddress(CODE_START))
        .map_err(|e| crate::Error::Config(e.to_string()))?;
    let mut vcpu = Vcpu::new(vm, 0)?;
    vcpu.configure_platform(cpuid)?;
    let kvm = |e: kvm_ioctls::Error| vcpu::Error::Create(0, e);
    let mut sregs = vcpu.fd().get_sregs().map_err(kvm)?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = TEST_MMIO_BASE;
    sregs.ds.selector = 0;
    vcpu.fd().set_sregs(&sregs).map_err(kvm)?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_START,
        rflags: 2,
        ..Default::default()
    };
    vcpu.fd().set_regs(&regs).map_err(kvm)?;
    vcpu.mark_configured();
    Ok(vcpu)
}

/// Tiny 16-bit assembler for the test guests.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    /// Prints `text` on COM1.
    fn print(mut self, text: &[u8]) -> Self {
        self.0.extend_from_slice(&[0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        for &c in text {
            self.0.extend_from_slice(&[0xb0, c, 0xee]); // mov al, c; out dx, al
        }
        self
    }
    /// `in al, port` then prints AL on COM1.
    fn echo_port(mut self, port: u8) -> Self {
        self.0.extend_from_slice(&[0xe4, port]); // in al, port
        self.0.extend_from_slice(&[0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
        self
    }
    /// Writes `value` to the MMIO test device at `offset`, reads it back
    /// from `offset + 1` and prints it.
    fn mmio_round_trip(mut self, offset: u16, value: u8) -> Self {
        let [lo, hi] = offset.to_le_bytes();
        let [lo1, hi1] = (offset + 1).to_le_bytes();
        self.0.extend_from_slice(&[0xb0, value, 0xa2, lo, hi]); // mov al, v; mov [off], al
        self.0.extend_from_slice(&[0xa0, lo1, hi1]); // mov al, [off+1]
        self.0.extend_from_slice(&[0xba, 0xf8, 0x03, 0xee]);
        self
    }
    /// Resets the machine through the i8042 (as Linux's `reboot=k`).
    fn reset(mut self) -> Self {
        self.0.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
        self.0.extend_from_slice(&[0xeb, 0xfe]); // jmp $
        self
    }
}

fn console_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "sandboxvm-kvmtest-{}-{name}.log",
        std::process::id()
    ))
}

/// Builds and runs a VM with `code`; returns the outcome and the console.
fn run_guest(name: &str, code: &[u8], mmio: Option<Bus>) -> (Result<GuestExit, Error>, Vec<u8>) {
    let log = console_path(name);
    let mut config = VmmConfig::new("unused");
    config.memory_mib = 16;
    config.console = Console::File(log.clone());
    let mut vmm = Vmm::build(&config, Payload::RealMode(code)).expect("build VM");
    if let Some(bus) = mmio {
        vmm.mmio = Arc::new(bus);
    }
    let result = vmm.run();
    let console = std::fs::read(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (result, console)
}

/// Skips (loudly) where there is no /dev/kvm at all.
fn have_kvm() -> bool {
    let ok = std::path::Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("no /dev/kvm: KVM test skipped");
    }
    ok
}

#[test]
fn serial_output_then_i8042_reset_is_a_clean_reboot() {
    if !have_kvm() {
        return;
    }
    let code = Asm::default().print(b"hello from the guest\n").reset();
    let (result, console) = run_guest("reset", &code.0, None);
    assert_eq!(result.unwrap(), GuestExit::Reboot);
    assert_eq!(console, b"hello from the guest\n");
}

#[test]
fn a_new_vcpus_tsc_runs_on_this_host_and_stays_running_after_a_reset_to_the_hosts_rate() {
    if !have_kvm() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create a VM");
    let vcpu = Vcpu::new(&vm, 0).expect("create a vCPU");
    // A healthy host: nothing to repair.
    assert_eq!(
        crate::arch::tsc::ensure_running(vcpu.fd()).unwrap(),
        crate::arch::tsc::TscCheck::Running
    );
    assert_eq!(
        crate::host::tsc_trouble(),
        None,
        "sandboxvm check would warn"
    );
    // The repair itself (the host's own rate) keeps a running TSC running.
    vcpu.fd().set_tsc_khz(0).expect("KVM_SET_TSC_KHZ 0");
    assert_eq!(
        crate::arch::tsc::ensure_running(vcpu.fd()).unwrap(),
        crate::arch::tsc::TscCheck::Running
    );
}

#[test]
fn unclaimed_ports_read_as_all_ones() {
    if !have_kvm() {
        return;
    }
    let code = Asm::default().echo_port(0x70).echo_port(0x64).reset();
    let (result, console) = run_guest("ports", &code.0, None);
    assert_eq!(result.unwrap(), GuestExit::Reboot);
    // 0x70 (CMOS) is nobody's: 0xff. 0x64 is the i8042 status: 0.
    assert_eq!(console, [0xff, 0x00]);
}

/// An MMIO test device: a byte register at offset 0 that reads back (at
/// offset 1) incremented.
struct Incrementer(u8);
impl BusDevice for Incrementer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(if offset == 1 {
            self.0.wrapping_add(1)
        } else {
            0
        });
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.0 = data[0];
        }
    }
}

#[test]
fn mmio_exits_reach_the_device_on_the_mmio_bus() {
    if !have_kvm() {
        return;
    }
    let dev = Arc::new(Mutex::new(Incrementer(0)));
    let mut bus = Bus::new();
    bus.insert(dev.clone(), TEST_MMIO_BASE + 0x100, 0x10)
        .unwrap();
    let code = Asm::default().mmio_round_trip(0x100, b'A').reset();
    let (result, console) = run_guest("mmio", &code.0, Some(bus));
    assert_eq!(result.unwrap(), GuestExit::Reboot);
    assert_eq!(dev.lock().unwrap().0, b'A');
    assert_eq!(console, b"B");
}

#[test]
fn a_kernel_panic_on_the_console_fails_the_vm_even_though_it_reboots() {
    if !have_kvm() {
        return;
    }
    let code = Asm::default()
        .print(b"Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n")
        .reset();
    let (result, _) = run_guest("panic", &code.0, None);
    let err = result.unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest kernel panic: Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
    );
}

#[test]
fn a_power_off_on_the_console_ends_a_spinning_guest_cleanly() {
    if !have_kvm() {
        return;
    }
    // The guest announces its power-off, then spins forever (as a kernel
    // without a power-off device halts): the VMM must end it.
    let mut code = Asm::default().print(b"[    1.0] reboot: Power down\r\n");
    code.0.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    let (result, _) = run_guest("poweroff", &code.0, None);
    assert_eq!(result.unwrap(), GuestExit::PowerOff);
}

#[test]
fn standard_kernels_are_refused_on_a_pvm_host() {
    if crate::host::detect() != crate::HostKvm::Pvm {
        eprintln!("not a PVM host: nothing to check");
        return;
    }
    let err = Vmm::try_from(VmmConfig::new("/nonexistent/vmlinux"))
        .err()
        .unwrap();
    assert!(
        err.to_string().starts_with("KVM here is PVM (kvm_pvm"),
        "{err}"
    );
}

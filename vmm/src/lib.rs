//! sandboxvm's virtual machine monitor.
//!
//! [`Vmm::try_from`] a [`VmmConfig`] builds the VM (memfd-backed memory, KVM
//! VM with in-kernel IRQ chip and PIT, the legacy devices, the kernel loaded
//! and every vCPU at its entry point); [`Vmm::run`] runs it until the guest
//! reboots, powers off or fails.

pub mod arch;
pub mod boot;
pub mod config;
pub mod confine;
pub mod console_file;
mod event_loop;
pub mod host;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod vcpu;
pub mod virtio;
pub mod vm;

#[cfg(test)]
mod kvm_tests;

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use devices::legacy::{ConsoleEvents, ConsoleWatch, Serial, I8042};
use devices::{Bus, EventFdTrigger};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use config::{BootSource, Console, FsConfig, NetConfig, VmmConfig, VsockConfig};
use event_loop::Ending;
pub use host::HostKvm;
use vcpu::{Vcpu, VcpuControl, VcpuStop};

/// COM1.
const SERIAL_PORT: u64 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
/// i8042 data port; the command port is at +4.
const I8042_PORT: u64 = 0x60;

/// Errors from building or running a VM. The message of each is one line;
/// `main` prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is not usable.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    /// The host cannot boot this guest.
    #[error("{0}")]
    Host(HostKvm),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// The KVM VM.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// Loading the kernel, initramfs or boot data.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] arch::mptable::Error),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] arch::cpuid::Error),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// A virtio device.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// Placing a device on a bus.
    #[error("cannot place a device: {0}")]
    Bus(#[from] devices::BusError),
    /// An eventfd or the irqfd of a device.
    #[error("cannot set up device interrupts or events: {0}")]
    Events(String),
    /// The console log file.
    #[error("cannot open console log {path}: {source}")]
    ConsoleFile {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop failed: {0}")]
    EventLoop(String),
    /// The guest kernel panicked.
    #[error("guest kernel panic: {0}")]
    GuestPanic(String),
    /// A vCPU stopped with an error.
    #[error("vCPU {id}: {stop}")]
    GuestFailed {
        /// The vCPU.
        id: u8,
        /// What happened.
        stop: VcpuStop,
    },
}

/// How a guest ended cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest rebooted (a micro-VM ends on reboot).
    Reboot,
    /// The guest powered off.
    PowerOff,
}

/// A VM ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    _vm: VmFd,
    _kvm: Kvm,
    _ram: memory::GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    reset_evt: EventFd,
    power_off_evt: EventFd,
    console: ConsoleEvents,
    created: Instant,
}

/// What the VM is built to boot: a Linux kernel, or (in tests) raw real-mode
/// code.
enum Payload<'a> {
    Kernel(&'a BootSource),
    #[cfg(test)]
    RealMode(&'a [u8]),
}

impl TryFrom<VmmConfig> for Vmm {
    type Error = Error;

    fn try_from(config: VmmConfig) -> Result<Self, Error> {
        if !config.pvm_guest {
            match host::detect() {
                HostKvm::Pvm => return Err(Error::Host(HostKvm::Pvm)),
                missing @ HostKvm::Missing(_) => return Err(Error::Host(missing)),
                HostKvm::Unknown => log::warn!("{}", HostKvm::Unknown),
                HostKvm::Hardware { .. } => {}
            }
        }
        Vmm::build(&config, Payload::Kernel(&config.boot))
    }
}

impl Vmm {
    fn build(config: &VmmConfig, payload: Payload<'_>) -> Result<Self, Error> {
        let created = Instant::now();
        if config.vcpus == 0 || config.vcpus > arch::mptable::MAX_CPUS {
            return Err(Error::Config(format!(
                "{} vCPUs (1 to {} supported)",
                config.vcpus,
                arch::mptable::MAX_CPUS
            )));
        }
        // vCPUs beyond the boot ones are created offline.
        let all_vcpus = config.max_vcpus.max(config.vcpus);
        if all_vcpus > arch::mptable::MAX_CPUS {
            return Err(Error::Config(format!(
                "{all_vcpus} vCPUs in all (at most {} supported)",
                arch::mptable::MAX_CPUS
            )));
        }
        // How long each part of the build took, for the "VM ready" line.
        let mut phases: Vec<(&str, u128)> = Vec::new();
        let mut since = Instant::now();
        let mut phase = |name| {
            phases.push((name, since.elapsed().as_millis()));
            since = Instant::now();
        };
        let ram = memory::create(config.memory_mib, config.hotplug_mib)?;
        let kvm = Kvm::new().map_err(vm::Error::OpenKvm)?;
        let vm = vm::create(&kvm, &ram.memory, all_vcpus)?;
        phase("memory and VM");

        let events_err = |e: std::io::Error| Error::Events(e.to_string());
        let power_off_evt = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        let console_events = ConsoleEvents::new(power_off_evt.try_clone().map_err(events_err)?);
        let console: Box<dyn Write + Send> = match &config.console {
            Console::Stdout => Box::new(std::io::stdout()),
            Console::Sink => Box::new(std::io::sink()),
            Console::File(path) => Box::new(
                console_file::RotatingFile::create(path, console_file::DEFAULT_LIMIT).map_err(
                    |source| Error::ConsoleFile {
                        path: path.display().to_string(),
                        source,
                    },
                )?,
            ),
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Events(format!("serial irqfd: {e}")))?;
        let serial = Serial::new(
            EventFdTrigger::new(serial_irq),
            Box::new(ConsoleWatch::new(console, console_events.clone())),
        );
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        let i8042 = I8042::new(EventFdTrigger::new(
            reset_evt.try_clone().map_err(events_err)?,
        ));
        let mut mmio = Bus::new();
        let mut attacher = virtio::Attacher::new(&vm, &ram.memory, &mut mmio);
        if let Some(vsock) = &config.vsock {
            attacher.vsock(vsock)?;
        }
        for fs in &config.fs {
            attacher.fs(fs)?;
        }
        for net in &config.net {
            attacher.net(net)?;
        }
        let mut device_cmdline = attacher.cmdline;
        if all_vcpus > config.vcpus {
            // The others stay offline until the guest brings them up
            // through sysfs.
            device_cmdline.push(format!("maxcpus={}", config.vcpus));
        }
        if let Some((addr, len)) = ram.hotplug {
            device_cmdline.push(format!(
                "{}={:#x}:{len:#x}",
                protocol::HOTPLUG_PARAM,
                addr.0
            ));
        }
        let device_cmdline = device_cmdline.join(" ");
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(serial)), SERIAL_PORT, 8)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, 5)?;

        let base_cpuid = arch::cpuid::supported(&kvm)?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(usize::from(all_vcpus));
        phase("devices");
        match payload {
            Payload::Kernel(boot) => {
                let kernel = boot::load_kernel(&ram.memory, &boot.kernel)?;
                phase("kernel");
                let initrd = match &boot.initrd {
                    Some(path) => Some(boot::load_initrd(&ram.memory, ram.size, &kernel, path)?),
                    None => None,
                };
                phase("initrd");
                let cmdline = boot::build_cmdline(
                    &format!("{} {device_cmdline}", config::DEFAULT_CMDLINE),
                    &boot.cmdline,
                )?;
                boot::write_boot_params(&ram.memory, ram.size, &kernel, &cmdline, initrd)?;
                arch::mptable::setup(&ram.memory, all_vcpus)?;
                log::debug!(
                    "kernel entry {:?}, command line {:?}",
                    kernel.entry,
                    cmdline.as_cstring()
                );
                for id in 0..all_vcpus {
                    let mut vcpu = Vcpu::new(&vm, id)?;
                    let cpuid = arch::cpuid::for_vcpu(&base_cpuid, id, all_vcpus, tsc_deadline);
                    vcpu.configure(&ram.memory, &cpuid, kernel.entry)?;
                    vcpus.push(vcpu);
                }
            }
            #[cfg(test)]
            Payload::RealMode(code) => {
                let vcpu = kvm_tests::real_mode_vcpu(&vm, &ram.memory, &base_cpuid, code)?;
                vcpus.push(vcpu);
            }
        }
        phase("vCPUs");
        let phases: Vec<String> = phases.iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        log::info!(
            "VM ready in {} ms ({} ms): {} vCPU(s) of {all_vcpus}, {} MiB + {} MiB to add{}",
            created.elapsed().as_millis(),
            phases.join(", "),
            config.vcpus,
            config.memory_mib,
            config.hotplug_mib,
            match memory::shmem_huge_pages() {
                Some(false) => " (4 KiB pages: shmem_enabled forbids huge pages)",
                _ => "",
            }
        );
        Ok(Vmm {
            vcpus,
            _vm: vm,
            _kvm: kvm,
            _ram: ram,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            reset_evt,
            power_off_evt,
            console: console_events,
            created,
        })
    }

    /// Runs the guest until it reboots, powers off or fails; every vCPU
    /// thread has been joined when this returns.
    pub fn run(mut self) -> Result<GuestExit, Error> {
        let events_err = |e: std::io::Error| Error::Events(e.to_string());
        let (report_tx, report_rx) = mpsc::channel();
        let vcpu_evt = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        let control = Arc::new(VcpuControl::default());
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let started = Instant::now();
        let result = (|| {
            for vcpu in self.vcpus.drain(..) {
                handles.push(vcpu.start(
                    self.pio.clone(),
                    self.mmio.clone(),
                    control.clone(),
                    report_tx.clone(),
                    vcpu_evt.try_clone().map_err(events_err)?,
                )?);
            }
            // The vCPUs run: this thread only waits for the end from here on.
            seccomp::apply(seccomp::Thread::Main)?;
            event_loop::wait_for_exit(vec![
                (
                    self.reset_evt.try_clone().map_err(events_err)?,
                    Ending::Reset,
                ),
                (
                    self.power_off_evt.try_clone().map_err(events_err)?,
                    Ending::PowerOff,
                ),
                (
                    vcpu_evt.try_clone().map_err(events_err)?,
                    Ending::VcpuStopped,
                ),
            ])
        })();
        control.request_stop();
        for handle in &mut handles {
            handle.stop();
        }
        let ending = result?;
        let stops: Vec<(u8, VcpuStop)> = report_rx.try_iter().collect();
        log::info!(
            "guest ran {} ms ({} ms since VMM start)",
            started.elapsed().as_millis(),
            self.created.elapsed().as_millis()
        );
        outcome(self.console.panic_message(), ending, &stops)
    }
}

/// Decides how the VM ended: a kernel panic or a failed vCPU is an error,
/// a reset or power-off is a clean exit.
fn outcome(
    panic: Option<String>,
    ending: Ending,
    stops: &[(u8, VcpuStop)],
) -> Result<GuestExit, Error> {
    if let Some(message) = panic {
        return Err(Error::GuestPanic(message));
    }
    if let Some((id, stop)) = stops.iter().find(|(_, s)| !s.is_clean()) {
        return Err(Error::GuestFailed {
            id: *id,
            stop: stop.clone(),
        });
    }
    let vcpu_power_off = stops.iter().any(|(_, s)| *s == VcpuStop::SystemShutdown);
    match ending {
        Ending::PowerOff => Ok(GuestExit::PowerOff),
        Ending::VcpuStopped if vcpu_power_off => Ok(GuestExit::PowerOff),
        _ => Ok(GuestExit::Reboot),
    }
}

/// Test seam: this test executable run again for the one test `test`
/// only, with `var=value` in its environment (a child test does its work,
/// a seccomp filter or a jail that would end the test runner, only when
/// `var` is set).
#[cfg(test)]
pub(crate) fn child_test(
    var: &str,
    test: &str,
    value: impl AsRef<std::ffi::OsStr>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(var, value);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_prefers_panic_then_vcpu_failure() {
        let failed = [(0, VcpuStop::Requested), (1, VcpuStop::TripleFault)];
        assert!(matches!(
            outcome(Some("Kernel panic - not syncing: x".into()), Ending::Reset, &failed),
            Err(Error::GuestPanic(m)) if m.ends_with(": x")
        ));
        assert!(matches!(
            outcome(None, Ending::VcpuStopped, &failed),
            Err(Error::GuestFailed {
                id: 1,
                stop: VcpuStop::TripleFault
            })
        ));
    }

    #[test]
    fn outcome_reset_or_poweroff_is_clean() {
        let requested = [(0, VcpuStop::Requested)];
        assert_eq!(
            outcome(None, Ending::Reset, &requested).unwrap(),
            GuestExit::Reboot
        );
        assert_eq!(
            outcome(None, Ending::PowerOff, &requested).unwrap(),
            GuestExit::PowerOff
        );
        assert_eq!(
            outcome(None, Ending::VcpuStopped, &[(0, VcpuStop::SystemShutdown)]).unwrap(),
            GuestExit::PowerOff
        );
        assert_eq!(
            outcome(None, Ending::VcpuStopped, &[(0, VcpuStop::SystemReset)]).unwrap(),
            GuestExit::Reboot
        );
    }

    #[test]
    fn config_errors_are_reported_before_touching_kvm() {
        let mut config = VmmConfig::new("/nonexistent");
        config.vcpus = 0;
        let err = Vmm::build(&config, Payload::Kernel(&config.boot))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "invalid VM configuration: 0 vCPUs (1 to 32 supported)"
        );
    }
}

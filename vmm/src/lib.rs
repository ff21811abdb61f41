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
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;

#[cfg(test)]
mod kvm_tests;

use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// Saving or restoring a template.
    #[error(transparent)]
    Template(#[from] snapshot::Error),
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
    /// The guest was saved as a template (of this many bytes of memory).
    Saved(u64),
}

/// A VM ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    vm: VmFd,
    kvm: Kvm,
    ram: memory::GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    reset_evt: EventFd,
    power_off_evt: EventFd,
    /// Signalled when a template guest's agent is ready to be saved.
    template_ready: EventFd,
    /// Where to save the template, and what it fits.
    template_out: Option<(PathBuf, snapshot::Fit)>,
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
        if config.template_out.is_some() && config.restore.is_some() {
            return Err(Error::Config(
                "a VM cannot both build and restore a template".into(),
            ));
        }
        // How long each part of the build took, for the "VM ready" line.
        let mut phases: Vec<(&str, u128)> = Vec::new();
        let mut since = Instant::now();
        let mut phase = |name| {
            phases.push((name, since.elapsed().as_millis()));
            since = Instant::now();
        };
        let kvm = Kvm::new().map_err(vm::Error::OpenKvm)?;
        // A template guest and its restored copies have the template word
        // on their command line; a cold boot has not.
        let cmdline = full_cmdline(config, all_vcpus, config.template_out.is_some())?;
        let fit = snapshot::Fit {
            vcpus: (config.vcpus, all_vcpus),
            memory: (config.memory_mib << 20, config.hotplug_mib << 20),
            cmdline: full_cmdline(config, all_vcpus, true)?
                .as_cstring()
                .map_err(|e| boot::Error::Cmdline(e.to_string()))?
                .to_string_lossy()
                .into_owned(),
        };
        let base_cpuid = arch::cpuid::supported(&kvm)?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let cpuid = |id| arch::cpuid::for_vcpu(&base_cpuid, id, all_vcpus, tsc_deadline);
        let restored = config.restore.as_deref().and_then(|dir| {
            match restore(config, &kvm, dir, &fit, &cpuid) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("booting cold: {e}");
                    discard_template(dir);
                    None
                }
            }
        });
        let from_template = restored.is_some();
        let (ram, vm, restored, serial_state) = match restored {
            Some((ram, vm, vcpus, serial)) => {
                phase("template");
                (ram, vm, Some(vcpus), Some(serial))
            }
            None => {
                let ram = memory::create(config.memory_mib, config.hotplug_mib)?;
                let vm = vm::create(&kvm, &ram.memory, all_vcpus)?;
                phase("memory and VM");
                (ram, vm, None, None)
            }
        };

        let events_err = |e: std::io::Error| Error::Events(e.to_string());
        let power_off_evt = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        let mut console_events = ConsoleEvents::new(power_off_evt.try_clone().map_err(events_err)?);
        let template_ready = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        if config.template_out.is_some() {
            console_events = console_events.signal_on_line(
                protocol::template::READY,
                template_ready.try_clone().map_err(events_err)?,
            );
        }
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
        let console = Box::new(ConsoleWatch::new(console, console_events.clone()));
        let serial = match &serial_state {
            Some(state) => {
                let mut serial =
                    Serial::from_state(&state.into(), EventFdTrigger::new(serial_irq), console)
                        .map_err(|e| Error::Events(format!("serial state: {e}")))?;
                // The agent of a restored guest waits for this line.
                let line = restore_line().line();
                if serial.enqueue_input(line.as_bytes()) != line.len() {
                    return Err(Error::Events("the UART refused the restore line".into()));
                }
                serial
            }
            None => Serial::new(EventFdTrigger::new(serial_irq), console),
        };
        let serial = Arc::new(Mutex::new(serial));
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(events_err)?;
        let i8042 = I8042::new(EventFdTrigger::new(
            reset_evt.try_clone().map_err(events_err)?,
        ));
        let mut mmio = Bus::new();
        // A template guest boots with empty device slots: its agent binds
        // the devices of each restored copy.
        if config.template_out.is_none() {
            let mut attacher = virtio::Attacher::new(&vm, &ram.memory, &mut mmio);
            if let Some(vsock) = &config.vsock {
                attacher.vsock(vsock)?;
            }
            for fs in &config.fs {
                // virtiofsd cannot map a template's private memory.
                attacher.fs(fs, !ram.shared)?;
            }
            for net in &config.net {
                attacher.net(net)?;
            }
            if config.free_page_reporting {
                attacher.balloon()?;
            }
        }
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT, 8)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, 5)?;
        phase("devices");
        let vcpus = match restored {
            Some(vcpus) => vcpus,
            None => {
                let mut vcpus = Vec::with_capacity(usize::from(all_vcpus));
                match payload {
                    Payload::Kernel(boot) => {
                        let kernel = boot::load_kernel(&ram.memory, &boot.kernel)?;
                        phase("kernel");
                        let initrd = match &boot.initrd {
                            Some(path) => {
                                Some(boot::load_initrd(&ram.memory, ram.size, &kernel, path)?)
                            }
                            None => None,
                        };
                        phase("initrd");
                        boot::write_boot_params(&ram.memory, ram.size, &kernel, &cmdline, initrd)?;
                        arch::mptable::setup(&ram.memory, all_vcpus)?;
                        log::debug!(
                            "kernel entry {:?}, command line {:?}",
                            kernel.entry,
                            cmdline.as_cstring().ok()
                        );
                        for id in 0..all_vcpus {
                            let mut vcpu = Vcpu::new(&vm, id)?;
                            vcpu.configure(&ram.memory, &cpuid(id), kernel.entry)?;
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
                vcpus
            }
        };
        let phases: Vec<String> = phases.iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        log::info!(
            "VM ready in {} ms ({} ms){}: {} vCPU(s) of {all_vcpus}, {} MiB + {} MiB to add{}",
            created.elapsed().as_millis(),
            phases.join(", "),
            if from_template {
                " from a template"
            } else {
                ""
            },
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
            vm,
            kvm,
            ram,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            reset_evt,
            power_off_evt,
            template_ready,
            template_out: config.template_out.clone().map(|dir| (dir, fit)),
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
                (
                    self.template_ready.try_clone().map_err(events_err)?,
                    Ending::TemplateReady,
                ),
            ])
        })();
        control.request_stop();
        let stopped: Vec<Option<Vcpu>> = handles.iter_mut().map(|h| h.stop()).collect();
        let ending = result?;
        if let (Ending::TemplateReady, Some((dir, fit))) = (ending, self.template_out.take()) {
            return self.save_template(&dir, fit, stopped);
        }
        let stops: Vec<(u8, VcpuStop)> = report_rx.try_iter().collect();
        log::info!(
            "guest ran {} ms ({} ms since VMM start)",
            started.elapsed().as_millis(),
            self.created.elapsed().as_millis()
        );
        outcome(self.console.panic_message(), ending, &stops)
    }
}

/// The kernel command line: the VMM's defaults, the device slots, the
/// offline vCPUs and hot-pluggable memory, the template word if `template`,
/// then the caller's.
fn full_cmdline(
    config: &VmmConfig,
    all_vcpus: u8,
    template: bool,
) -> Result<linux_loader::cmdline::Cmdline, Error> {
    let mut parts = vec![config::DEFAULT_CMDLINE.to_string()];
    parts.extend(virtio::slot_cmdline(config.slots())?);
    if all_vcpus > config.vcpus {
        // The others stay offline until the guest brings them up through
        // sysfs.
        parts.push(format!("maxcpus={}", config.vcpus));
    }
    if config.hotplug_mib > 0 {
        parts.push(format!(
            "{}={:#x}:{:#x}",
            protocol::HOTPLUG_PARAM,
            layout::hotplug_base(config.memory_mib << 20),
            config.hotplug_mib << 20
        ));
    }
    if template {
        parts.push(protocol::template::PARAM.to_string());
    }
    Ok(boot::build_cmdline(&parts.join(" "), &config.boot.cmdline)?)
}

/// What a restore makes before the devices: memory, the VM, its vCPUs
/// and the UART's saved state.
type Core = (memory::GuestRam, VmFd, Vec<Vcpu>, snapshot::SerialSnapshot);

/// Restores the template in `dir`, which must fit the VM (`fit`) and check
/// out.
fn restore(
    config: &VmmConfig,
    kvm: &Kvm,
    dir: &Path,
    fit: &snapshot::Fit,
    cpuid: &impl Fn(u8) -> kvm_bindings::CpuId,
) -> Result<Core, Error> {
    let t = Instant::now();
    let manifest = snapshot::load(dir, fit)?;
    let t_manifest = t.elapsed().as_millis();
    disable_huge_pages();
    let ram = snapshot::map_memory(config.memory_mib, config.hotplug_mib, dir, &manifest)?;
    let t_memory = t.elapsed().as_millis();
    let vm = vm::create(kvm, &ram.memory, fit.vcpus.1)?;
    snapshot::restore_vm(&vm, &manifest.state)?;
    let mut vcpus = Vec::with_capacity(manifest.state.vcpus.len());
    for (id, saved) in (0..).zip(&manifest.state.vcpus) {
        let mut vcpu = Vcpu::new(&vm, id)?;
        vcpu.restore(&cpuid(id), saved)?;
        vcpus.push(vcpu);
    }
    log::debug!(
        "template restored: manifest {t_manifest} ms, memory {} ms ({} MiB), VM and vCPUs {} ms",
        t_memory - t_manifest,
        manifest.memory_bytes >> 20,
        t.elapsed().as_millis() - t_memory
    );
    Ok((ram, vm, vcpus, manifest.state.serial))
}

/// No transparent huge pages for this process. A restored guest's memory
/// is a private file mapping, which gets none anyway; but with THP set to
/// `always`, the VMM's own heaps and stacks took a 2 MiB page each for a
/// few KiB used (4 MiB of an idle restored VMM's 31 MiB in the nested CI
/// host), which counts in every sandbox.
fn disable_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE only changes how this process's future
    // faults are served; it touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        log::debug!(
            "transparent huge pages stay on: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Removes a template that did not fit or check out, so that the next VM
/// that wants one builds it again (renamed first: a VM restoring from it
/// keeps its open files).
fn discard_template(dir: &Path) {
    let mut gone = dir.as_os_str().to_owned();
    gone.push(format!(".bad.{}", std::process::id()));
    let gone = PathBuf::from(gone);
    match std::fs::rename(dir, &gone).and_then(|()| std::fs::remove_dir_all(&gone)) {
        Ok(()) => log::warn!("template {} removed", dir.display()),
        Err(e) => log::warn!("cannot remove template {}: {e}", dir.display()),
    }
}

/// What a restored guest is told: fresh host randomness and the time.
fn restore_line() -> protocol::template::Restore {
    let mut entropy = [0u8; protocol::template::ENTROPY_BYTES];
    // SAFETY: getrandom writes at most `entropy.len()` bytes into it.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    assert_eq!(
        n,
        entropy.len() as isize,
        "getrandom of 22 bytes cannot fail"
    );
    let time_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    protocol::template::Restore { entropy, time_us }
}

impl Vmm {
    /// Saves the stopped VM as a template in `dir`.
    fn save_template(
        &self,
        dir: &Path,
        fit: snapshot::Fit,
        stopped: Vec<Option<Vcpu>>,
    ) -> Result<GuestExit, Error> {
        let started = Instant::now();
        let msr_list = snapshot::msr_list(&self.kvm)?;
        let mut vcpus = Vec::with_capacity(stopped.len());
        for vcpu in stopped {
            let mut vcpu = vcpu.ok_or(Error::Config("a vCPU thread panicked".into()))?;
            vcpus.push(vcpu.save(&msr_list)?);
        }
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .into();
        let state = snapshot::save_vm(&self.vm, serial, vcpus)?;
        let bytes = snapshot::save(dir, fit, &self.ram, state)?;
        log::info!(
            "template saved in {} ms: {} MiB of memory",
            started.elapsed().as_millis(),
            bytes >> 20
        );
        Ok(GuestExit::Saved(bytes))
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

//! What the VMM is asked to run. The CLI builds this; [`crate::Vmm`] takes it.

use std::path::PathBuf;

pub use crate::virtio::{FsConfig, NetConfig, VsockConfig};

/// Kernel command-line parameters the VMM relies on: the console on the
/// UART, reboot through the i8042 (which ends the VM), reboot right after a
/// panic (the VMM spots the panic on the console), no PCI or modules.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule";

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// What boots in the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    /// ELF vmlinux (PVH entry preferred) or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Appended to [`DEFAULT_CMDLINE`]; later parameters win.
    pub cmdline: String,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// The VMM's standard output.
    Stdout,
    /// A log file (created or truncated).
    File(PathBuf),
    /// Nowhere (still watched for kernel panics).
    Sink,
}

/// The whole configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmConfig {
    /// The kernel and its arguments.
    pub boot: BootSource,
    /// Number of vCPUs the guest boots with.
    pub vcpus: u8,
    /// vCPUs the VM has in all (at least `vcpus`): the others are created
    /// offline (`maxcpus=` on the command line) for the guest to bring
    /// online later.
    pub max_vcpus: u8,
    /// Guest memory in MiB at boot.
    pub memory_mib: u64,
    /// Memory in MiB mapped above the boot RAM, not in the e820 map, for
    /// the guest to add later (`sandboxvm.hotplug=` on the command line):
    /// a multiple of [`crate::layout::HOTPLUG_BLOCK`]; 0 for none.
    pub hotplug_mib: u64,
    /// The serial console's destination.
    pub console: Console,
    /// The kernel is PVM-enabled: allow booting on a PVM host, where a
    /// standard kernel cannot run.
    pub pvm_guest: bool,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares.
    pub fs: Vec<FsConfig>,
    /// virtio-net devices, in guest order (eth0 first).
    pub net: Vec<NetConfig>,
    /// A virtio-balloon device for free page reporting, after the others:
    /// the guest hands the host back the memory it frees.
    pub free_page_reporting: bool,
    /// Build a template in this (existing, empty) directory: boot with the
    /// device slots on the command line but nothing behind them, save the
    /// VM once the guest agent says it is ready, and end.
    pub template_out: Option<PathBuf>,
    /// Restore from the template in this directory instead of booting; a
    /// template that does not fit this VM or does not check out is removed
    /// and the VM boots cold.
    pub restore: Option<PathBuf>,
}

impl VmmConfig {
    /// The virtio-mmio slots its devices take (vsock, shares, networks,
    /// balloon, in that order).
    pub fn slots(&self) -> usize {
        usize::from(self.vsock.is_some())
            + self.fs.len()
            + self.net.len()
            + usize::from(self.free_page_reporting)
    }

    /// A configuration with defaults: 1 vCPU, 256 MiB, console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmmConfig {
            boot: BootSource {
                kernel: kernel.into(),
                initrd: None,
                cmdline: String::new(),
            },
            vcpus: 1,
            max_vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            hotplug_mib: 0,
            console: Console::Stdout,
            pvm_guest: false,
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            free_page_reporting: false,
            template_out: None,
            restore: None,
        }
    }
}

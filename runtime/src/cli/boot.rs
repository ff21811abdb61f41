//! `sandboxvm boot`: boot a kernel directly, console on stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use vmm::{Console, FsConfig, GuestExit, NetConfig, Vmm, VmmConfig, VsockConfig};

/// Boots KERNEL with an optional initramfs. The VM ends when the guest
/// reboots or powers off (exit 0); a kernel panic, triple fault or KVM error
/// exits non-zero with the reason.
#[derive(Debug, Args)]
pub struct Boot {
    /// Uncompressed ELF vmlinux (PVH entry used when present) or bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs (newc cpio, optionally compressed as the kernel supports).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to the VMM's defaults
    /// (console=ttyS0 reboot=k panic=-1 pci=off nomodule).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// vCPUs in all: those beyond --cpus are created offline, for the guest
    /// to bring online later (default: --cpus).
    #[arg(long)]
    pub max_cpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEMORY_MIB)]
    pub memory: u64,
    /// Memory in MiB (whole 128 MiB blocks) mapped above the guest's RAM
    /// for it to add later; the guest is told where on its command line.
    #[arg(long, default_value_t = 0)]
    pub hotplug_memory: u64,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// The kernel is PVM-enabled: boot it even on a PVM host.
    #[arg(long)]
    pub pvm_guest: bool,
    /// Add a virtio-vsock device (guest CID 3) whose host side is this Unix
    /// socket: connect and write `CONNECT <port>\n` to reach a guest port;
    /// guest connections to host port P go to `<socket>_P`.
    #[arg(long, value_name = "SOCKET")]
    pub vsock: Option<PathBuf>,
    /// Add a virtio-fs device served by a running virtiofsd at SOCKET, mounted
    /// in the guest by TAG. Repeatable.
    #[arg(long, value_name = "SOCKET:TAG")]
    pub fs: Vec<FsConfig>,
    /// Add a virtio-net device on the host tap NAME (attached if it exists,
    /// else created for the VM's lifetime), with the guest interface's MAC
    /// and MTU. Repeatable: eth0, eth1, ... in order.
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,mtu=N]")]
    pub net: Vec<NetConfig>,
    /// Once the VM is built, run in a mount namespace whose root holds only
    /// DIR (the part of the sandbox's state the VMM needs: the console log,
    /// the vsock sockets, virtiofsd's socket), at its usual path.
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,
    /// Once the VM is built, become this user: `auto` (a uid and gid of the
    /// VMM's own, 0x70000000 + its pid), `UID` or `UID:GID`. The `--jail`
    /// directory is given to it.
    #[arg(long, value_name = "auto|UID[:GID]")]
    pub user: Option<vmm::confine::User>,
}

impl Boot {
    pub fn run(self) -> anyhow::Result<i32> {
        let mut config = VmmConfig::new(self.kernel);
        config.boot.initrd = self.initrd;
        config.boot.cmdline = self.cmdline;
        config.vcpus = self.cpus;
        config.max_vcpus = self.max_cpus.unwrap_or(self.cpus);
        config.memory_mib = self.memory;
        config.hotplug_mib = self.hotplug_memory;
        config.pvm_guest = self.pvm_guest;
        config.vsock = self.vsock.map(|uds| VsockConfig { uds });
        config.fs = self.fs;
        config.net = self.net;
        config.console = match self.console_log {
            Some(path) => Console::File(path),
            None => Console::Stdout,
        };
        let vmm = Vmm::try_from(config).context("cannot start the VM")?;
        // Everything the VM needs is open: give up the rest before the
        // vCPU and device threads start.
        let confining = std::time::Instant::now();
        if let Some(dir) = &self.jail {
            vmm::confine::jail(dir)
                .with_context(|| format!("cannot jail the VMM in {}", dir.display()))?;
            if let Some(user) = self.user {
                vmm::confine::give_dir(dir, user)
                    .with_context(|| format!("cannot give {} to the VMM's user", dir.display()))?;
            }
        }
        vmm::confine::apply(self.user).context("cannot confine the VMM")?;
        // SANDBOXVM_VMM_SECCOMP=off: a debugging aid (strace of the VMM).
        if std::env::var("SANDBOXVM_VMM_SECCOMP").as_deref() == Ok("off") {
            log::warn!("the VMM's seccomp filters are off (SANDBOXVM_VMM_SECCOMP=off)");
        } else {
            vmm::seccomp::enable().context("cannot confine the VMM")?;
        }
        log::info!(
            "VMM confined in {} us (no capabilities, no_new_privs, limits, seccomp{})",
            confining.elapsed().as_micros(),
            match self.user {
                Some(u) => format!(", uid {}", u.ids().0),
                None => String::new(),
            }
        );
        let exit = vmm.run().context("the VM failed")?;
        log::info!(
            "guest {}",
            match exit {
                GuestExit::Reboot => "rebooted",
                GuestExit::PowerOff => "powered off",
            }
        );
        Ok(0)
    }
}

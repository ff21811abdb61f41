//! `sandboxvm boot`: boot a kernel directly, console on stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use vmm::{Console, FsConfig, GuestExit, Vmm, VmmConfig, VsockConfig};

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
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEMORY_MIB)]
    pub memory: u64,
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
    #[arg(long, value_name = "SOCKET:TAG", value_parser = parse_fs)]
    pub fs: Vec<FsConfig>,
}

fn parse_fs(s: &str) -> Result<FsConfig, String> {
    let (socket, tag) = s
        .rsplit_once(':')
        .filter(|(p, t)| !p.is_empty() && !t.is_empty())
        .ok_or_else(|| format!("expected SOCKET:TAG, got {s:?}"))?;
    Ok(FsConfig {
        socket: socket.into(),
        tag: tag.to_string(),
    })
}

impl Boot {
    pub fn run(self) -> anyhow::Result<i32> {
        let mut config = VmmConfig::new(self.kernel);
        config.boot.initrd = self.initrd;
        config.boot.cmdline = self.cmdline;
        config.vcpus = self.cpus;
        config.memory_mib = self.memory;
        config.pvm_guest = self.pvm_guest;
        config.vsock = self.vsock.map(|uds| VsockConfig { uds });
        config.fs = self.fs;
        config.console = match self.console_log {
            Some(path) => Console::File(path),
            None => Console::Stdout,
        };
        let vmm = Vmm::try_from(config).context("cannot start the VM")?;
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

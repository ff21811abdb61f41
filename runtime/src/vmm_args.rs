//! The VMM's command line (`sandboxvm boot`), in one place: its flags
//! ([`BootArgs`], which clap parses), what they mean ([`BootArgs::config`])
//! and how a [`VmmConfig`] is written as them ([`BootArgs::from_config`],
//! [`BootArgs::to_argv`]). The sandbox that launches a VMM process and the
//! VMM that reads its arguments use this one type, so they cannot disagree
//! (a unit test writes every field and reads it back).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;
use vmm::confine::User;
use vmm::{Console, FsConfig, NetConfig, VmmConfig, VsockConfig};

/// Boots KERNEL with an optional initramfs. The VM ends when the guest
/// reboots or powers off (exit 0); a kernel panic, triple fault or KVM error
/// exits non-zero with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct BootArgs {
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
    #[arg(long, conflicts_with = "no_console")]
    pub console_log: Option<PathBuf>,
    /// Write the guest console nowhere (it is still watched for panics).
    #[arg(long)]
    pub no_console: bool,
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
    /// Add a virtio-balloon device for free page reporting (after the other
    /// devices): the guest gives the memory it frees back to the host.
    #[arg(long)]
    pub free_page_reporting: bool,
    /// Build a template in DIR (existing, empty) instead of running a VM:
    /// boot with the device slots on the command line but nothing behind
    /// them, save the VM once the guest agent says it is ready, and end.
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    pub template_out: Option<PathBuf>,
    /// Restore from the template in DIR instead of booting the kernel; a
    /// template that does not fit this VM or does not check out is removed
    /// and the VM boots cold.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// Once the VM is built, run in a mount namespace whose root holds only
    /// DIR (the part of the sandbox's state the VMM needs: the console log,
    /// the vsock sockets, virtiofsd's socket), at its usual path.
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,
    /// Once the VM is built, become this user: `auto` (a uid and gid of the
    /// VMM's own, 0x70000000 + its pid), `UID` or `UID:GID`. The `--jail`
    /// directory is given to it.
    #[arg(long, value_name = "auto|UID[:GID]")]
    pub user: Option<User>,
}

impl BootArgs {
    /// The VM these flags ask for.
    pub fn config(&self) -> VmmConfig {
        let mut config = VmmConfig::new(&self.kernel);
        config.boot.initrd = self.initrd.clone();
        config.boot.cmdline = self.cmdline.clone();
        config.vcpus = self.cpus;
        config.max_vcpus = self.max_cpus.unwrap_or(self.cpus);
        config.memory_mib = self.memory;
        config.hotplug_mib = self.hotplug_memory;
        config.pvm_guest = self.pvm_guest;
        config.vsock = self.vsock.clone().map(|uds| VsockConfig { uds });
        config.fs = self.fs.clone();
        config.net = self.net.clone();
        config.free_page_reporting = self.free_page_reporting;
        config.template_out = self.template_out.clone();
        config.restore = self.restore.clone();
        config.console = match (&self.console_log, self.no_console) {
            (Some(path), _) => Console::File(path.clone()),
            (None, true) => Console::Sink,
            (None, false) => Console::Stdout,
        };
        config
    }

    /// The flags that ask for `config`, unconfined (set `jail` and `user`
    /// to confine it).
    pub fn from_config(config: &VmmConfig) -> BootArgs {
        BootArgs {
            kernel: config.boot.kernel.clone(),
            initrd: config.boot.initrd.clone(),
            cmdline: config.boot.cmdline.clone(),
            cpus: config.vcpus,
            max_cpus: Some(config.max_vcpus),
            memory: config.memory_mib,
            hotplug_memory: config.hotplug_mib,
            console_log: match &config.console {
                Console::File(path) => Some(path.clone()),
                Console::Stdout | Console::Sink => None,
            },
            no_console: config.console == Console::Sink,
            pvm_guest: config.pvm_guest,
            vsock: config.vsock.as_ref().map(|v| v.uds.clone()),
            fs: config.fs.clone(),
            net: config.net.clone(),
            free_page_reporting: config.free_page_reporting,
            template_out: config.template_out.clone(),
            restore: config.restore.clone(),
            jail: None,
            user: None,
        }
    }

    /// These flags as the arguments of `sandboxvm boot`.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            argv.push(format!("--{name}").into());
            argv.push(value);
        };
        flag("kernel", self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            flag("initrd", initrd.clone().into());
        }
        flag("cmdline", self.cmdline.clone().into());
        flag("cpus", self.cpus.to_string().into());
        if let Some(max) = self.max_cpus {
            flag("max-cpus", max.to_string().into());
        }
        flag("memory", self.memory.to_string().into());
        flag("hotplug-memory", self.hotplug_memory.to_string().into());
        if let Some(log) = &self.console_log {
            flag("console-log", log.clone().into());
        }
        if let Some(uds) = &self.vsock {
            flag("vsock", uds.clone().into());
        }
        for fs in &self.fs {
            flag("fs", fs.to_string().into());
        }
        for net in &self.net {
            flag("net", net.to_string().into());
        }
        if let Some(dir) = &self.template_out {
            flag("template-out", dir.clone().into());
        }
        if let Some(dir) = &self.restore {
            flag("restore", dir.clone().into());
        }
        if let Some(jail) = &self.jail {
            flag("jail", jail.clone().into());
        }
        if let Some(user) = &self.user {
            flag("user", user.to_string().into());
        }
        if self.no_console {
            argv.push("--no-console".into());
        }
        if self.pvm_guest {
            argv.push("--pvm-guest".into());
        }
        if self.free_page_reporting {
            argv.push("--free-page-reporting".into());
        }
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Boot {
        #[command(flatten)]
        args: BootArgs,
    }

    fn read_back(args: &BootArgs) -> BootArgs {
        let argv = std::iter::once(OsString::from("boot")).chain(args.to_argv());
        Boot::try_parse_from(argv).unwrap().args
    }

    /// Every field of a configuration survives being written as flags and
    /// parsed again, with each kind of console.
    #[test]
    fn a_config_written_as_flags_reads_back_the_same() {
        let mut config = VmmConfig::new("/k/vmlinux");
        config.boot.initrd = Some("/k/initrd.cpio".into());
        config.boot.cmdline = "quiet sandboxvm.x=1".into();
        config.vcpus = 2;
        config.max_vcpus = 4;
        config.memory_mib = 384;
        config.hotplug_mib = 1024;
        config.pvm_guest = true;
        config.free_page_reporting = true;
        config.vsock = Some(VsockConfig {
            uds: "/s/vsock.sock".into(),
        });
        config.fs = vec!["/s/fs.sock:sbx-rootfs".parse().unwrap()];
        config.net = vec![
            "tap=t0,mac=02:00:00:00:00:01,mtu=1400".parse().unwrap(),
            "tap=t1".parse().unwrap(),
        ];
        for console in [
            Console::File("/s/console.log".into()),
            Console::Stdout,
            Console::Sink,
        ] {
            config.console = console;
            let mut args = BootArgs::from_config(&config);
            args.jail = Some("/s/vmm".into());
            args.user = Some(User::Ids { uid: 7, gid: 8 });
            let back = read_back(&args);
            assert_eq!(back, args);
            assert_eq!(back.config(), config);
        }
        for (out, restore) in [(Some("/t/new"), None), (None, Some("/t/key"))] {
            config.template_out = out.map(PathBuf::from);
            config.restore = restore.map(PathBuf::from);
            let args = BootArgs::from_config(&config);
            assert_eq!(read_back(&args).config(), config);
        }
        let args = BootArgs::from_config(&VmmConfig::new("/k/vmlinux"));
        assert_eq!(read_back(&args).config(), VmmConfig::new("/k/vmlinux"));
    }
}

//! `sandboxvm boot`: boot a kernel directly, console on stdout.

use anyhow::Context;
use clap::Args;
use sandboxvm::vmm_args::BootArgs;
use vmm::{GuestExit, Vmm};

/// Boots KERNEL with an optional initramfs. The VM ends when the guest
/// reboots or powers off (exit 0); a kernel panic, triple fault or KVM error
/// exits non-zero with the reason.
#[derive(Debug, Args)]
pub struct Boot {
    #[command(flatten)]
    pub args: BootArgs,
}

impl Boot {
    pub fn run(self) -> anyhow::Result<i32> {
        let Boot { args } = self;
        let vmm = Vmm::try_from(args.config()).context("cannot start the VM")?;
        // Everything the VM needs is open: give up the rest before the
        // vCPU and device threads start.
        let confining = std::time::Instant::now();
        if let Some(dir) = &args.jail {
            vmm::confine::jail(dir)
                .with_context(|| format!("cannot jail the VMM in {}", dir.display()))?;
            if let Some(user) = args.user {
                vmm::confine::give_dir(dir, user)
                    .with_context(|| format!("cannot give {} to the VMM's user", dir.display()))?;
            }
        }
        // A template's memory file is as long as the guest's memory (sparse).
        let max_file = match &args.template_out {
            Some(_) => vmm::confine::FSIZE.max((args.memory + args.hotplug_memory) << 20),
            None => vmm::confine::FSIZE,
        };
        vmm::confine::apply(args.user, max_file).context("cannot confine the VMM")?;
        let mut seccomp = true;
        // SANDBOXVM_VMM_SECCOMP=off: a debugging aid (strace of the VMM).
        if args.template_out.is_some() {
            // It writes the template once the guest is saved; its guest is
            // sandboxvm's own kernel and agent, with no device and no
            // workload.
            log::info!("building a template: no seccomp filters");
            seccomp = false;
        } else if std::env::var("SANDBOXVM_VMM_SECCOMP").as_deref() == Ok("off") {
            log::warn!("the VMM's seccomp filters are off (SANDBOXVM_VMM_SECCOMP=off)");
            seccomp = false;
        } else {
            vmm::seccomp::enable().context("cannot confine the VMM")?;
        }
        log::info!(
            "VMM confined in {} us (no capabilities, no_new_privs, limits{}{})",
            confining.elapsed().as_micros(),
            if seccomp { ", seccomp" } else { "" },
            match args.user {
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
                GuestExit::Saved(_) => "saved as a template",
            }
        );
        Ok(0)
    }
}

//! `sandboxvm check`: can this host boot guests?

use clap::Args;

/// Prints what kind of virtualization this host has (and, on a second line,
/// a host KVM that gives vCPUs a frozen TSC). Exit code: 0 standard
/// guests boot here, 1 no usable KVM, 2 PVM (only PVM-enabled guest
/// kernels), 3 KVM without visible hardware virtualization.
#[derive(Debug, Args)]
pub struct Check {
    /// Print nothing; only set the exit code.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Check {
    pub fn run(self) -> anyhow::Result<i32> {
        let host = vmm::host::detect();
        if !self.quiet {
            println!("{host}");
            // A KVM that freezes vCPU TSCs still boots sandboxvm's guests
            // (the VMM repairs them): said, but not an error.
            if !matches!(host, vmm::host::HostKvm::Missing(_)) {
                if let Some(trouble) = vmm::host::tsc_trouble() {
                    println!("{trouble}");
                }
            }
        }
        Ok(host.exit_code())
    }
}

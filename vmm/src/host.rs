//! What kind of KVM this host has, and so which guests it can boot.

use std::fs::OpenOptions;
use std::path::Path;

/// The host's virtualization, from the guest's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware virtualization: any guest kernel boots.
    Hardware {
        /// "Intel VT-x" or "AMD-V".
        technology: &'static str,
        /// The KVM module serving it.
        module: &'static str,
    },
    /// KVM is PVM (`kvm_pvm`): only PVM-enabled guest kernels run.
    Pvm,
    /// /dev/kvm works, but the CPU shows neither VT-x nor AMD-V and KVM is not
    /// PVM (e.g. an unusual nested setup); guests may not boot.
    Unknown,
    /// No usable /dev/kvm.
    Missing(String),
}

impl HostKvm {
    /// Whether a standard guest kernel can boot here.
    pub fn boots_standard_guests(&self) -> bool {
        matches!(self, HostKvm::Hardware { .. })
    }

    /// The exit code `sandboxvm check` uses: 0 boots guests, 2 PVM only,
    /// 3 unknown, 1 no KVM.
    pub fn exit_code(&self) -> i32 {
        match self {
            HostKvm::Hardware { .. } => 0,
            HostKvm::Missing(_) => 1,
            HostKvm::Pvm => 2,
            HostKvm::Unknown => 3,
        }
    }
}

impl std::fmt::Display for HostKvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostKvm::Hardware { technology, module } => write!(
                f,
                "hardware virtualization ({technology}, {module}): this host can boot sandboxvm guests"
            ),
            HostKvm::Pvm => write!(
                f,
                "KVM here is PVM (kvm_pvm, no VT-x/AMD-V): only PVM-enabled guest kernels can \
                 boot; run standard guests on a host with hardware virtualization or inside \
                 the nested CI host (ci/nested)"
            ),
            HostKvm::Unknown => write!(
                f,
                "/dev/kvm works but the CPU shows neither VT-x nor AMD-V and KVM is not PVM: \
                 guests may not boot"
            ),
            HostKvm::Missing(why) => write!(f, "no usable KVM: {why}"),
        }
    }
}

/// Classifies a host from its facts: whether /dev/kvm opens, the CPU flags
/// line of /proc/cpuinfo, and whether a module is loaded.
pub fn classify(
    dev_kvm: Result<(), String>,
    cpuinfo: &str,
    module_loaded: impl Fn(&str) -> bool,
) -> HostKvm {
    if let Err(why) = dev_kvm {
        return HostKvm::Missing(why);
    }
    if module_loaded("kvm_pvm") {
        return HostKvm::Pvm;
    }
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    if flags.contains(&"vmx") && module_loaded("kvm_intel") {
        HostKvm::Hardware {
            technology: "Intel VT-x",
            module: "kvm_intel",
        }
    } else if flags.contains(&"svm") && module_loaded("kvm_amd") {
        HostKvm::Hardware {
            technology: "AMD-V",
            module: "kvm_amd",
        }
    } else {
        HostKvm::Unknown
    }
}

/// Looks at this host.
pub fn detect() -> HostKvm {
    let dev_kvm = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("/dev/kvm does not exist (KVM not loaded, or no virtualization)".to_string())
        }
        Err(e) => Err(format!("cannot open /dev/kvm: {e}")),
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(dev_kvm, &cpuinfo, |m| {
        Path::new("/sys/module").join(m).exists()
    })
}

/// What is wrong with the TSC this host's KVM gives a new vCPU, if anything
/// (see [`crate::arch::tsc`]: a frozen one, which the VMM repairs at every
/// boot); `None` when it runs or no vCPU can be made to look.
pub fn tsc_trouble() -> Option<String> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    match crate::arch::tsc::ensure_running(&vcpu) {
        Ok(check) => check.warning(),
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm npt\n";
    const PLAIN: &str = "processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n";

    #[test]
    fn hardware_needs_the_flag_and_the_module() {
        let intel = classify(Ok(()), INTEL, |m| m == "kvm_intel");
        assert!(intel.boots_standard_guests());
        assert_eq!(intel.exit_code(), 0);
        assert!(intel.to_string().contains("Intel VT-x"));
        let amd = classify(Ok(()), AMD, |m| m == "kvm_amd");
        assert!(amd.to_string().contains("AMD-V, kvm_amd"));
        assert_eq!(classify(Ok(()), AMD, |_| false), HostKvm::Unknown);
    }

    #[test]
    fn pvm_wins_over_everything() {
        let pvm = classify(Ok(()), PLAIN, |m| m == "kvm_pvm" || m == "kvm");
        assert_eq!(pvm, HostKvm::Pvm);
        assert!(!pvm.boots_standard_guests());
        assert_eq!(pvm.exit_code(), 2);
        assert!(pvm.to_string().contains("only PVM-enabled guest kernels"));
    }

    #[test]
    fn missing_dev_kvm() {
        let none = classify(Err("no /dev/kvm".into()), INTEL, |_| true);
        assert_eq!(none.exit_code(), 1);
        assert_eq!(none.to_string(), "no usable KVM: no /dev/kvm");
        assert_eq!(classify(Ok(()), PLAIN, |_| false).exit_code(), 3);
    }
}

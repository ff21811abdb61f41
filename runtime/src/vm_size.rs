//! The size of a running VM, what it may grow to, and growing it when a
//! container's resources are updated (`sandboxvm update`, the shim's task
//! Update). The VMM boots the guest with every vCPU it may have, those
//! beyond the boot count offline, and maps the memory it may add above its
//! boot RAM ([`vmm::layout::hotplug_base`]); the guest agent brings vCPUs
//! online and adds memory blocks (`ResizeVm`). A VM never shrinks: a lower
//! limit only changes the container's cgroup in the guest.
//!
//! A guest that owns its kernel can take what was made for it without
//! asking: online the vCPUs, add the memory. So the ceiling is only what
//! something bounds ([`VmSize::ceiling`]): the configuration's
//! `guest.max_vcpus` and `guest.max_memory_mib` when set; else, for a VMM
//! whose host cgroup has a limit (a Kubernetes pod's), the host's CPUs or
//! memory, the cgroup holding the guest to what it allows; else nothing
//! beyond the boot size, as before growing existed. Growing also stays
//! within the cgroup's memory limit in force at the time (the kubelet
//! raises a pod's before it resizes its containers).

use serde::{Deserialize, Serialize};

use crate::agent::Agent;
use crate::bundle::GUEST_OVERHEAD_MIB;
use crate::cgroup::Limits;
use crate::sandbox::VMM_RESERVE_MIB;

/// The most memory a VM can be given, MiB (1 TiB): the configuration's
/// `guest.max_memory_mib` is refused above it.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// A VM's size now and its ceiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmSize {
    /// vCPUs online.
    pub vcpus: u8,
    /// vCPUs in all (the others offline).
    pub max_vcpus: u8,
    /// Boot RAM, MiB.
    pub boot_memory_mib: u64,
    /// Memory added since boot, MiB.
    pub added_mib: u64,
    /// Memory the guest may add in all, MiB (a multiple of
    /// [`HOTPLUG_BLOCK_MIB`]).
    pub hotplug_mib: u64,
}

/// Memory is added in blocks of this many MiB.
pub const HOTPLUG_BLOCK_MIB: u64 = vmm::layout::HOTPLUG_BLOCK >> 20;

/// How a VM must grow for some resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    /// vCPUs to have online.
    pub vcpus: u8,
    /// Memory to have added, MiB.
    pub added_mib: u64,
}

impl VmSize {
    /// A VM booted with `vcpus` of `max_vcpus` and `memory_mib` MiB that
    /// may grow to `max_memory_mib` MiB.
    pub fn new(vcpus: u8, max_vcpus: u8, memory_mib: u64, max_memory_mib: u64) -> VmSize {
        let room = max_memory_mib.saturating_sub(memory_mib);
        VmSize {
            vcpus,
            max_vcpus: max_vcpus.max(vcpus),
            boot_memory_mib: memory_mib,
            added_mib: 0,
            hotplug_mib: room / HOTPLUG_BLOCK_MIB * HOTPLUG_BLOCK_MIB,
        }
    }

    /// The size a VM booted with `opts.vcpus` and `memory_mib` MiB may grow
    /// to, as the module says: `limits` are its host cgroup's.
    pub fn ceiling(opts: &crate::sandbox::Options, memory_mib: u64, limits: Limits) -> VmSize {
        let host = (
            crate::sandbox_options::host_cpus().min(crate::config::VCPU_LIMIT),
            crate::sandbox_options::host_memory_mib().min(MAX_MEMORY_MIB),
        );
        let configured = (opts.max_vcpus, opts.max_memory_mib);
        Self::ceiling_of(opts.vcpus, memory_mib, configured, limits, host)
    }

    /// [`VmSize::ceiling`] on a host of `host` (CPUs, MiB).
    fn ceiling_of(
        vcpus: u8,
        memory_mib: u64,
        configured: (Option<u8>, Option<u64>),
        limits: Limits,
        host: (u8, u64),
    ) -> VmSize {
        let max_vcpus = configured.0.unwrap_or(match limits.cpus {
            Some(_) => host.0,
            None => vcpus,
        });
        let max_memory_mib = configured.1.unwrap_or(match limits.memory {
            Some(_) => host.1,
            None => memory_mib,
        });
        VmSize::new(vcpus, max_vcpus, memory_mib, max_memory_mib)
    }

    /// The guest's memory now, MiB (0: unknown).
    pub fn memory_mib(&self) -> u64 {
        self.boot_memory_mib + self.added_mib
    }

    /// The most memory the guest can have, MiB.
    pub fn max_memory_mib(&self) -> u64 {
        self.boot_memory_mib + self.hotplug_mib
    }

    /// How the VM must grow for a container to get `resources`: None when
    /// it holds them already; an error when its memory limit needs more
    /// than the VM's ceiling. vCPUs are only brought up to the ceiling (the
    /// container is throttled less than it asked for, not refused).
    /// `cgroup_memory` is the memory limit in force on the VMM's host
    /// cgroup, bytes: the VM grows only within it (less the VMM's own
    /// [`VMM_RESERVE_MIB`]).
    pub fn plan(
        &self,
        resources: &oci_spec::runtime::LinuxResources,
        cgroup_memory: Option<u64>,
    ) -> Result<Option<Growth>, String> {
        if self.boot_memory_mib == 0 {
            return Ok(None); // a record of an older version: size unknown
        }
        let mut growth = Growth {
            vcpus: self.vcpus,
            added_mib: self.added_mib,
        };
        let limit = resources.memory().as_ref().and_then(|m| m.limit());
        if let Some(bytes) = limit.filter(|&b| b > 0) {
            let limit_mib = (bytes as u64).div_ceil(1 << 20);
            let need = limit_mib + GUEST_OVERHEAD_MIB;
            let fit = cgroup_memory.map(|b| (b >> 20).saturating_sub(VMM_RESERVE_MIB));
            let most = match fit {
                Some(fit) if fit < self.max_memory_mib() => fit.max(self.memory_mib()),
                _ => self.max_memory_mib(),
            };
            if need > most {
                let why = if most < self.max_memory_mib() {
                    format!(
                        "its host cgroup allows it {most} MiB (memory.max less the VMM's {VMM_RESERVE_MIB} MiB)"
                    )
                } else {
                    format!("it can grow to {most} MiB (guest.max_memory_mib in the configuration)")
                };
                return Err(format!(
                    "a memory limit of {limit_mib} MiB needs a VM of {need} MiB; this one has {} MiB \
                     and {why}",
                    self.memory_mib(),
                ));
            }
            if need > self.memory_mib() {
                let more = need - self.boot_memory_mib;
                growth.added_mib = more.div_ceil(HOTPLUG_BLOCK_MIB) * HOTPLUG_BLOCK_MIB;
            }
        }
        if let Some(cpu) = resources.cpu() {
            if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
                let want = crate::bundle::cpus_for(quota, period);
                if want > self.max_vcpus {
                    log::warn!(
                        "a CPU quota of {want} vCPUs is more than this VM's {}: it gets them all",
                        self.max_vcpus
                    );
                }
                growth.vcpus = growth.vcpus.max(want.min(self.max_vcpus));
            }
        }
        let grows = growth.vcpus > self.vcpus || growth.added_mib > self.added_mib;
        Ok(grows.then_some(growth))
    }

    /// Records what the guest says it has after a resize. The reply is the
    /// guest's word: it is held within what the VMM made (a lying guest
    /// cannot make the host count more vCPUs or memory than exist) and
    /// never below what was already counted.
    fn take_reply(&mut self, vcpus: u32, added_mib: u64) {
        let vcpus = u8::try_from(vcpus).unwrap_or(u8::MAX).min(self.max_vcpus);
        self.vcpus = self.vcpus.max(vcpus);
        self.added_mib = self.added_mib.max(added_mib.min(self.hotplug_mib));
    }

    /// Grows the VM through its agent as [`VmSize::plan`] says for
    /// `resources` (nothing when it holds them); an error names what does
    /// not fit or what the guest refused.
    /// `vmm_pid` is the VMM's host pid (its cgroup's limit in force bounds
    /// the growth).
    pub fn grow_for(
        &mut self,
        agent: &Agent,
        resources: &oci_spec::runtime::LinuxResources,
        vmm_pid: u32,
    ) -> Result<(), String> {
        let Some(growth) = self.plan(resources, crate::cgroup::limits_of(vmm_pid).memory)? else {
            return Ok(());
        };
        let (vcpus, added_mib) = agent
            .resize_vm(growth.vcpus, growth.added_mib)
            .map_err(|e| format!("cannot grow the VM: {e}"))?;
        self.take_reply(vcpus, added_mib);
        log::info!(
            "VM grown: {} vCPUs online (of {}), {} MiB (of {})",
            self.vcpus,
            self.max_vcpus,
            self.memory_mib(),
            self.max_memory_mib()
        );
        if self.added_mib < growth.added_mib {
            return Err(format!(
                "the guest added {} MiB of the {} MiB asked",
                self.added_mib, growth.added_mib
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> oci_spec::runtime::LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_ceiling_is_whole_blocks_above_the_boot_memory() {
        let s = VmSize::new(1, 2, 576, 2048);
        assert_eq!(s.hotplug_mib, 1408 / 128 * 128);
        assert_eq!(s.max_memory_mib(), 576 + 1408 / 128 * 128);
        assert_eq!(VmSize::new(2, 1, 576, 100).max_vcpus, 2);
        assert_eq!(VmSize::new(1, 1, 576, 100).hotplug_mib, 0);
    }

    #[test]
    fn nothing_to_grow_into_is_made_unless_a_cgroup_or_the_configuration_bounds_it() {
        let host = (8, 16384);
        let none = Limits::default();
        let s = VmSize::ceiling_of(1, 256, (None, None), none, host);
        assert_eq!(
            (s.max_vcpus, s.hotplug_mib),
            (1, 0),
            "no bound: the boot size"
        );
        let pod = Limits {
            memory: Some(672 << 20),
            cpus: Some(2),
        };
        let s = VmSize::ceiling_of(1, 576, (None, None), pod, host);
        assert_eq!((s.max_vcpus, s.max_memory_mib()), (8, 576 + 15744));
        let s = VmSize::ceiling_of(1, 256, (Some(2), Some(1536)), none, host);
        assert_eq!((s.max_vcpus, s.max_memory_mib()), (2, 1536));
    }

    #[test]
    fn a_limit_that_fits_needs_nothing_and_a_larger_one_whole_blocks() {
        let s = VmSize::new(1, 2, 576, 2048);
        let fits = resources(r#"{"memory":{"limit":536870912}}"#);
        assert_eq!(s.plan(&fits, None).unwrap(), None);
        let more = resources(r#"{"memory":{"limit":805306368}}"#); // 768 MiB
        assert_eq!(
            s.plan(&more, None).unwrap(),
            Some(Growth {
                vcpus: 1,
                added_mib: 256 // 768 + 64 - 576, in 128 MiB blocks
            })
        );
        let s2 = VmSize {
            added_mib: 256,
            ..s
        };
        assert_eq!(s2.plan(&more, None).unwrap(), None, "already grown");
        assert_eq!(s2.plan(&fits, None).unwrap(), None, "never shrinks");
        let none = resources(r#"{"memory":{"limit":-1}}"#);
        assert_eq!(s.plan(&none, None).unwrap(), None);
    }

    #[test]
    fn beyond_the_ceiling_is_refused_with_the_figures() {
        let s = VmSize::new(1, 2, 576, 1024);
        let e = s
            .plan(&resources(r#"{"memory":{"limit":2147483648}}"#), None)
            .unwrap_err();
        assert!(e.contains("2048 MiB needs a VM of 2112 MiB"), "{e}");
        assert!(e.contains("can grow to 960 MiB"), "{e}");
    }

    #[test]
    fn growth_stays_within_the_cgroup_limit_in_force() {
        let s = VmSize::new(1, 1, 576, 4096);
        let more = resources(r#"{"memory":{"limit":805306368}}"#); // 768 + 64 MiB
        let pod = |mib: u64| Some(mib << 20);
        assert!(s.plan(&more, pod(928)).unwrap().is_some(), "864 MiB fit");
        let e = s.plan(&more, pod(672)).unwrap_err();
        assert!(
            e.contains("this one has 576 MiB and its host cgroup allows it 608 MiB"),
            "{e}"
        );
        // A limit above the ceiling names the configured ceiling.
        let e = s
            .plan(
                &resources(r#"{"memory":{"limit":8589934592}}"#),
                pod(1 << 20),
            )
            .unwrap_err();
        assert!(e.contains("it can grow to 4032 MiB"), "{e}");
    }

    #[test]
    fn a_cpu_quota_brings_vcpus_online_up_to_the_ceiling() {
        let s = VmSize::new(1, 2, 576, 576);
        let two = resources(r#"{"cpu":{"quota":200000,"period":100000}}"#);
        assert_eq!(
            s.plan(&two, None).unwrap(),
            Some(Growth {
                vcpus: 2,
                added_mib: 0
            })
        );
        let eight = resources(r#"{"cpu":{"quota":800000,"period":100000}}"#);
        assert_eq!(s.plan(&eight, None).unwrap().unwrap().vcpus, 2);
        let half = resources(r#"{"cpu":{"quota":50000,"period":100000}}"#);
        assert_eq!(s.plan(&half, None).unwrap(), None);
    }

    #[test]
    fn the_guests_reply_is_held_within_what_the_vmm_made() {
        let mut s = VmSize::new(1, 2, 576, 1088);
        s.take_reply(u32::MAX, u64::MAX);
        assert_eq!((s.vcpus, s.added_mib), (2, 512));
        assert_eq!(s.memory_mib(), 1088);
        s.take_reply(0, 0);
        assert_eq!(
            (s.vcpus, s.added_mib),
            (2, 512),
            "a reply does not shrink it"
        );
    }

    #[test]
    fn an_unknown_size_plans_nothing() {
        let s = VmSize::default();
        let big = resources(r#"{"memory":{"limit":107374182400}}"#);
        assert_eq!(s.plan(&big, None).unwrap(), None);
    }
}

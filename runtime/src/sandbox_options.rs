//! How to start a sandbox ([`Options`]): artefacts, VM size and ceiling,
//! sharing, confinement; made from a bundle and the configuration in one
//! place for `run`, `create` and the containerd shim.

use std::path::PathBuf;

use crate::sandbox::Error;

/// How to start a sandbox.
#[derive(Debug, Clone)]
pub struct Options {
    /// State directory of this sandbox (created; must not exist).
    pub dir: PathBuf,
    /// The id (for messages).
    pub id: crate::oci::ContainerId,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Agent initramfs.
    pub initrd: PathBuf,
    /// vCPUs at boot.
    pub vcpus: u8,
    /// vCPUs the VM may grow to (created offline): the configuration's
    /// `guest.max_vcpus`; unset, see [`crate::vm_size`].
    pub max_vcpus: Option<u8>,
    /// Memory in MiB at boot.
    pub memory_mib: u64,
    /// Memory in MiB the VM may grow to (mapped, added by the guest when
    /// asked): the configuration's `guest.max_memory_mib`; unset, see
    /// [`crate::vm_size`].
    pub max_memory_mib: Option<u64>,
    /// The directory virtiofsd shares.
    pub shared_dir: PathBuf,
    /// virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// virtiofsd's cache mode.
    pub virtiofsd_cache: crate::config::CacheMode,
    /// virtiofsd's thread pool.
    pub virtiofsd_threads: u16,
    /// The VMM jailed, as its own user, under seccomp (see
    /// [`crate::config::Vmm::confine`]).
    pub confine: bool,
    /// Restored from a template ([`crate::template`]) rather than booted
    /// cold: the configuration's `vmm.template`, unless `--no-template`.
    pub template: bool,
    /// Guests give freed memory back ([`crate::config::Vmm::free_page_reporting`]).
    pub free_page_reporting: bool,
    /// How long building a template may take (the boot time-out: the
    /// build is a cold boot to the agent).
    pub template_limit: std::time::Duration,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Log level passed to the VMM (`-v` count).
    pub verbose: u8,
    /// The `sandboxvm` binary that runs the VMM (`sandboxvm boot`); None =
    /// this executable.
    pub vmm_exe: Option<PathBuf>,
    /// The host cgroup of the VMM and virtiofsd, relative to the cgroup
    /// mount ([`crate::cgroup::resolve`]); None: the caller's.
    pub cgroup: Option<PathBuf>,
}

/// What a command line sets over the configuration (`run`'s flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cpus`.
    pub vcpus: Option<u8>,
    /// `--memory`.
    pub memory_mib: Option<u64>,
    /// `-v` count, passed on to the VMM.
    pub verbose: u8,
    /// `--no-template`.
    pub no_template: bool,
}

impl Options {
    /// How to start the sandbox of `bundle` in `dir` under `config`: the
    /// artefacts found ([`crate::artefacts`]), the VM sized from the
    /// bundle's resources and annotations
    /// ([`crate::config::Config::size`]), `flags` over both. The one place
    /// that `run`, `create` and the containerd shim get their options from.
    pub fn for_bundle(
        config: &crate::config::Config,
        dir: PathBuf,
        id: &crate::oci::ContainerId,
        bundle: &crate::bundle::Bundle,
        flags: &Overrides,
    ) -> Result<Options, Error> {
        let size = config
            .size(
                Some(bundle.vcpus()),
                bundle.memory_mib(),
                bundle.annotations(),
            )
            .map_err(Error::Config)?;
        let mut opts = Options::sized(config, dir, id, size, flags)?;
        opts.shared_dir = bundle.rootfs.clone();
        opts.cgroup = bundle.host_cgroup(id)?;
        Ok(opts)
    }

    /// How to start a sandbox of the configuration's default size (a
    /// bundle without resources), `flags` over it: what `sandboxvm template
    /// build` prepares for.
    pub fn for_defaults(
        config: &crate::config::Config,
        flags: &Overrides,
    ) -> Result<Options, Error> {
        let empty = std::collections::HashMap::new();
        let size = config.size(None, None, &empty).map_err(Error::Config)?;
        let id = "template"
            .parse::<crate::oci::ContainerId>()
            .map_err(|e| Error::Config(e.to_string()))?;
        Options::sized(config, PathBuf::new(), &id, size, flags)
    }

    fn sized(
        config: &crate::config::Config,
        dir: PathBuf,
        id: &crate::oci::ContainerId,
        size: crate::config::Size,
        flags: &Overrides,
    ) -> Result<Options, Error> {
        let vcpus = flags.vcpus.unwrap_or(size.vcpus);
        let memory_mib = flags.memory_mib.unwrap_or(size.memory_mib);
        Ok(Options {
            dir,
            id: id.clone(),
            kernel: crate::artefacts::kernel(
                flags.kernel.as_deref(),
                config.guest.kernel.as_deref(),
            )?,
            initrd: crate::artefacts::initrd(
                flags.initrd.as_deref(),
                config.guest.initrd.as_deref(),
            )?,
            vcpus,
            max_vcpus: config.guest.max_vcpus,
            memory_mib,
            max_memory_mib: config.guest.max_memory_mib,
            shared_dir: PathBuf::new(),
            virtiofsd: crate::artefacts::virtiofsd(config.virtiofsd.path.as_deref())?,
            virtiofsd_cache: config.virtiofsd.cache,
            virtiofsd_threads: config.virtiofsd.thread_pool_size,
            confine: config.vmm.confine,
            template: config.vmm.template && !flags.no_template,
            free_page_reporting: config.vmm.free_page_reporting,
            template_limit: crate::timeouts::Timeouts::default().boot,
            cmdline: size.kernel_params,
            verbose: flags.verbose,
            vmm_exe: None,
            cgroup: None,
        })
    }
}

/// The host's CPUs this process may use.
pub fn host_cpus() -> u8 {
    std::thread::available_parallelism().map_or(1, |n| u8::try_from(n.get()).unwrap_or(u8::MAX))
}

/// The host's memory, MiB (`MemTotal`), or u64::MAX if unknown.
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib / 1024)
}

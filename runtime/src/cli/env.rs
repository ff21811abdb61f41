//! `sandboxvm env`: the configuration in force and the host's facts, as
//! TOML (or JSON), for a bug report or a check after editing the file.

use std::collections::BTreeMap;

use clap::Args;
use serde::Serialize;

use sandboxvm::config::Config;

/// Prints the configuration in force (the file's values over the
/// defaults), what a sandbox would use from it, the `SANDBOXVM_*`
/// variables that override it, and the host's facts.
#[derive(Debug, Args)]
pub struct Env {
    /// JSON instead of TOML.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    runtime: Runtime,
    resolved: Resolved,
    host: Host,
    /// The `SANDBOXVM_*` variables set (they override the file).
    environment: BTreeMap<String, String>,
    config: Config,
}

#[derive(Serialize)]
struct Runtime {
    version: &'static str,
    /// The file read, or "" for the built-in defaults.
    config_file: String,
    state_root: String,
}

/// What a sandbox started now would use (an artefact that cannot be found
/// shows the reason instead of a path).
#[derive(Serialize)]
struct Resolved {
    kernel: String,
    initrd: String,
    virtiofsd: String,
    max_vcpus: u8,
    /// Absent: no maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_memory_mib: Option<u64>,
    boot_timeout_secs: f64,
    agent_timeout_secs: f64,
}

#[derive(Serialize)]
struct Host {
    kernel_release: String,
    kvm: String,
    boots_standard_guests: bool,
    cpus: usize,
    memory_mib: u64,
    cgroup: &'static str,
    /// Whether shared memory may use huge pages (`shmem_enabled`).
    shmem_huge_pages: String,
}

impl Env {
    pub fn run(self, g: &super::Globals) -> anyhow::Result<i32> {
        let loaded = g.config()?;
        let c = &loaded.config;
        let shown = |r: Result<std::path::PathBuf, sandboxvm::artefacts::Error>| match r {
            Ok(p) => p.display().to_string(),
            Err(e) => format!("(not found: {e})"),
        };
        let timeouts = sandboxvm::timeouts::Timeouts::configured(&c.timeouts)?;
        let kvm = vmm::host::detect();
        let report = Report {
            runtime: Runtime {
                version: env!("CARGO_PKG_VERSION"),
                config_file: loaded
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                state_root: g.root.display().to_string(),
            },
            resolved: Resolved {
                kernel: shown(sandboxvm::artefacts::kernel(
                    None,
                    c.guest.kernel.as_deref(),
                )),
                initrd: shown(sandboxvm::artefacts::initrd(
                    None,
                    c.guest.initrd.as_deref(),
                )),
                virtiofsd: shown(sandboxvm::artefacts::virtiofsd(c.virtiofsd.path.as_deref())),
                max_vcpus: c.max_vcpus(),
                max_memory_mib: c.guest.max_memory_mib,
                boot_timeout_secs: timeouts.boot.as_secs_f64(),
                agent_timeout_secs: timeouts.call.as_secs_f64(),
            },
            host: Host {
                kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                kvm: match &kvm {
                    vmm::host::HostKvm::Hardware { technology, module } => {
                        format!("{technology} ({module})")
                    }
                    vmm::host::HostKvm::Pvm => "PVM (kvm_pvm)".into(),
                    vmm::host::HostKvm::Unknown => "unknown".into(),
                    vmm::host::HostKvm::Missing(why) => format!("missing: {why}"),
                },
                boots_standard_guests: kvm.boots_standard_guests(),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
                memory_mib: sandboxvm::sandbox_options::host_memory_mib(),
                cgroup: if sandboxvm::cgroup::have_cgroup2() {
                    "v2"
                } else {
                    "v1"
                },
                shmem_huge_pages: match vmm::memory::shmem_huge_pages() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "unknown".into(),
                },
            },
            environment: std::env::vars()
                .filter(|(k, _)| k.starts_with("SANDBOXVM_"))
                .collect(),
            config: loaded.config.clone(),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", toml::to_string(&report)?);
        }
        Ok(0)
    }
}

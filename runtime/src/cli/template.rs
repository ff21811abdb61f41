//! `sandboxvm template`: the saved guests sandboxes are restored from.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use sandboxvm::sandbox::{Options, Overrides};
use sandboxvm::template::Store;

use super::Globals;

/// List, build or remove templates (saved guests that sandboxes restore
/// instead of booting their kernel; built on first use, kept under the
/// cache directory).
#[derive(Debug, Args)]
pub struct Template {
    #[command(subcommand)]
    pub action: Action,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// List the templates: key, vCPUs, memory, size on disk, age, kernel.
    #[command(alias = "ls")]
    List,
    /// Build the template of a sandbox of the configuration's default size
    /// without network (what `run` of a bundle without resources restores),
    /// unless it is there already; print its key and directory.
    Build {
        /// Guest kernel (default: the configuration's or the installed one).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Agent initramfs.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u8>,
        /// Guest memory in MiB.
        #[arg(long)]
        memory: Option<u64>,
    },
    /// Remove template KEY, or all with --all.
    Rm {
        /// The template's key (`template list`).
        #[arg(required_unless_present = "all")]
        key: Option<String>,
        /// Every template.
        #[arg(long, conflicts_with = "key")]
        all: bool,
    },
}

impl Template {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let store = Store::open()?;
        match self.action {
            Action::List => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                println!(
                    "{:<16}  {:>5}  {:>11}  {:>8}  {:>8}  KERNEL",
                    "KEY", "VCPUS", "MEMORY MiB", "DISK MiB", "AGE"
                );
                for t in store.list()? {
                    println!(
                        "{:<16}  {:>5}  {:>11}  {:>8}  {:>8}  {}",
                        t.key,
                        format!("{}/{}", t.vcpus.0, t.vcpus.1),
                        format!("{}+{}", t.memory_mib.0, t.memory_mib.1),
                        t.bytes >> 20,
                        age(now.saturating_sub(t.built)),
                        t.kernel.display()
                    );
                }
                Ok(0)
            }
            Action::Build {
                kernel,
                initrd,
                cpus,
                memory,
            } => {
                let config = &g.config()?.config;
                let flags = Overrides {
                    kernel,
                    initrd,
                    vcpus: cpus,
                    memory_mib: memory,
                    verbose: g.verbose,
                    no_template: false,
                };
                let opts = Options::for_defaults(config, &flags)?;
                let size = sandboxvm::vm_size::VmSize::ceiling(
                    &opts,
                    opts.memory_mib,
                    sandboxvm::cgroup::Limits::default(),
                );
                let vm = sandboxvm::sandbox::vmm_config(&opts, opts.memory_mib, size, Vec::new());
                let exe = std::env::current_exe().context("this executable")?;
                let limit = sandboxvm::timeouts::Timeouts::configured(&config.timeouts)?.boot;
                let with = sandboxvm::template::Builder {
                    exe: &exe,
                    verbose: g.verbose,
                    limit,
                };
                let dir = store.get_or_build(&vm, &with)?;
                println!("{}", dir.display());
                Ok(0)
            }
            Action::Rm { key, all: _ } => {
                let n = store.remove(key.as_deref())?;
                if key.is_none() {
                    println!("{n} templates removed");
                }
                Ok(0)
            }
        }
    }
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

//! `sandboxvm spec`: writes a default config.json, like `runc spec`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// Writes a starting config.json in the bundle directory: `sh` in a
/// terminal, as `runc spec` does. Edit process.args to run something else.
#[derive(Debug, Args)]
pub struct SpecCmd {
    /// The bundle directory.
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
    /// Overwrite an existing config.json.
    #[arg(long)]
    pub force: bool,
    /// runc's rootless spec: a user namespace in the guest whose root is
    /// the caller's uid and gid, no network namespace of its own.
    #[arg(long)]
    pub rootless: bool,
}

impl SpecCmd {
    pub fn run(self) -> anyhow::Result<i32> {
        let path = self.bundle.join("config.json");
        anyhow::ensure!(
            self.force || !path.exists(),
            "{} exists already (--force overwrites it)",
            path.display()
        );
        let spec = if self.rootless {
            oci_spec::runtime::Spec::rootless(
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
        } else {
            oci_spec::runtime::Spec::default()
        };
        let json = serde_json::to_string_pretty(&spec).context("cannot encode the spec")?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(0)
    }
}

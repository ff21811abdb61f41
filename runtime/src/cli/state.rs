//! `sandboxvm state`: the OCI state of a container as JSON (runc state).

use clap::Args;
use sandboxvm::oci::ContainerId;

use super::Globals;
use sandboxvm::oci::Record;

/// Prints the state of container ID: ociVersion, id, status
/// (created/running/paused/stopped), pid, bundle, annotations.
#[derive(Debug, Args)]
pub struct State {
    /// The container id.
    pub id: ContainerId,
}

impl State {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        let status = record.status(&g.root);
        println!(
            "{}",
            serde_json::to_string_pretty(&record.oci_state(status))?
        );
        Ok(0)
    }
}

/// The hooks of the container's spec, if its bundle is still readable.
pub fn spec_hooks(record: &Record) -> Option<oci_spec::runtime::Hooks> {
    let text = std::fs::read_to_string(record.bundle.join("config.json")).ok()?;
    let spec: oci_spec::runtime::Spec = serde_json::from_str(&text).ok()?;
    spec.hooks().clone()
}

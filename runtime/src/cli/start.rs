//! `sandboxvm start`: starts a created container's process (runc start).

use clap::Args;
use sandboxvm::oci::ContainerId;

use super::Globals;
use sandboxvm::oci::{hooks, Record, Status};

/// Starts the process of created container ID; poststart hooks run after.
#[derive(Debug, Args)]
pub struct Start {
    /// The container id.
    pub id: ContainerId,
}

impl Start {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        match record.status(&g.root) {
            Status::Created => {}
            Status::Stopped => anyhow::bail!("cannot start a container that has stopped"),
            Status::Running => anyhow::bail!("cannot start an already running container"),
            Status::Paused => anyhow::bail!("cannot start a paused container"),
        }
        record.agent(&g.root)?.start(&self.id)?;
        let _ = std::fs::write(record.dir(&g.root).join("started"), "");
        if let Some(h) = super::state::spec_hooks(&record) {
            let st = record.oci_state(Status::Running).to_string();
            hooks::run_each("poststart", h.poststart().as_deref().unwrap_or(&[]), &st);
        }
        Ok(0)
    }
}

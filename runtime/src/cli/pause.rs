//! `sandboxvm pause` / `resume`: stop and continue the container's VM (its
//! vCPUs and device threads), like runc's freezer.

use clap::Args;
use sandboxvm::oci::ContainerId;

use super::Globals;
use sandboxvm::oci::{state, Record, Status};

/// Pauses container ID: its VMM process is stopped, so its vCPUs stop.
#[derive(Debug, Args)]
pub struct Pause {
    /// The container id.
    pub id: ContainerId,
}

/// Resumes paused container ID.
#[derive(Debug, Args)]
pub struct Resume {
    /// The container id.
    pub id: ContainerId,
}

impl Pause {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        match record.status(&g.root) {
            Status::Running => set_paused(&record, g, true)?,
            Status::Paused => anyhow::bail!("container {} is already paused", self.id),
            _ => anyhow::bail!("container not running"),
        }
        Ok(0)
    }
}

impl Resume {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        anyhow::ensure!(
            record.status(&g.root) == Status::Paused,
            "container not paused"
        );
        set_paused(&record, g, false)?;
        Ok(0)
    }
}

/// Stops (SIGSTOP) or continues (SIGCONT) the VMM and records it.
pub fn set_paused(record: &Record, g: &Globals, paused: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        record.vmm_pid > 0 && state::start_time(record.vmm_pid).is_some(),
        "container {}: its VM is not running",
        record.id
    );
    let marker = record.dir(&g.root).join("paused");
    let sig = if paused {
        std::fs::write(&marker, "")?;
        libc::SIGSTOP
    } else {
        libc::SIGCONT
    };
    // SAFETY: kill(2) on the VMM's pid, checked alive above.
    if unsafe { libc::kill(record.vmm_pid, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&marker);
        anyhow::bail!("cannot signal the VMM: {e}");
    }
    if !paused {
        let _ = std::fs::remove_file(&marker);
    }
    Ok(())
}

//! `sandboxvm kill`: sends a signal to a container's process (runc kill).

use sandboxvm::oci::ContainerId;
use std::str::FromStr;

use clap::Args;
use nix::sys::signal::Signal;

use super::Globals;
use sandboxvm::oci::{Record, Status};

/// Sends SIGNAL (name or number, default SIGTERM) to the init process of
/// container ID, or with --all to all its processes.
#[derive(Debug, Args)]
pub struct Kill {
    /// The container id.
    pub id: ContainerId,
    /// The signal: KILL, SIGKILL or 9.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
    /// Signal every process of the container.
    #[arg(long, short)]
    pub all: bool,
}

/// A signal by number, name or SIG-name.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| anyhow::anyhow!("invalid signal {s:?}"));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    Signal::from_str(&name)
        .map(|sig| sig as i32)
        .map_err(|_| anyhow::anyhow!("invalid signal {s:?}"))
}

impl Kill {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let sig = parse_signal(&self.signal)?;
        let record = Record::load(&g.root, &self.id)?;
        match record.status(&g.root) {
            Status::Stopped => anyhow::bail!("container not running"),
            // The signal is delivered once the vCPUs run again.
            Status::Paused => super::pause::set_paused(&record, g, false)?,
            Status::Created | Status::Running => {}
        }
        record
            .agent(&g.root)?
            .signal_all(&self.id, "", sig, self.all)?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_number_name_and_signame() {
        assert_eq!(parse_signal("9").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}

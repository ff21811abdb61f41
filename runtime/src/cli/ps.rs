//! `sandboxvm ps`: the processes of a container (runc ps). Pids are the
//! guest's: the container's processes are not host processes.

use clap::{Args, ValueEnum};
use sandboxvm::oci::ContainerId;

use super::Globals;
use sandboxvm::oci::Record;

/// Output format of ps and list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table.
    Table,
    /// JSON.
    Json,
}

/// Lists the processes of container ID (guest pids).
#[derive(Debug, Args)]
pub struct Ps {
    /// table or json (a list of pids).
    #[arg(long, short, value_enum, default_value = "table")]
    pub format: Format,
    /// The container id.
    pub id: ContainerId,
    /// Accepted for runc compatibility (ps options); ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

impl Ps {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        let procs = record.live_agent(&g.root)?.processes(&self.id)?;
        match self.format {
            Format::Json => {
                let pids: Vec<u32> = procs.iter().map(|p| p.0).collect();
                println!("{}", serde_json::to_string(&pids)?);
            }
            Format::Table => {
                println!("{:>7} {:>7} CMD", "PID", "PPID");
                for (pid, ppid, cmd) in procs {
                    println!("{pid:>7} {ppid:>7} {cmd}");
                }
            }
        }
        Ok(0)
    }
}

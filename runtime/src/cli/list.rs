//! `sandboxvm list`: the containers under --root (runc list).

use clap::Args;

use super::ps::Format;
use super::Globals;
use sandboxvm::oci::state;

/// Lists containers: ID, PID, STATUS, BUNDLE, CREATED.
#[derive(Debug, Args)]
pub struct List {
    /// table or json.
    #[arg(long, short, value_enum, default_value = "table")]
    pub format: Format,
    /// Ids only.
    #[arg(long, short)]
    pub quiet: bool,
}

impl List {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let records = state::list(&g.root);
        if self.quiet {
            for r in &records {
                println!("{}", r.id);
            }
            return Ok(0);
        }
        let states: Vec<serde_json::Value> = records
            .iter()
            .map(|r| r.oci_state(r.status(&g.root)))
            .collect();
        match self.format {
            Format::Json => println!("{}", serde_json::to_string(&states)?),
            Format::Table => {
                println!(
                    "{:<20} {:>8} {:<8} {:<40} CREATED",
                    "ID", "PID", "STATUS", "BUNDLE"
                );
                for s in states {
                    println!(
                        "{:<20} {:>8} {:<8} {:<40} {}",
                        s["id"].as_str().unwrap_or(""),
                        s["pid"],
                        s["status"].as_str().unwrap_or(""),
                        s["bundle"].as_str().unwrap_or(""),
                        s["created"].as_str().unwrap_or(""),
                    );
                }
            }
        }
        Ok(0)
    }
}

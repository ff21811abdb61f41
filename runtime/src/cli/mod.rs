//! Command-line interface: one clap struct per subcommand, one file each.

mod boot;
mod check;
mod run;
mod spec;

use clap::{Parser, Subcommand};

/// sandboxvm: runs containers in lightweight KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "sandboxvm", version, about)]
pub struct Cli {
    /// More output: -v one line per phase, -vv debug.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel in a micro-VM (low-level; for debugging and benchmarks).
    Boot(boot::Boot),
    /// Tell whether this host can boot sandboxvm guests.
    Check(check::Check),
    /// Run a container from an OCI bundle in its own micro-VM.
    Run(run::Run),
    /// Write a default config.json (like runc spec).
    Spec(spec::SpecCmd),
}

impl Command {
    /// Runs the subcommand; returns the process exit code.
    pub fn run(self, verbose: u8) -> anyhow::Result<i32> {
        match self {
            Command::Run(c) => c.run(verbose),
            Command::Spec(c) => c.run(),
            Command::Boot(c) => c.run(),
            Command::Check(c) => c.run(),
        }
    }
}

//! Command-line interface: one clap struct per subcommand, one file each.
//! The OCI lifecycle commands take runc's flags, so that containerd's runc
//! shim, podman/conmon and scripts can call `sandboxvm` as they call runc.

mod attach;
mod boot;
mod check;
mod create;
mod delete;
mod env;
mod events;
mod exec;
mod features;
mod kill;
mod list;
mod monitor;
mod pause;
mod ps;
mod run;
mod spec;
mod start;
mod state;
mod template;
mod update;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// sandboxvm: runs containers in lightweight KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "sandboxvm", version, about)]
pub struct Cli {
    /// More output: -v one line per phase, -vv debug.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Directory for container state.
    #[arg(long, global = true, default_value = "/run/sandboxvm")]
    pub root: PathBuf,
    /// Write log messages (and a failure's message) to this file instead
    /// of stderr.
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Log format: text or json (one JSON object per line, as runc writes).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Accepted for runc compatibility: a systemd `slice:prefix:name`
    /// cgroupsPath is recognised by its form.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Same as -vv (runc compatibility).
    #[arg(long, global = true)]
    pub debug: bool,
    /// The configuration file (default: $SANDBOXVM_CONFIG, else
    /// /etc/sandboxvm/config.toml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Accepted for runc compatibility (before the command, as runc has it:
    /// `spec --rootless` is spec's own flag).
    #[arg(long, hide = true)]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, hide = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain lines.
    Text,
    /// JSON lines: {"level","msg","time"}.
    Json,
}

/// Options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Globals {
    /// `-v` count.
    pub verbose: u8,
    /// State root.
    pub root: PathBuf,
    /// Log file.
    pub log: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// The configuration file (`--config`, `$SANDBOXVM_CONFIG` or the
    /// default), read once; its error is reported by the commands that need
    /// it: a broken file must not stop `delete` or `kill`.
    pub config: Result<sandboxvm::config::Loaded, String>,
}

impl Globals {
    /// The global flags again, for a re-executed `sandboxvm` (the monitor).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--root".into(), self.root.clone().into()];
        if self.verbose > 0 {
            a.push(format!("-{}", "v".repeat(self.verbose.into())).into());
        }
        if let Some(log) = &self.log {
            a.push("--log".into());
            a.push(log.clone().into());
        }
        if self.log_format == LogFormat::Json {
            a.push("--log-format=json".into());
        }
        // --config reaches the monitor as $SANDBOXVM_CONFIG (main sets it).
        a
    }

    /// The configuration in force ([`sandboxvm::config`]), or the error
    /// loading it.
    pub fn config(&self) -> anyhow::Result<&sandboxvm::config::Loaded> {
        self.config.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel in a micro-VM (low-level; for debugging and benchmarks).
    Boot(boot::Boot),
    /// Tell whether this host can boot sandboxvm guests.
    Check(check::Check),
    /// Print the configuration in force and the host's facts (TOML, or
    /// JSON with --json).
    Env(env::Env),
    /// Run a container from an OCI bundle in its own micro-VM.
    Run(run::Run),
    /// Write a default config.json (like runc spec).
    Spec(spec::SpecCmd),
    /// Print what this runtime implements (the runtime-spec's features
    /// JSON, like runc features).
    Features(features::Features),
    /// Create a container: boot its VM and create the process, not started.
    Create(create::Create),
    /// Start the process of a created container.
    Start(start::Start),
    /// Print a container's state (OCI state JSON).
    State(state::State),
    /// Send a signal to a container's process (default SIGTERM).
    Kill(kill::Kill),
    /// Delete a stopped (or, with --force, any) container and its VM.
    Delete(delete::Delete),
    /// Run another process in a running container.
    Exec(exec::Exec),
    /// List the processes of a container.
    Ps(ps::Ps),
    /// List containers.
    #[command(alias = "ls")]
    List(list::List),
    /// List, build or remove the templates sandboxes are restored from.
    Template(template::Template),
    /// Print a container's resource usage (--stats once, else periodically).
    Events(events::Events),
    /// Update a container's resource limits (its cgroup in the guest).
    Update(update::Update),
    /// Pause a container's VM (its vCPUs stop).
    Pause(pause::Pause),
    /// Resume a paused container's VM.
    Resume(pause::Resume),
    /// (internal) The process that holds a container's VM and stands for
    /// its process on the host.
    #[command(name = "_monitor", hide = true)]
    Monitor(monitor::Monitor),
}

impl Command {
    /// Whether this command's stderr belongs to a container (the monitor):
    /// its own messages must not go there.
    pub fn is_monitor(&self) -> bool {
        matches!(self, Command::Monitor(_))
    }

    /// Runs the subcommand; returns the process exit code.
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        match self {
            Command::Run(c) => c.run(g),
            Command::Spec(c) => c.run(),
            Command::Features(c) => c.run(),
            Command::Boot(c) => c.run(),
            Command::Check(c) => c.run(),
            Command::Env(c) => c.run(g),
            Command::Create(c) => c.run(g),
            Command::Start(c) => c.run(g),
            Command::State(c) => c.run(g),
            Command::Kill(c) => c.run(g),
            Command::Delete(c) => c.run(g),
            Command::Exec(c) => c.run(g),
            Command::Ps(c) => c.run(g),
            Command::List(c) => c.run(g),
            Command::Events(c) => c.run(g),
            Command::Template(c) => c.run(g),
            Command::Update(c) => c.run(g),
            Command::Pause(c) => c.run(g),
            Command::Resume(c) => c.run(g),
            Command::Monitor(c) => c.run(g),
        }
    }
}

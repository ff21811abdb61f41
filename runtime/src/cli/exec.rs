//! `sandboxvm exec`: runs another process in a running container (runc
//! exec), attached, or with --detach under a monitor whose pid stands for it.

use sandboxvm::oci::ContainerId;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use oci_spec::runtime::{Process, Spec, User};

use super::attach::HostIo;
use super::Globals;
use sandboxvm::oci::{console, Record};
use sandboxvm::signals::Forwarder;

/// Runs COMMAND (or --process) in container ID and exits with its status;
/// with --detach returns once it runs, its host pid in --pid-file.
#[derive(Debug, Args)]
pub struct Exec {
    /// An OCI Process JSON file (instead of COMMAND and the flags below).
    #[arg(long, short)]
    pub process: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short)]
    pub tty: bool,
    /// Return once the process runs.
    #[arg(long, short)]
    pub detach: bool,
    /// Write the process's host pid here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// A Unix socket that receives the terminal's master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Extra environment, KEY=VALUE (repeatable).
    #[arg(long, short)]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// UID[:GID] to run as.
    #[arg(long, short)]
    pub user: Option<String>,
    /// Additional groups (repeatable).
    #[arg(long = "additional-gids", short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Add a capability to the process's bounding, effective, permitted and
    /// inheritable sets (repeatable), e.g. CAP_NET_ADMIN.
    #[arg(long, short = 'c')]
    pub cap: Vec<String>,
    /// An SELinux label: refused, the guest kernel has no SELinux.
    #[arg(long)]
    pub process_label: Option<String>,
    /// An AppArmor profile: refused, the guest kernel has no AppArmor.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility; extra fds are not passed to the guest.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility (a paused container refuses exec).
    #[arg(long)]
    pub ignore_paused: bool,
    /// Accepted for runc compatibility: exec'd processes join the
    /// container's cgroup in the guest.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// The container id.
    pub id: ContainerId,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

impl Exec {
    fn process_json(&self, record: &Record) -> anyhow::Result<String> {
        if let Some(path) = &self.process {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let _: Process = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed process", path.display()))?;
            return Ok(text);
        }
        anyhow::ensure!(!self.command.is_empty(), "exec needs a command");
        let config = record.bundle.join("config.json");
        let spec: Spec = serde_json::from_str(
            &std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?,
        )
        .with_context(|| format!("{}: malformed config", config.display()))?;
        let mut p = spec.process().clone().unwrap_or_default();
        p.set_args(Some(self.command.clone()));
        p.set_terminal(Some(self.tty));
        let mut env = p.env().clone().unwrap_or_default();
        env.extend(self.env.iter().cloned());
        p.set_env(Some(env));
        if let Some(cwd) = &self.cwd {
            p.set_cwd(cwd.into());
        }
        if let Some(u) = &self.user {
            let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
            let mut user = User::default();
            user.set_uid(uid.parse().context("--user: UID[:GID]")?);
            user.set_gid(gid.parse().context("--user: UID[:GID]")?);
            p.set_user(user);
        }
        if !self.additional_gids.is_empty() {
            let mut user = p.user().clone();
            user.set_additional_gids(Some(self.additional_gids.clone()));
            p.set_user(user);
        }
        if self.no_new_privs {
            p.set_no_new_privileges(Some(true));
        }
        if !self.cap.is_empty() {
            let mut caps = p.capabilities().clone().unwrap_or_default();
            for name in &self.cap {
                let cap: oci_spec::runtime::Capability =
                    serde_json::from_value(name.to_ascii_uppercase().into())
                        .map_err(|_| anyhow::anyhow!("--cap {name}: not a capability"))?;
                let with = |set: &Option<oci_spec::runtime::Capabilities>| {
                    let mut set = set.clone().unwrap_or_default();
                    set.insert(cap);
                    Some(set)
                };
                let (b, e, p_, i) = (
                    with(caps.bounding()),
                    with(caps.effective()),
                    with(caps.permitted()),
                    with(caps.inheritable()),
                );
                caps.set_bounding(b)
                    .set_effective(e)
                    .set_permitted(p_)
                    .set_inheritable(i);
            }
            p.set_capabilities(Some(caps));
        }
        Ok(serde_json::to_string(&p)?)
    }

    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        for (flag, v) in [
            ("--apparmor", &self.apparmor),
            ("--process-label", &self.process_label),
        ] {
            anyhow::ensure!(
                v.as_deref().unwrap_or_default().is_empty(),
                "{flag}: the guest kernel has no AppArmor or SELinux to apply it"
            );
        }
        let record = Record::load(&g.root, &self.id)?;
        let json = self.process_json(&record)?;
        let exec_id = format!(
            "exec-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        if self.detach {
            let file = record.dir(&g.root).join(format!("{exec_id}.json"));
            std::fs::write(&file, &json)
                .with_context(|| format!("cannot write {}", file.display()))?;
            let mut args: Vec<std::ffi::OsString> = vec![
                "--id".into(),
                self.id.as_str().into(),
                "--exec-id".into(),
                exec_id.into(),
                "--process".into(),
                file.clone().into(),
            ];
            if let Some(s) = &self.console_socket {
                args.push("--console-socket".into());
                args.push(std::path::absolute(s)?.into());
            }
            let pid = super::monitor::spawn(g, args);
            let _ = std::fs::remove_file(&file);
            if let Some(path) = &self.pid_file {
                super::create::write_pid_file(path, pid?)?;
            } else {
                pid?;
            }
            return Ok(0);
        }
        let signals = Forwarder::install()?;
        let console_socket = self.console_socket.clone();
        let mut raw = None;
        let io = |terminal: bool| -> anyhow::Result<HostIo> {
            if terminal {
                if let Some(s) = &console_socket {
                    return Ok(HostIo::pty(console::send_to_socket(s)?.slave)?);
                }
                raw = sandboxvm::tty::RawMode::enter_stdin();
            }
            Ok(HostIo::inherited(terminal)?)
        };
        let status =
            super::monitor::run_exec(&record, g, &exec_id, &json, io, &mut None, &signals)?;
        drop(raw);
        Ok(status)
    }
}

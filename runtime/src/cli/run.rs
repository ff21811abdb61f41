//! `sandboxvm run`: runs an OCI bundle's process in a fresh micro-VM, like
//! `runc run`, and exits with its status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::attach::{attach, HostIo};
use crate::bundle::Bundle;
use crate::sandbox::{Options, Overrides, Sandbox, ROOTFS_TAG};
use crate::timeouts::Timeouts;
use crate::tty;
use sandboxvm::agent::Agent;
use sandboxvm::oci::ContainerId;
use sandboxvm::sandbox_boot::{Booted, NetworkPlan};
use sandboxvm::share;

/// Runs the container in BUNDLE (config.json + rootfs) inside its own VM,
/// forwarding stdio (or a terminal) and signals, and exits with the
/// container's status (128+N if a signal ended it).
#[derive(Debug, Args)]
pub struct Run {
    /// The bundle directory (default: the current directory).
    #[arg(long, short)]
    pub bundle: Option<PathBuf>,
    /// `[DIR] [ID]`: the bundle directory and the container id (default:
    /// generated); with --bundle, as runc has it, the one argument is the ID,
    /// as it is without --bundle in a bundle directory (`runc run ID`).
    #[arg(value_name = "DIR|ID", num_args = 0..=2)]
    pub args: Vec<String>,
    /// Guest kernel (default: $SANDBOXVM_KERNEL, the configuration's guest.kernel, the build cache, /usr/share/sandboxvm).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs with the agent (default: $SANDBOXVM_INITRD, the configuration's guest.initrd, the build cache, /usr/share/sandboxvm).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// vCPUs (default: from linux.resources.cpu, at least the configuration's default_vcpus, at most its max_vcpus).
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Guest memory in MiB (default: linux.resources.memory.limit + 64, at least the configuration's default_memory_mib).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Seconds to wait for the guest agent (default: $SANDBOXVM_BOOT_TIMEOUT,
    /// the configuration's timeouts.boot_secs, or 60; times the scale).
    #[arg(long)]
    pub boot_timeout: Option<u64>,
    /// Boot the kernel cold instead of restoring the VM from a template
    /// (templates are built on first use and kept under the cache
    /// directory; see `sandboxvm template`).
    #[arg(long)]
    pub no_template: bool,
    /// The container's network: `none` (loopback only), `host-netns` (the
    /// network namespace named in the spec, e.g. made by CNI: its
    /// interfaces, addresses, routes and MTU mirrored into the VM through
    /// taps and tc), or `tap=NAME` (an existing tap of this namespace,
    /// attached as the guest's eth0, not configured).
    #[arg(long, value_name = "none|host-netns|tap=NAME", default_value = "none", value_parser = parse_net_mode)]
    pub net: NetMode,
    /// Return once the container runs (create, then start), leaving it to
    /// `state`, `kill` and `delete`.
    #[arg(long, short)]
    pub detach: bool,
    /// Keep the container's state after it exits (`delete` removes it).
    #[arg(long)]
    pub keep: bool,
    /// Accepted for runc compatibility (the monitor reaps what it starts).
    #[arg(long)]
    pub no_subreaper: bool,
    #[command(flatten)]
    pub runc: super::create::RuncCreateFlags,
}

/// How a container gets its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// Loopback only (a namespace of its own in the guest).
    None,
    /// The spec's network namespace on the host, mirrored into the VM.
    HostNetns,
    /// An existing tap in the runtime's namespace, not configured.
    Tap(String),
}

fn parse_net_mode(s: &str) -> Result<NetMode, String> {
    match s {
        "none" => Ok(NetMode::None),
        "host-netns" => Ok(NetMode::HostNetns),
        _ => match s.strip_prefix("tap=") {
            Some(name) if !name.is_empty() && name.len() < 16 && !name.contains(',') => {
                Ok(NetMode::Tap(name.to_string()))
            }
            _ => Err(format!(
                "expected none, host-netns or tap=NAME (NAME up to 15 bytes), got {s:?}"
            )),
        },
    }
}

/// The guest network `mode` asks for.
pub(crate) fn network_plan(bundle: &Bundle, mode: &NetMode) -> anyhow::Result<NetworkPlan> {
    Ok(match mode {
        NetMode::None => NetworkPlan::None,
        NetMode::Tap(tap) => NetworkPlan::Tap(tap.clone()),
        NetMode::HostNetns => NetworkPlan::Netns(sandboxvm::net::spec_netns(&bundle.spec).context(
            "--net host-netns: the spec's linux.namespaces has no network namespace with a path",
        )?),
    })
}

/// The `fill` of [`Sandbox::boot`] for a one-container sandbox: the
/// bundle's rootfs and binds in the shared directory; the guest's spec.
pub(crate) fn share_bundle<'a>(
    bundle: &'a Bundle,
    id: &'a str,
    plan: &'a NetworkPlan,
) -> impl FnOnce(&Path) -> Result<(PathBuf, String), sandboxvm::sandbox::Error> + 'a {
    move |dir| {
        let (share, spec_json) = share::share_bundle(
            &dir.join("shared"),
            ROOTFS_TAG,
            bundle,
            id,
            plan.guest_netns(),
        )?;
        Ok((share.served()?, spec_json))
    }
}

impl Run {
    pub fn run(self, g: &super::Globals) -> anyhow::Result<i32> {
        let verbose = g.verbose;
        let (dir, id) = bundle_and_id(self.bundle.clone(), &self.args)?;
        if self.detach
            || self.keep
            || self.runc.pid_file.is_some()
            || self.runc.console_socket.is_some()
        {
            return self.through_create(g, dir, id);
        }
        let bundle = Bundle::load(&dir)?;
        log::debug!(
            "bundle {}, rootfs {}",
            bundle.dir.display(),
            bundle.rootfs.display()
        );
        let id = match id {
            Some(id) => id,
            None => ContainerId::new(&format!(
                "sbx-{}-{}",
                std::process::id(),
                now_ms() % 100_000
            ))?,
        };
        let config = &g.config()?.config;
        sandboxvm::private::create_dir_all(&g.root)
            .with_context(|| format!("cannot create {}", g.root.display()))?;

        let timeouts = Timeouts::with_boot_flag(&config.timeouts, self.boot_timeout)?;
        // Signals are collected from here on, so that Ctrl-C during boot
        // still tears everything down.
        let signals = crate::signals::Forwarder::install()?;
        let flags = Overrides {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            vcpus: self.cpus,
            memory_mib: self.memory,
            verbose,
            no_template: self.no_template,
        };
        let opts = Options::for_bundle(
            config,
            sandboxvm::oci::state::dir(&g.root, &id),
            &id,
            &bundle,
            &flags,
        )?;
        let plan = network_plan(&bundle, &self.net)?;
        // Ctrl-C (or any forwarded signal) while the VM boots ends the run.
        let interrupted = || signals.pending().into_iter().find(|&s| s != libc::SIGWINCH);
        let booted = Sandbox::boot(
            &opts,
            &plan,
            share_bundle(&bundle, &id, &plan),
            &timeouts,
            interrupted,
        )?;
        let Booted {
            mut sandbox,
            agent,
            filled: spec_json,
        } = booted;
        let result = run_in(&mut sandbox, &agent, &bundle, &spec_json, &id, &signals);
        if result.is_err() {
            for line in sandbox.console_tail(20) {
                log::info!("guest console: {line}");
            }
        }
        result
    }
}

impl Run {
    /// `run` with runc's lifecycle flags: `create` and `start` (the
    /// container's monitor stands for it, as after `create`); without
    /// --detach, waits for it, passing signals on, and without --keep
    /// deletes it.
    fn through_create(
        self,
        g: &super::Globals,
        dir: PathBuf,
        id: Option<ContainerId>,
    ) -> anyhow::Result<i32> {
        anyhow::ensure!(
            self.cpus.is_none() && self.memory.is_none() && self.net == NetMode::None,
            "--cpus, --memory and --net cannot be used with --detach, --keep, --pid-file or \
             --console-socket: the VM is sized and wired from the spec, as by create"
        );
        let id = id.context(
            "a container id is needed with --detach, --keep, --pid-file or --console-socket",
        )?;
        super::create::Create {
            id: id.clone(),
            bundle: dir,
            runc: self.runc,
            kernel: self.kernel,
            initrd: self.initrd,
            boot_timeout: self.boot_timeout,
        }
        .run(g)?;
        let delete = |force| super::delete::Delete {
            id: id.clone(),
            force,
        };
        let monitor = sandboxvm::oci::Record::load(&g.root, &id)?.pid;
        if let Err(e) = (super::start::Start { id: id.clone() }).run(g) {
            let _ = delete(true).run(g);
            return Err(e);
        }
        if self.detach {
            return Ok(0);
        }
        let signals = crate::signals::Forwarder::install()?;
        let status = wait_forwarding(monitor, &signals)?;
        if !self.keep {
            delete(false).run(g)?;
        }
        Ok(status)
    }
}

/// Waits for `pid` (a child: the monitor `create` started), passing it the
/// signals this process gets; its exit status (128 + N for signal N).
/// Blocks between signals: the child's end is one too (SIGCHLD).
fn wait_forwarding(pid: i32, signals: &crate::signals::Forwarder) -> anyhow::Result<i32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(pid);
    let (tx, rx) = std::sync::mpsc::channel();
    let _waking = signals.wake_with(move || {
        let _ = tx.send(());
    });
    loop {
        for s in signals.pending() {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid.as_raw(), s) };
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)).context("wait for the container")? {
            WaitStatus::Exited(_, code) => return Ok(code),
            WaitStatus::Signaled(_, s, _) => return Ok(128 + s as i32),
            _ => rx.recv().context("the signal thread is gone")?,
        }
    }
}

fn run_in(
    sandbox: &mut Sandbox,
    agent: &Agent,
    bundle: &Bundle,
    spec_json: &str,
    id: &str,
    signals: &crate::signals::Forwarder,
) -> anyhow::Result<i32> {
    log::info!("agent up: guest kernel {}", agent.kernel_release()?);
    agent.create_in(id, spec_json, ROOTFS_TAG, "rootfs")?;
    let terminal = bundle.terminal();
    let _raw = if terminal {
        tty::RawMode::enter_stdin()
    } else {
        None
    };
    let io = HostIo::inherited(terminal)?;
    if terminal {
        if let Some((rows, cols)) = io.size() {
            agent.resize(id, "", rows, cols)?;
        }
    }
    agent.start(id)?;
    log::info!("container {id} started");
    let status = attach(agent, id, "", io, terminal, signals, || {
        sandbox.check_alive().map_err(Into::into)
    })?;
    let _ = std::io::stdout().flush();
    log::info!("container {id} exited with status {status}");
    if let Err(e) = agent.shutdown() {
        log::debug!("shutdown: {e}");
    }
    sandbox.wait_vmm(Duration::from_secs(5));
    Ok(status)
}

/// The bundle directory and the container id from `--bundle` and the
/// positional arguments: `run [DIR] [ID]`, or runc's `run --bundle DIR [ID]`.
fn bundle_and_id(
    bundle: Option<PathBuf>,
    args: &[String],
) -> anyhow::Result<(PathBuf, Option<ContainerId>)> {
    let (dir, id) = match (bundle, args) {
        (Some(dir), [id]) => (dir, Some(id)),
        (Some(_), [_, _, ..]) => {
            anyhow::bail!("with --bundle, run takes one argument, the container id")
        }
        (Some(dir), []) => (dir, None),
        // runc's `run ID` in the bundle directory: one argument that is not
        // a bundle, where the current directory is one.
        (None, [one])
            if !Path::new(one).join("config.json").exists()
                && Path::new("config.json").exists() =>
        {
            (PathBuf::from("."), Some(one))
        }
        (None, [dir, rest @ ..]) => (PathBuf::from(dir), rest.first()),
        (None, []) => (PathBuf::from("."), None),
    };
    Ok((dir, id.map(|id| ContainerId::new(id)).transpose()?))
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_its_own_syntax_and_runcs() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let id = |x: &str| Some(ContainerId::new(x).unwrap());
        let p = PathBuf::from;
        assert_eq!(bundle_and_id(None, &[]).unwrap(), (p("."), None));
        assert_eq!(bundle_and_id(None, &s(&["b"])).unwrap(), (p("b"), None));
        assert_eq!(
            bundle_and_id(None, &s(&["b", "c1"])).unwrap(),
            (p("b"), id("c1"))
        );
        assert_eq!(bundle_and_id(Some(p("b")), &[]).unwrap(), (p("b"), None));
        assert_eq!(
            bundle_and_id(Some(p("b")), &s(&["c1"])).unwrap(),
            (p("b"), id("c1"))
        );
        assert!(bundle_and_id(Some(p("b")), &s(&["x", "c1"])).is_err());
        let e = bundle_and_id(Some(p("b")), &s(&["../x"])).unwrap_err();
        assert!(e.to_string().contains("invalid container id"), "{e}");
        assert!(bundle_and_id(None, &s(&["b", "a/b"])).is_err());
    }

    #[test]
    fn net_modes_parse() {
        assert_eq!(parse_net_mode("none"), Ok(NetMode::None));
        assert_eq!(parse_net_mode("host-netns"), Ok(NetMode::HostNetns));
        assert_eq!(parse_net_mode("tap=tap0"), Ok(NetMode::Tap("tap0".into())));
        for bad in ["", "tap=", "bridge", "tap=a,mac=x", "tap=0123456789abcdef"] {
            assert!(parse_net_mode(bad).is_err(), "{bad}");
        }
    }
}

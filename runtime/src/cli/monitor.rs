//! `sandboxvm _monitor` (internal): the host process that stands for a
//! container's process. `create` starts it for the init process (it owns
//! the VM: virtiofsd and the VMM are its children) and `exec --detach` for
//! other processes. It reports "ok" or the error on its ready pipe, then
//! relays stdio, forwards signals and exits with the process's status, so
//! that supervisors waiting on its pid (containerd's runc shim, conmon) see
//! the container's exit code.

use sandboxvm::oci::ContainerId;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::attach::{attach, HostIo};
use super::run::share_bundle;
use super::Globals;
use sandboxvm::bundle::Bundle;
use sandboxvm::oci::{console, hooks, state, Record, Status};
use sandboxvm::sandbox::{Options, Overrides, Sandbox, ROOTFS_TAG};
use sandboxvm::sandbox_boot::{Booted, NetworkPlan};
use sandboxvm::signals::Forwarder;
use sandboxvm::timeouts::Timeouts;

/// Internal; see the module documentation.
#[derive(Debug, Args)]
pub struct Monitor {
    /// The container.
    #[arg(long)]
    pub id: ContainerId,
    /// The bundle (init process).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Pipe to report "ok" or the error on.
    #[arg(long)]
    pub ready_fd: Option<RawFd>,
    /// Send the terminal's master here.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Exec mode: the process id in the container.
    #[arg(long, requires = "process")]
    pub exec_id: Option<String>,
    /// Exec mode: the OCI Process JSON file.
    #[arg(long)]
    pub process: Option<PathBuf>,
    /// Guest kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Seconds to wait for the guest agent (default: see `timeouts`).
    #[arg(long)]
    pub boot_timeout: Option<u64>,
}

fn ready_pipe(fd: Option<RawFd>) -> Option<File> {
    let fd = fd?;
    // Not to be inherited by virtiofsd and the VMM: the caller waits for
    // its EOF.
    // SAFETY: F_SETFD on an fd number we were told is ours.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the caller passed us this fd to own.
    Some(unsafe { File::from_raw_fd(fd) })
}

fn report(ready: &mut Option<File>, msg: &str) {
    if let Some(mut f) = ready.take() {
        let _ = writeln!(f, "{msg}");
    }
}

impl Monitor {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let mut ready = ready_pipe(self.ready_fd);
        // Our own session: the caller's terminal signals are not ours, and
        // a console pty can become our controlling terminal.
        let _ = nix::unistd::setsid();
        let _ = std::env::set_current_dir("/");
        let signals = Forwarder::install()?;
        let result = if self.exec_id.is_some() {
            self.exec(g, &mut ready, &signals)
        } else {
            self.init(g, &mut ready, &signals)
        };
        match result {
            Ok(code) => Ok(code),
            Err(e) if ready.is_some() => {
                let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
                report(&mut ready, &crate::dedup_chain(&chain));
                Ok(1)
            }
            Err(e) => Err(e),
        }
    }

    fn host_io(&self, terminal: bool) -> anyhow::Result<HostIo> {
        if !terminal {
            return Ok(HostIo::inherited(false)?);
        }
        let socket = self
            .console_socket
            .as_ref()
            .context("the process has a terminal: --console-socket is needed to hand it over")?;
        let pty = console::send_to_socket(socket)?;
        if let Err(e) = console::make_controlling(&pty.slave) {
            log::debug!("no controlling terminal (no resize events): {e}");
        }
        Ok(HostIo::pty(pty.slave)?)
    }

    /// The container's init: boot, create, report, relay, exit.
    fn init(
        &self,
        g: &Globals,
        ready: &mut Option<File>,
        signals: &Forwarder,
    ) -> anyhow::Result<i32> {
        let bundle = Bundle::load(self.bundle.as_deref().context("--bundle is needed")?)?;
        let config = &g.config()?.config;
        let flags = Overrides {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            verbose: g.verbose,
            ..Overrides::default()
        };
        let opts = Options::for_bundle(
            config,
            state::dir(&g.root, &self.id),
            &self.id,
            &bundle,
            &flags,
        )?;
        let pid = std::process::id() as i32;
        let mut record = Record {
            id: self.id.clone(),
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            pid,
            pid_start: state::start_time(pid).unwrap_or(0),
            vmm_pid: 0,
            virtiofsd_pid: 0,
            created: sandboxvm::oci::time::now(),
            vm: Default::default(),
            annotations: bundle
                .spec
                .annotations()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
        };
        let (plan, host_netns) = network_plan(&bundle.spec)?;
        // The hooks run before the VM boots: what they put in the
        // container's network namespace is what the VM gets.
        if let Some(h) = bundle.spec.hooks() {
            let st = record.oci_state(Status::Created).to_string();
            in_netns(host_netns, || -> anyhow::Result<()> {
                hooks::run("prestart", h.prestart().as_deref().unwrap_or(&[]), &st)?;
                hooks::run(
                    "createRuntime",
                    h.create_runtime().as_deref().unwrap_or(&[]),
                    &st,
                )?;
                // On the host, as Kata runs them: the spec's "container
                // namespace" is in the guest, where host paths are not.
                hooks::run(
                    "createContainer",
                    h.create_container().as_deref().unwrap_or(&[]),
                    &st,
                )?;
                Ok(())
            })?;
        }
        let timeouts = Timeouts::with_boot_flag(&config.timeouts, self.boot_timeout)?;
        let interrupted = || signals.pending().into_iter().find(|&s| s != libc::SIGWINCH);
        let Booted {
            mut sandbox,
            agent,
            filled: spec_json,
        } = Sandbox::boot(
            &opts,
            &plan,
            share_bundle(&bundle, &self.id, &plan),
            &timeouts,
            interrupted,
        )?;
        if let Err(e) = agent.create_in(&self.id, &spec_json, ROOTFS_TAG, "rootfs") {
            for line in sandbox.console_tail(30) {
                log::info!("guest console: {line}");
            }
            return Err(e.into());
        }
        let terminal = bundle.terminal();
        let io = self.host_io(terminal)?;
        let read_pid = |name: &str| {
            std::fs::read_to_string(sandbox.dir().join(name))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        record.vmm_pid = read_pid("vmm.pid");
        record.virtiofsd_pid = read_pid("virtiofsd.pid");
        record.vm = sandbox.size();
        record
            .save(sandbox.dir())
            .context("cannot write the container state")?;
        report(ready, "ok");
        log::info!("container {} created", self.id);

        let status = match attach(&agent, &self.id, "", io, terminal, signals, || {
            sandbox.check_alive().map_err(Into::into)
        }) {
            Ok(s) => s,
            Err(e) => {
                log::error!("container {}: {e:#}", self.id);
                128 + libc::SIGKILL
            }
        };
        log::info!("container {} exited with status {status}", self.id);
        // The state stays until `delete`; the VM goes now.
        sandbox.keep_state_dir();
        let _ = std::fs::write(sandbox.dir().join("exit"), status.to_string());
        if agent.shutdown().is_ok() {
            sandbox.wait_vmm(Duration::from_secs(5));
        }
        drop(sandbox);
        Ok(status)
    }

    /// Another process in the container: exec, report, relay, exit.
    fn exec(
        &self,
        g: &Globals,
        ready: &mut Option<File>,
        signals: &Forwarder,
    ) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        let path = self.process.as_ref().context("--process is needed")?;
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let _ = std::fs::remove_file(path);
        let exec_id = self.exec_id.as_deref().unwrap_or_default();
        run_exec(
            &record,
            g,
            exec_id,
            &json,
            |terminal| self.host_io(terminal),
            ready,
            signals,
        )
    }
}

/// The guest network of a container created by the monitor:
/// - a namespace path in the spec is what podman or a CNI caller made for
///   the container: mirrored into the VM;
/// - a new namespace with prestart or createRuntime hooks is one the hooks
///   fill, given the container's pid (Docker's libnetwork-setkey up to
///   Docker 27, nerdctl's CNI hook): the monitor, whose pid that is, moves
///   to a new namespace of its own, and the VM mirrors what the hooks put
///   there;
/// - else the guest's own loopback.
///
/// With the namespace of the monitor's own, also the one it left (the
/// runtime's), for the hooks.
fn network_plan(spec: &oci_spec::runtime::Spec) -> anyhow::Result<(NetworkPlan, Option<File>)> {
    if let Some(path) = sandboxvm::net::spec_netns(spec) {
        return Ok((NetworkPlan::Netns(path), None));
    }
    let new_netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        });
    let filled_by_hooks = spec.hooks().as_ref().is_some_and(|h| {
        h.prestart().as_ref().is_some_and(|v| !v.is_empty())
            || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
    });
    if !(new_netns && filled_by_hooks) {
        return Ok((NetworkPlan::None, None));
    }
    // /proc/PID/ns/net is the main thread's namespace: this must be it.
    anyhow::ensure!(
        nix::unistd::gettid() == nix::unistd::getpid(),
        "the container's network namespace must be made by the monitor's main thread"
    );
    let host = File::open("/proc/thread-self/ns/net")
        .context("cannot open the runtime's network namespace")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("cannot make the container's network namespace")?;
    let own = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
    Ok((NetworkPlan::OwnNetns(own), Some(host)))
}

/// Runs `f` in network namespace `netns` (None: here), from a thread of
/// its own. Hooks (CNI plugins, Docker's) must run where the runtime was,
/// and enter the container's namespace by its pid themselves.
fn in_netns<T: Send>(
    netns: Option<File>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let Some(host) = netns else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&host, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("cannot return to the runtime's network namespace")?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the hooks' thread panicked")))
    })
}

/// Starts `sandboxvm _monitor` with `args`, waits for its report and
/// returns its pid; on failure waits for it to clean up and returns its
/// error.
pub fn spawn(g: &Globals, args: Vec<std::ffi::OsString>) -> anyhow::Result<u32> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, OwnedFd};
    let (rd, wr): (OwnedFd, OwnedFd) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: F_SETFD on a pipe end we own; only the write end is inherited.
    unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let exe = std::env::current_exe().context("cannot find the sandboxvm executable")?;
    let mut child = std::process::Command::new(exe)
        .args(g.args())
        .arg("_monitor")
        .args(args)
        .arg("--ready-fd")
        .arg(wr.as_raw_fd().to_string())
        .spawn()
        .context("cannot start the monitor")?;
    drop(wr);
    let mut msg = String::new();
    let _ = File::from(rd).read_to_string(&mut msg);
    let msg = msg.trim();
    if msg == "ok" {
        return Ok(child.id());
    }
    let status = child.wait().context("monitor")?;
    if msg.is_empty() {
        anyhow::bail!("the monitor exited before the container was created ({status})");
    }
    anyhow::bail!("{msg}")
}

/// Starts process `exec_id` from `process_json` in the container, reports
/// on `ready`, relays `io` and returns its exit status.
pub fn run_exec(
    record: &Record,
    g: &Globals,
    exec_id: &str,
    process_json: &str,
    io: impl FnOnce(bool) -> anyhow::Result<HostIo>,
    ready: &mut Option<File>,
    signals: &Forwarder,
) -> anyhow::Result<i32> {
    let status = record.status(&g.root);
    anyhow::ensure!(
        status == Status::Running,
        "cannot exec in a container that is {}",
        status.as_str()
    );
    let process: oci_spec::runtime::Process =
        serde_json::from_str(process_json).context("malformed process JSON")?;
    let terminal = process.terminal().unwrap_or(false);
    let agent = record.agent(&g.root)?;
    let io = io(terminal)?;
    agent.exec(&record.id, exec_id, process_json)?;
    report(ready, "ok");
    attach(&agent, &record.id, exec_id, io, terminal, signals, || {
        anyhow::ensure!(record.monitor_alive(), "the container's VM is gone");
        Ok(())
    })
}

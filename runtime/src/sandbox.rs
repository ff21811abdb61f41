//! One sandbox: a state directory, a virtiofsd serving the container's
//! root filesystem and a VMM process booting the guest, until dropped.
//!
//! The VMM runs as a child process (`sandboxvm boot ...`) so that a crash
//! of either side cannot take the other down silently. Both children get
//! SIGKILL if the runtime dies (PR_SET_PDEATHSIG); dropping the sandbox
//! kills and reaps them, tears down its pod network (if any) and removes
//! the state directory.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::cgroup::Cgroup;
use crate::guest_console::Witnesses;
use crate::net::Network;
use crate::timeouts::Timeouts;

/// Errors starting or running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state directory.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A sandbox with this id exists.
    #[error("a sandbox with id {0:?} already exists")]
    Exists(String),
    /// A child process did not start.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which program.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A child process ended too early.
    #[error("{what} exited unexpectedly ({status}){detail}")]
    Died {
        /// Which one.
        what: &'static str,
        /// How it ended.
        status: String,
        /// Its last words, as ": ..." or empty.
        detail: String,
    },
    /// A signal arrived while waiting for the agent.
    #[error("interrupted by signal {0} while the VM was booting")]
    Interrupted(i32),
    /// The agent did not answer in time.
    #[error("the guest agent did not come up within {secs} s{diagnosis}")]
    Timeout {
        /// The limit.
        secs: u64,
        /// What the guest console and the VMM's threads show, as "; ..."
        /// or "".
        diagnosis: String,
    },
    /// The agent connection could not be set up.
    #[error(transparent)]
    Agent(#[from] crate::agent::Error),
    /// The sandbox's host cgroup.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
    /// The VM does not fit the memory it may use.
    #[error("{0}")]
    Memory(String),
    /// The kernel, initramfs or virtiofsd is not there.
    #[error(transparent)]
    Artefact(#[from] crate::artefacts::Error),
    /// The configuration refuses the VM's size or the pod's annotations.
    #[error("{0}")]
    Config(String),
    /// The shared directory could not be filled.
    #[error(transparent)]
    Share(#[from] crate::share::Error),
    /// The network could not be wired.
    #[error("{0}")]
    Network(String),
}

pub use crate::sandbox_options::{Options, Overrides};

/// The virtio-fs tag of the container's root filesystem.
pub const ROOTFS_TAG: &str = "sbx-rootfs";

/// A running sandbox.
pub struct Sandbox {
    dir: PathBuf,
    /// When the VMM was started.
    launched: Option<Instant>,
    /// The VM's size once launched (its memory may be less than asked, to
    /// fit its cgroup).
    size: crate::vm_size::VmSize,
    vmm: Option<Child>,
    virtiofsd: Option<Child>,
    keep_dir: bool,
    network: Network,
    /// Removed once the VMM and virtiofsd are gone.
    cgroup: Option<Cgroup>,
}

fn pdeathsig(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours; it
    // only sets the child's parent-death signal between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Sandbox {
    /// Creates the state directory and starts virtiofsd and the VMM.
    pub fn start(opts: &Options) -> Result<Sandbox, Error> {
        let mut sandbox = Sandbox::prepare(opts)?;
        sandbox.launch(opts)?;
        Ok(sandbox)
    }

    /// Creates the state directory only (the caller may then fill the
    /// shared directory before [`Sandbox::launch`]).
    pub fn prepare(opts: &Options) -> Result<Sandbox, Error> {
        if !crate::sockets::fit(&opts.dir) {
            return Err(Error::StateDir {
                path: opts.dir.clone(),
                source: std::io::Error::other(format!(
                    "too long for the VM's Unix sockets (at most {} bytes); use a shorter \
                     state root (--root)",
                    crate::sockets::MAX_SOCKET_PATH
                )),
            });
        }
        if remove_if_stale(&opts.dir) {
            log::warn!("removed the state of a dead sandbox {:?}", opts.id);
        }
        match crate::private::create_dir(&opts.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists(opts.id.to_string()))
            }
            Err(source) => {
                return Err(Error::StateDir {
                    path: opts.dir.clone(),
                    source,
                })
            }
        }
        let sandbox = Sandbox {
            dir: opts.dir.clone(),
            launched: None,
            size: Default::default(),
            vmm: None,
            virtiofsd: None,
            keep_dir: false,
            network: Network::None,
            cgroup: None,
        };
        // Who owns this state: a later run removes it if that process died
        // without cleaning up (SIGKILL).
        let pid_path = opts.dir.join("runtime.pid");
        std::fs::write(&pid_path, std::process::id().to_string()).map_err(|source| {
            Error::StateDir {
                path: pid_path,
                source,
            }
        })?;
        Ok(sandbox)
    }

    /// Starts virtiofsd on `opts.shared_dir` and the VMM.
    pub fn launch(&mut self, opts: &Options) -> Result<(), Error> {
        let sandbox = self;
        let log = |name: &str| -> Result<File, Error> {
            let path = opts.dir.join(name);
            File::create(&path).map_err(|source| Error::StateDir { path, source })
        };

        let mut memory_mib = opts.memory_mib;
        let mut limits = crate::cgroup::Limits::default();
        if let Some(rel) = &opts.cgroup {
            let mut cgroup = Cgroup::create(rel)?;
            cgroup.record(&opts.dir).map_err(|source| Error::StateDir {
                path: opts.dir.join("cgroup"),
                source,
            })?;
            log::debug!("VMM and virtiofsd in cgroup {}", cgroup.dir().display());
            limits = crate::cgroup::limits_at(cgroup.dir());
            memory_mib = fit_memory(memory_mib, limits.memory, cgroup.dir())?;
            sandbox.cgroup = Some(cgroup);
        }
        let size = crate::vm_size::VmSize::ceiling(opts, memory_mib, limits);
        let vmm_dir = vmm_dir(&opts.dir);
        crate::private::create_dir(&vmm_dir).map_err(|source| Error::StateDir {
            path: vmm_dir.clone(),
            source,
        })?;
        let fs_sock = virtiofsd_socket_in(&opts.dir);
        let vfs_log = log("virtiofsd.log")?;
        let vfs_err = vfs_log.try_clone().map_err(|source| Error::StateDir {
            path: opts.dir.join("virtiofsd.log"),
            source,
        })?;
        let mut cmd = Command::new(&opts.virtiofsd);
        cmd.arg(format!("--socket-path={}", fs_sock.display()))
            .arg(format!("--shared-dir={}", opts.shared_dir.display()))
            .arg(format!("--cache={}", opts.virtiofsd_cache.as_str()))
            .arg(format!("--thread-pool-size={}", opts.virtiofsd_threads))
            .args([
                "--announce-submounts",
                // File handles make creating files in sticky directories
                // fail with ESTALE when the shared directory is itself on
                // virtiofs (seen in the nested CI host); O_PATH fds work.
                "--inode-file-handles=never",
                // Its own sandbox, named rather than left to defaults:
                // mount, pid and network namespaces of its own, pivoted
                // into the shared directory; seccomp killing on any system
                // call outside its list.
                "--sandbox=namespace",
                "--seccomp=kill",
            ])
            .args(["--log-level=error"])
            .stdin(Stdio::null())
            .stdout(vfs_log)
            .stderr(vfs_err);
        pdeathsig(&mut cmd);
        if let Some(cgroup) = &sandbox.cgroup {
            cgroup.join_on_exec(&mut cmd)?;
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what: "virtiofsd",
            source,
        })?;
        let pid = child.id();
        sandbox.virtiofsd = Some(child);
        write_pid(&opts.dir.join("virtiofsd.pid"), pid)?;
        log::info!("virtiofsd started on {}", opts.shared_dir.display());

        let exe = match &opts.vmm_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(|source| Error::Spawn {
                what: "the VMM",
                source,
            })?,
        };
        let mut cmd = Command::new(&exe);
        if opts.verbose > 0 {
            cmd.arg(format!("-{}", "v".repeat(opts.verbose.into())));
        }
        let mut vm = vmm_config(opts, memory_mib, size, sandbox.network.devices());
        if opts.template {
            vm.restore = match crate::template::Store::open() {
                Ok(store) => store.ensure(
                    &vm,
                    &crate::template::Builder {
                        exe: &exe,
                        verbose: opts.verbose,
                        limit: opts.template_limit,
                    },
                ),
                Err(e) => {
                    log::warn!("booting cold: {e}");
                    None
                }
            };
        }
        let mut args = crate::vmm_args::BootArgs::from_config(&vm);
        // vmm.confine = false or SANDBOXVM_VMM_CONFINE=off: the VMM without
        // its jail, own user and seccomp filters, for measuring what they
        // cost (ci/bench-run).
        let env_off = std::env::var("SANDBOXVM_VMM_CONFINE").as_deref() == Ok("off");
        if !opts.confine || env_off {
            let why = if env_off {
                "SANDBOXVM_VMM_CONFINE=off"
            } else {
                "vmm.confine = false"
            };
            log::warn!(
                "the VMM is not jailed, has no user of its own and no seccomp filters ({why})"
            );
            cmd.env("SANDBOXVM_VMM_SECCOMP", "off");
        } else {
            args.jail = Some(vmm_dir.clone());
            args.user = Some(vmm::confine::User::Auto);
        }
        cmd.arg("boot")
            .args(args.to_argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("vmm.log")?);
        pdeathsig(&mut cmd);
        if let Some(cgroup) = &sandbox.cgroup {
            cgroup.join_on_exec(&mut cmd)?;
        }
        // The VMM opens its taps by name: it runs in their namespace.
        let netns = match sandbox.network.netns() {
            Some(path) => Some(File::open(path).map_err(|source| Error::Spawn {
                what: "the VMM (network namespace)",
                source,
            })?),
            None => None,
        };
        if let Some(ns) = &netns {
            let fd = ns.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe and only reads the fd,
            // which `netns` keeps open until after spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what: "the VMM",
            source,
        })?;
        drop(netns);
        let pid = child.id();
        sandbox.vmm = Some(child);
        sandbox.launched = Some(Instant::now());
        sandbox.size = size;
        write_pid(&opts.dir.join("vmm.pid"), pid)?;
        log::info!(
            "VMM started ({} vCPU of {}, {} MiB of {})",
            opts.vcpus,
            size.max_vcpus,
            memory_mib,
            size.max_memory_mib()
        );
        Ok(())
    }

    /// Gives the VM a network (before [`Sandbox::launch`]): its devices
    /// become `--net` options of the VMM, which runs in the pod network's
    /// namespace, if any. A pod network is torn down when the sandbox is
    /// dropped, after the VMM is gone.
    pub fn attach_network(&mut self, network: Network) {
        self.network = network;
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep the state directory when dropped (the VM and virtiofsd are
    /// still stopped): an OCI container's state outlives its VM until
    /// `delete`.
    pub fn keep_state_dir(&mut self) {
        self.keep_dir = true;
    }

    /// The VM's size and ceiling (zero before launch).
    pub fn size(&self) -> crate::vm_size::VmSize {
        self.size
    }

    /// The VMM's host pid, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Child::id)
    }

    /// The host side of the guest's vsock.
    pub fn vsock_path(&self) -> PathBuf {
        vsock_path_in(&self.dir)
    }

    /// The guest's console log.
    pub fn console_log(&self) -> PathBuf {
        console_log_in(&self.dir)
    }

    /// Connects to the agent's vsock port, retrying until `deadline` while
    /// the VM boots; fails at once if the VMM or virtiofsd dies or if
    /// `interrupted` returns a signal. A time-out names `limit`.
    fn connect_agent(
        &mut self,
        deadline: Instant,
        limit: Duration,
        mut interrupted: impl FnMut() -> Option<i32>,
    ) -> Result<UnixStream, Error> {
        loop {
            if let Some(sig) = interrupted() {
                return Err(Error::Interrupted(sig));
            }
            self.check_alive()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    secs: limit.as_secs(),
                    diagnosis: self.witnesses().explain(),
                });
            }
            match protocol::connect_vsock_bridge(
                &self.vsock_path(),
                protocol::AGENT_PORT,
                remaining.min(Duration::from_millis(200)),
            ) {
                Ok(s) => return Ok(s),
                Err(e) => log::trace!("agent not there yet: {e}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connects to the guest agent, waiting up to `timeouts.boot` from the
    /// VMM's start (failing at once if the VMM or virtiofsd dies). The client's calls are
    /// limited by `timeouts.call`, or longer after a slow boot
    /// ([`Timeouts::call_after_boot`]), and a call that times out is
    /// explained from the guest console.
    pub fn agent(
        &mut self,
        timeouts: &Timeouts,
        interrupted: impl FnMut() -> Option<i32>,
    ) -> Result<Agent, Error> {
        let launched = self.launched.unwrap_or_else(Instant::now);
        let stream = self.connect_agent(launched + timeouts.boot, timeouts.boot, interrupted)?;
        let booted = launched.elapsed();
        let call = timeouts.call_after_boot(booted);
        log::info!(
            "guest agent up after {} ms (agent calls limited to {} s)",
            booted.as_millis(),
            call.as_secs()
        );
        Ok(Agent::new(stream)?.with_limits(call, self.witnesses()))
    }

    /// Where to look when the guest does not answer.
    pub fn witnesses(&self) -> Witnesses {
        Witnesses::of(&self.dir, self.vmm_pid())
    }

    /// An error if the VMM or virtiofsd has exited. virtiofsd ends when the
    /// VMM does (its connection closes): if it is gone, the VMM gets a moment
    /// to be seen dead too, and its end (a seccomp kill, a crash) is the one
    /// reported.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        let virtiofsd_gone = self
            .virtiofsd
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
        if virtiofsd_gone {
            let deadline = Instant::now() + Duration::from_millis(500);
            while let Some(vmm) = self.vmm.as_mut() {
                if !matches!(vmm.try_wait(), Ok(None)) || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for (what, child, log) in [
            ("the VMM", &mut self.vmm, "vmm.log"),
            ("virtiofsd", &mut self.virtiofsd, "virtiofsd.log"),
        ] {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    *child = None;
                    return Err(Error::Died {
                        what,
                        status: describe(status),
                        detail: last_words(&self.dir.join(log)),
                    });
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the VMM to end by itself (after the agent
    /// shut the guest down); kills it otherwise. Returns its status.
    pub fn wait_vmm(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.vmm.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    log::warn!("the VM did not stop by itself; killing it");
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// The tail of the guest console (for diagnostics; read from the end,
    /// escaped).
    pub fn console_tail(&self, lines: usize) -> Vec<String> {
        crate::guest_console::tail(&self.console_log(), lines)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for child in [self.vmm.take(), self.virtiofsd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its processes are reaped: the cgroup can go (its record stays
        // while it does not, for `delete` to try again).
        drop(self.cgroup.take());
        if let Network::Pod(pod) = std::mem::take(&mut self.network) {
            if let Err(e) = pod.teardown() {
                log::warn!("pod network: {e}");
            }
        }
        // The VM is gone: its share's mounts go too; only then may the
        // directory be removed (a recursive delete would descend into a
        // bind-mounted rootfs).
        if !crate::share::unmount_under(&self.dir) {
            log::warn!(
                "mounts remain under {}; not removing it",
                self.dir.display()
            );
            return;
        }
        if self.keep_dir {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Host memory the VMM and virtiofsd need besides guest RAM (their code,
/// heaps, page tables, queues), kept free below a cgroup's memory limit.
pub const VMM_RESERVE_MIB: u64 = 64;
/// The smallest guest that boots the agent and runs a container.
pub const MIN_GUEST_MIB: u64 = 128;

/// Guest memory that fits the cgroup the VM runs in: guest RAM is shared
/// memory, charged there as the guest touches it and never given back, so
/// a guest larger than the cgroup's limit (less [`VMM_RESERVE_MIB`]) would
/// end with the host's OOM killer taking the VMM. A Kubernetes pod's limit
/// is its containers' plus the RuntimeClass's overhead
/// (`resources/runtimeclass.yaml`).
fn fit_memory(wanted_mib: u64, limit: Option<u64>, cgroup: &Path) -> Result<u64, Error> {
    let Some(limit) = limit else {
        return Ok(wanted_mib);
    };
    let fit = (limit >> 20).saturating_sub(VMM_RESERVE_MIB);
    if fit < MIN_GUEST_MIB {
        return Err(Error::Memory(format!(
            "cgroup {} allows {} MiB: not enough for a {MIN_GUEST_MIB} MiB guest and the VMM's {VMM_RESERVE_MIB} MiB (give the pod's RuntimeClass an overhead)",
            cgroup.display(),
            limit >> 20
        )));
    }
    if wanted_mib > fit {
        log::warn!(
            "guest memory {wanted_mib} MiB cut to {fit} MiB: cgroup {} allows {} MiB for the VM",
            cgroup.display(),
            limit >> 20
        );
        return Ok(fit);
    }
    Ok(wanted_mib)
}

/// The VM of a sandbox started with `opts`, `memory_mib` and `size` (see
/// [`Sandbox::launch`]), with the network devices `net`.
pub fn vmm_config(
    opts: &Options,
    memory_mib: u64,
    size: crate::vm_size::VmSize,
    net: Vec<vmm::NetConfig>,
) -> vmm::VmmConfig {
    let mut vm = vmm::VmmConfig::new(&opts.kernel);
    vm.boot.initrd = Some(opts.initrd.clone());
    vm.boot.cmdline = format!("quiet {}", opts.cmdline);
    vm.vcpus = opts.vcpus;
    vm.max_vcpus = size.max_vcpus;
    vm.memory_mib = memory_mib;
    vm.hotplug_mib = size.hotplug_mib;
    vm.console = vmm::Console::File(console_log_in(&opts.dir));
    vm.vsock = Some(vmm::VsockConfig {
        uds: vsock_path_in(&opts.dir),
    });
    vm.fs = vec![vmm::FsConfig {
        socket: virtiofsd_socket_in(&opts.dir),
        tag: ROOTFS_TAG.into(),
    }];
    vm.net = net;
    vm.free_page_reporting = opts.free_page_reporting;
    vm
}

/// The part of the state directory `dir` that the VMM reaches once jailed
/// (`sandboxvm boot --jail`): the guest console log, the vsock sockets and
/// virtiofsd's socket. The OCI record, pid files and logs stay out of its
/// reach: a VMM taken over by its guest cannot rewrite what the runtime
/// later acts on (pids to kill, the bundle whose hooks run).
pub fn vmm_dir(dir: &Path) -> PathBuf {
    dir.join("vmm")
}

/// The guest console log of the sandbox whose state directory is `dir`.
pub fn console_log_in(dir: &Path) -> PathBuf {
    vmm_dir(dir).join("console.log")
}

/// virtiofsd's socket of the sandbox whose state directory is `dir`.
pub fn virtiofsd_socket_in(dir: &Path) -> PathBuf {
    vmm_dir(dir).join("virtiofsd.sock")
}

/// The host side of the guest's vsock (the agent's port among them) of
/// the sandbox whose state directory is `dir`; a guest connection to host
/// port N goes to this path with `_N` appended.
pub fn vsock_path_in(dir: &Path) -> PathBuf {
    vmm_dir(dir).join("vsock.sock")
}

fn write_pid(path: &Path, pid: u32) -> Result<(), Error> {
    std::fs::write(path, pid.to_string()).map_err(|source| Error::StateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes `dir` if the runtime that made it is gone; true if it did.
fn remove_if_stale(dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(dir.join("runtime.pid")) else {
        return false;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if alive {
        return false;
    }
    if let Err(e) = crate::net::teardown_recorded(dir) {
        log::warn!("the pod network of a dead sandbox: {e}");
    }
    crate::cgroup::remove_recorded(dir);
    crate::share::unmount_under(dir) && std::fs::remove_dir_all(dir).is_ok()
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last non-empty line of a log, as ": line", or "".
fn last_words(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .map(|l| format!(": {}", l.trim_start_matches("sandboxvm: ")))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sandboxvm-stale-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_guest_fits_the_cgroups_memory_limit() {
        let cg = Path::new("/sys/fs/cgroup/pod");
        assert_eq!(fit_memory(576, None, cg).unwrap(), 576);
        // 512 MiB of containers + 160 MiB of overhead: the whole guest fits.
        assert_eq!(fit_memory(576, Some(672 << 20), cg).unwrap(), 576);
        // No overhead declared: cut to what leaves the VMM its reserve.
        assert_eq!(
            fit_memory(576, Some(512 << 20), cg).unwrap(),
            512 - VMM_RESERVE_MIB
        );
        let e = fit_memory(256, Some(128 << 20), cg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("allows 128 MiB") && e.contains("overhead"),
            "{e}"
        );
    }

    #[test]
    fn state_of_a_dead_runtime_is_removed_and_a_live_ones_kept() {
        let live = dir("live");
        std::fs::write(live.join("runtime.pid"), std::process::id().to_string()).unwrap();
        assert!(!remove_if_stale(&live));
        assert!(live.exists());
        std::fs::remove_dir_all(&live).unwrap();

        // A child that has exited and been reaped: its pid is free.
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = dir("dead");
        std::fs::write(dead.join("runtime.pid"), pid.to_string()).unwrap();
        assert!(remove_if_stale(&dead));
        assert!(!dead.exists());

        let no_pid = dir("nopid");
        assert!(!remove_if_stale(&no_pid));
        std::fs::remove_dir_all(&no_pid).unwrap();
    }
}

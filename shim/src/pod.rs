//! One pod, one VM: the pod's state directory
//! (`<root>/shim/<namespace>/<pod>/`), its `shared/` directory (a shared
//! mount that virtiofsd serves, holding each container's rootfs and bind
//! mounts), the sandbox (virtiofsd + VMM) and the agent connection.
//!
//! The sandbox's child processes get SIGKILL when the thread that started
//! them ends (PR_SET_PDEATHSIG is per thread), and ttrpc handler threads
//! come and go: a keeper thread per pod starts them and lives until the pod
//! is torn down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sandboxvm::agent::Agent;
use sandboxvm::bundle::Bundle;
use sandboxvm::oci::ContainerId;
use sandboxvm::sandbox::{Options, Sandbox};
use sandboxvm::sandbox_boot::{Booted, NetworkPlan};
use sandboxvm::sockets::{self, short_name, MAX_SOCKET_PATH};
use sandboxvm::timeouts::Timeouts;

use crate::error::{Error, Result};
use crate::mounts;

/// The default state root (`$SANDBOXVM_ROOT` overrides it).
pub const DEFAULT_ROOT: &str = "/run/sandboxvm";

/// The state root.
pub fn root() -> PathBuf {
    std::env::var_os("SANDBOXVM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// The state directory of pod `pod` in containerd namespace `ns`:
/// `<root>/shim/<ns>/<pod>`, each name shortened by [`short_name`] so that
/// the VM's sockets in it stay within a Unix socket path's 107 bytes.
pub fn pod_dir(ns: &str, pod: &str) -> PathBuf {
    root()
        .join("shim")
        .join(short_name(ns, 24))
        .join(short_name(pod, 32))
}

/// The `sandboxvm` binary that runs the VMM: next to this executable, then
/// on `PATH`.
fn vmm_exe() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("sandboxvm")));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("sandboxvm"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Invalid("the sandboxvm binary is neither next to the shim nor on PATH".into())
        })
}

struct Vm {
    sandbox: Sandbox,
    /// Dropping it lets the keeper thread end.
    _keeper: Sender<()>,
}

/// A running pod VM.
pub struct Pod {
    /// The pod id (the CRI sandbox id, or the container id).
    pub id: String,
    dir: PathBuf,
    shared: PathBuf,
    vm: Mutex<Option<Vm>>,
    vmm_pid: u32,
    /// The VM's size and ceiling; a task Update grows it.
    pub size: Mutex<sandboxvm::vm_size::VmSize>,
    paused: AtomicBool,
    /// The guest agent.
    pub agent: Agent,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{what} {}", path.display());
    move |e| Error::io(what, e)
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && (kill(Pid::from_raw(pid), None).is_ok())
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes a pod directory whose shim is gone: kills its VMM and virtiofsd
/// (if they are still the processes the pid files name), unmounts
/// everything below it and removes it. Also removes the namespace directory
/// if that leaves it empty.
pub fn remove_dead(dir: &Path) {
    let vm = dir.join("vm");
    for (file, name) in [("vmm.pid", "sandboxvm"), ("virtiofsd.pid", "virtiofsd")] {
        let Some(pid) = read_pid(&vm.join(file)) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let arg0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        if String::from_utf8_lossy(arg0).ends_with(name) {
            log::info!("killing leftover {name} {pid}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // The pod network's tap and tc mirroring, as the dead shim recorded them.
    if let Err(e) = sandboxvm::net::teardown_recorded(&vm) {
        log::warn!("pod network of {}: {e}", dir.display());
    }
    sandboxvm::cgroup::remove_recorded(&vm);
    mounts::remove_dir(dir);
    if let Some(ns_dir) = dir.parent() {
        let _ = std::fs::remove_dir(ns_dir);
    }
}

/// Whether the shim that owns pod directory `dir` is alive (and not us).
pub fn owner_alive(dir: &Path) -> bool {
    read_pid(&dir.join("shim.pid"))
        .is_some_and(|pid| pid != std::process::id() as i32 && pid_alive(pid))
}

fn create_dir(dir: &Path) -> Result<()> {
    // Another shim may remove the (empty) namespace directory meanwhile.
    let mut tries = 0;
    loop {
        if let Some(parent) = dir.parent() {
            sandboxvm::private::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        match sandboxvm::private::create_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 5 => tries += 1,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists(format!("pod state {}", dir.display())))
            }
            r => return r.map_err(io_err("create", dir)),
        }
    }
}

/// The network namespace path of the pod's sandbox container, if any.
fn pod_netns(bundle: &Bundle) -> Option<PathBuf> {
    use oci_spec::runtime::LinuxNamespaceType;
    bundle
        .spec
        .linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

impl Pod {
    /// Creates the pod's state directory and shared mount, boots the VM
    /// (sized from `bundle`, the pod's first container, under `config`)
    /// and connects to its agent. On failure nothing is left behind.
    pub fn boot(
        ns: &str,
        id: &str,
        bundle: &Bundle,
        config: &sandboxvm::config::Config,
    ) -> Result<Pod> {
        let id = ContainerId::new(id)?;
        // containerd's namespaces follow the same rule.
        ContainerId::new(ns)?;
        let dir = pod_dir(ns, &id);
        // The longest socket path in it: a guest connection to host port N.
        if !sockets::fit(&dir.join("vm")) {
            return Err(Error::Invalid(format!(
                "the pod's state directory {} is too long for the VM's Unix sockets \
                 (at most {MAX_SOCKET_PATH} bytes): set a shorter SANDBOXVM_ROOT",
                dir.display()
            )));
        }
        if dir.exists() {
            if owner_alive(&dir) {
                return Err(Error::Exists(format!("pod {id}")));
            }
            log::warn!("removing the state of a dead shim: {}", dir.display());
            remove_dead(&dir);
        }
        create_dir(&dir)?;
        let mut guard = DirGuard(Some(dir.clone()));
        let pid_path = dir.join("shim.pid");
        std::fs::write(&pid_path, std::process::id().to_string())
            .map_err(io_err("write", &pid_path))?;
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).map_err(io_err("create", &shared))?;
        mounts::make_shared(&shared)?;
        // virtiofsd serves a view whose skeleton the guest cannot write.
        let served =
            sandboxvm::share::Share::new(&shared, sandboxvm::sandbox::ROOTFS_TAG)?.served()?;

        let mut opts = Options::for_bundle(
            config,
            dir.join("vm"),
            &id,
            bundle,
            &sandboxvm::sandbox::Overrides {
                verbose: u8::from(log::log_enabled!(log::Level::Debug)),
                ..Default::default()
            },
        )?;
        opts.shared_dir = served;
        opts.vmm_exe = Some(vmm_exe()?);
        // The pod's network namespace (CNI made it; its path is in the
        // sandbox container's spec): mirrored into the VM and configured in
        // the guest. Host-network pods have none.
        let plan = match pod_netns(bundle) {
            Some(ns) => NetworkPlan::Netns(ns),
            None => NetworkPlan::None,
        };
        let timeouts =
            Timeouts::configured(&config.timeouts).map_err(|e| Error::State(e.to_string()))?;
        let started = Instant::now();
        let (result_tx, result_rx) = channel();
        let (keeper, stop) = channel::<()>();
        // The VMM and virtiofsd die with the thread that started them
        // (PR_SET_PDEATHSIG): it lives as long as the pod.
        std::thread::Builder::new()
            .name(format!("vm-{id}"))
            .spawn(move || {
                let served = opts.shared_dir.clone();
                let booted = Sandbox::boot(&opts, &plan, |_| Ok((served, ())), &timeouts, || None);
                let _ = result_tx.send(booted);
                // Until the pod is torn down (the sender is dropped).
                let _ = stop.recv();
            })
            .map_err(|e| Error::io("spawn the VM keeper thread", e))?;
        let Booted { sandbox, agent, .. } = result_rx
            .recv()
            .map_err(|_| Error::State("the VM keeper thread died".into()))?
            .map_err(|e| Error::State(format!("the sandbox VM did not boot: {e}")))?;
        match agent.kernel_release() {
            Ok(r) => log::info!(
                "pod {id}: VM up in {:.1} s, guest kernel {r}",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => log::warn!("pod {id}: guest details: {e}"),
        }
        let vmm_pid = sandbox.vmm_pid().unwrap_or(0);
        let size = Mutex::new(sandbox.size());
        guard.0 = None;
        Ok(Pod {
            id: id.to_string(),
            dir,
            shared,
            vm: Mutex::new(Some(Vm {
                sandbox,
                _keeper: keeper,
            })),
            vmm_pid,
            size,
            paused: AtomicBool::new(false),
            agent,
        })
    }

    /// The host directory virtiofsd shares.
    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// The VMM's host pid: the "pid" containerd sees for the pod's tasks.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// An error if the VMM or virtiofsd has died.
    pub fn check_alive(&self) -> Result<()> {
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        match vm.as_mut() {
            Some(vm) => Ok(vm.sandbox.check_alive()?),
            None => Err(Error::State(format!(
                "the VM of pod {} is stopped",
                self.id
            ))),
        }
    }

    /// The last `lines` of the guest console (for diagnostics).
    pub fn console_tail(&self, lines: usize) -> Vec<String> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        vm.as_ref()
            .map(|vm| vm.sandbox.console_tail(lines))
            .unwrap_or_default()
    }

    /// Whether the VM's vCPUs are stopped.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn signal_vmm(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.vmm_pid as i32), sig).map_err(|source| Error::Signal {
            what: format!("send {sig} to the VMM {}", self.vmm_pid),
            source,
        })
    }

    /// Stops the whole VM (SIGSTOP to the VMM: its vCPUs and devices).
    pub fn pause(&self) -> Result<()> {
        self.signal_vmm(Signal::SIGSTOP)?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<()> {
        self.signal_vmm(Signal::SIGCONT)?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Shuts the guest down, stops the VMM and virtiofsd, unmounts the
    /// shared directory and removes the state directory. Idempotent.
    pub fn teardown(&self) {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(Vm {
            mut sandbox,
            _keeper,
        }) = vm
        else {
            return;
        };
        if self.is_paused() {
            let _ = self.resume();
        }
        if sandbox.check_alive().is_ok() {
            if let Err(e) = self.agent.shutdown() {
                log::debug!("pod {}: shutdown: {e}", self.id);
            }
            sandbox.wait_vmm(Duration::from_secs(3));
        }
        drop(sandbox);
        drop(_keeper);
        mounts::remove_dir(&self.dir);
        if let Some(ns_dir) = self.dir.parent() {
            let _ = std::fs::remove_dir(ns_dir);
        }
        log::info!("pod {}: VM stopped, state removed", self.id);
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes a pod directory that failed half way.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_dead(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cri_pods_sockets_fit_a_unix_socket_path() {
        let dir = root()
            .join("shim")
            .join(short_name(&"n".repeat(76), 24))
            .join(short_name(&"f".repeat(64), 32))
            .join("vm");
        for path in [
            sockets::longest_socket(&dir),
            sandboxvm::sandbox::vsock_path_in(&dir),
        ] {
            assert!(
                path.as_os_str().len() <= MAX_SOCKET_PATH,
                "{}",
                path.display()
            );
        }
    }
}

//! `sandboxvm delete`: removes a container, its VM and its state (runc
//! delete); poststop hooks run after.

use sandboxvm::oci::ContainerId;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::Globals;
use sandboxvm::oci::{hooks, state, Record, Status};

/// Deletes container ID: it must be stopped or created, unless --force,
/// which kills a running one first.
#[derive(Debug, Args)]
pub struct Delete {
    /// The container id.
    pub id: ContainerId,
    /// Kill the container if it runs; no error if it does not exist.
    #[arg(long, short)]
    pub force: bool,
}

impl Delete {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let dir = state::dir(&g.root, &self.id);
        let record = match Record::load(&g.root, &self.id) {
            Ok(r) => r,
            Err(state::Error::NotFound(_)) => {
                // A state dir without state.json: a create in progress (its
                // runtime.pid lives) or one that died half-way.
                if self.force
                    && dir.exists()
                    && !owner_alive(&dir)
                    && teardown_network(&dir)
                    && sandboxvm::share::unmount_under(&dir)
                {
                    sandboxvm::cgroup::remove_recorded(&dir);
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("cannot remove {}", dir.display()))?;
                    return Ok(0);
                }
                if self.force {
                    return Ok(0);
                }
                anyhow::bail!("container {:?} does not exist", self.id);
            }
            Err(e) => return Err(e.into()),
        };
        let status = record.status(&g.root);
        if matches!(status, Status::Running | Status::Paused) && !self.force {
            anyhow::bail!(
                "cannot delete container {} that is not stopped: {}",
                self.id,
                status.as_str()
            );
        }
        stop(&record, &dir);
        // A monitor that died (or was killed just now) left its pod
        // network and its cgroup: the state dir records what it made.
        teardown_network(&dir);
        sandboxvm::cgroup::remove_recorded(&dir);
        if let Some(h) = super::state::spec_hooks(&record) {
            let st = record.oci_state(Status::Stopped).to_string();
            hooks::run_each("poststop", h.poststop().as_deref().unwrap_or(&[]), &st);
        }
        anyhow::ensure!(
            sandboxvm::share::unmount_under(&dir),
            "mounts remain under {}; not removing it",
            dir.display()
        );
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
        Ok(0)
    }
}

/// Tears down the pod network recorded in `dir`; false (with a warning)
/// if that failed.
fn teardown_network(dir: &Path) -> bool {
    match sandboxvm::net::teardown_recorded(dir) {
        Ok(_) => true,
        Err(e) => {
            log::warn!("pod network: {e}");
            false
        }
    }
}

fn owner_alive(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("runtime.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .and_then(state::start_time)
        .is_some()
}

/// Kills the monitor, the VMM and virtiofsd (the latter two only if their
/// command line names this state dir: pids get reused) and waits until
/// they are gone.
fn stop(record: &Record, dir: &Path) {
    let ours = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(dir.to_string_lossy().as_ref())
            })
            .unwrap_or(false)
    };
    let mut pids = Vec::new();
    if record.monitor_alive() {
        pids.push(record.pid);
    }
    for pid in [record.vmm_pid, record.virtiofsd_pid] {
        if pid > 0 && state::start_time(pid).is_some() && ours(pid) {
            pids.push(pid);
        }
    }
    for &pid in &pids {
        // SAFETY: plain kill(2) calls; a stopped (paused) VMM needs SIGCONT
        // to act on nothing but SIGKILL, which works anyway.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGCONT);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| state::start_time(p).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

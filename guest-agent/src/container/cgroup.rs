//! cgroup v2, one cgroup per container at `<root>/<id>`
//! (`/sys/fs/cgroup/sandboxvm/<id>` in the guest).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::LinuxResources;

use super::Error;

const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Whether `dir` is on a cgroup v2 hierarchy.
fn is_cgroup2(dir: &Path) -> bool {
    dir.join("cgroup.controllers").exists()
}

fn enable_controllers(dir: &Path) {
    // One at a time: a controller the kernel lacks must not block the rest.
    for c in CONTROLLERS {
        let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
    }
}

/// Creates the container's cgroup and applies `linux.resources`.
/// Returns None (with a warning) where there is no cgroup v2 hierarchy at
/// `root`'s parent, unless resources were asked for.
pub fn create(
    root: &Path,
    id: &str,
    resources: Option<&LinuxResources>,
) -> Result<Option<PathBuf>, Error> {
    let parent = root.parent().unwrap_or(Path::new("/"));
    let wants_limits = resources.is_some_and(|r| {
        r.memory().as_ref().and_then(|m| m.limit()).is_some()
            || r.cpu().as_ref().and_then(|c| c.quota()).is_some()
            || r.pids().is_some()
    });
    if !is_cgroup2(parent) {
        if wants_limits {
            return Err(Error::Setup(format!(
                "linux.resources asks for limits but {} is not a cgroup v2 hierarchy",
                parent.display()
            )));
        }
        log::warn!(
            "no cgroup v2 at {}: containers run without cgroups",
            parent.display()
        );
        return Ok(None);
    }
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Setup(format!("{what} {}: {e}", p.display()))
    };
    enable_controllers(parent);
    fs::create_dir_all(root).map_err(|e| io("create cgroup", root, e))?;
    enable_controllers(root);
    let dir = root.join(id);
    fs::create_dir(&dir).map_err(|e| io("create cgroup", &dir, e))?;
    if let Some(r) = resources {
        let write = |file: &str, value: String| {
            let p = dir.join(file);
            fs::write(&p, &value).map_err(|e| io(&format!("write {value:?} to"), &p, e))
        };
        let applied = (|| {
            if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
                write(
                    "memory.max",
                    if limit < 0 {
                        "max".into()
                    } else {
                        limit.to_string()
                    },
                )?;
            }
            if let Some(cpu) = r.cpu() {
                if let Some(quota) = cpu.quota() {
                    let period = cpu.period().unwrap_or(100_000);
                    let q = if quota <= 0 {
                        "max".to_string()
                    } else {
                        quota.to_string()
                    };
                    write("cpu.max", format!("{q} {period}"))?;
                }
            }
            if let Some(pids) = r.pids() {
                let l = pids.limit();
                write(
                    "pids.max",
                    if l <= 0 { "max".into() } else { l.to_string() },
                )?;
            }
            Ok(())
        })();
        if let Err(e) = applied {
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
    }
    Ok(Some(dir))
}

/// Pids in the cgroup.
pub fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills everything in the cgroup (cgroup.kill, or SIGKILL to each pid).
pub fn kill_all(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs(dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes the cgroup, retrying while its processes are being torn down.
pub fn remove(dir: &Path) -> Result<(), Error> {
    let mut last = None;
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        kill_all(dir);
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Setup(format!(
        "remove cgroup {}: {}",
        dir.display(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// (cpu usage in µs, memory in bytes, number of pids).
pub fn stats(dir: &Path) -> (u64, u64, u64) {
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
    let cpu = read("cpu.stat")
        .lines()
        .find_map(|l| {
            l.strip_prefix("usage_usec ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let mem = read("memory.current").trim().parse().unwrap_or(0);
    let pids = read("pids.current")
        .trim()
        .parse()
        .unwrap_or(procs(dir).len() as u64);
    (cpu, mem, pids)
}

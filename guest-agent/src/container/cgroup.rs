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

/// Creates the container's cgroup, applies `linux.resources` and attaches
/// the device filter of `devices`.
/// Returns None (with a warning) where there is no cgroup v2 hierarchy at
/// `root`'s parent, unless resources were asked for.
pub fn create(
    root: &Path,
    id: &str,
    resources: Option<&LinuxResources>,
    devices: &[super::devices::Rule],
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
    let set_up = resources
        .map_or(Ok(()), |r| apply(&dir, r))
        .and_then(|()| super::devices::attach(&dir, devices));
    if let Err(e) = set_up {
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(Some(dir))
}

/// Whether a JSON value asks for something: Docker writes `blockIO` with
/// a weight of 0 and empty device lists when no limit is set.
fn set(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => a.iter().any(set),
        Value::Object(o) => o.values().any(set),
    }
}

/// Writes `r`'s limits into the cgroup at `dir` (at create, and for
/// UpdateContainer): memory limit and reservation, CPU quota/period and
/// shares, pids limit. A limit the agent cannot apply is an error naming it, never
/// dropped. The device rules are not limits: set once at create (the
/// device filter), and left as they are by an update, as runc does.
pub fn apply(dir: &Path, r: &LinuxResources) -> Result<(), Error> {
    let unsupported = [
        (
            "linux.resources.blockIO",
            r.block_io()
                .as_ref()
                .and_then(|b| serde_json::to_value(b).ok())
                .is_some_and(|v| set(&v)),
        ),
        (
            "linux.resources.hugepageLimits",
            r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()),
        ),
        (
            "linux.resources.cpu.cpus",
            r.cpu()
                .as_ref()
                .and_then(|c| c.cpus().as_ref())
                .is_some_and(|c| !c.is_empty()),
        ),
        (
            "linux.resources.cpu.mems",
            r.cpu()
                .as_ref()
                .and_then(|c| c.mems().as_ref())
                .is_some_and(|m| !m.is_empty()),
        ),
        (
            "linux.resources.rdma",
            r.rdma().as_ref().is_some_and(|m| !m.is_empty()),
        ),
        (
            "linux.resources.unified",
            r.unified().as_ref().is_some_and(|m| !m.is_empty()),
        ),
    ];
    if let Some((what, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(Error::InvalidSpec(format!(
            "{what} is not supported in the guest"
        )));
    }
    let write = |file: &str, value: String| {
        let p = dir.join(file);
        fs::write(&p, &value)
            .map_err(|e| Error::Setup(format!("write {value:?} to {}: {e}", p.display())))
    };
    let max = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            write("memory.max", max(limit))?;
        }
        if let Some(reservation) = m.reservation() {
            write("memory.low", max(reservation))?;
        }
        // memory.swap: the guest has no swap, so any limit on it holds.
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
        if let Some(shares) = cpu.shares().filter(|&s| s > 0) {
            write("cpu.weight", weight(shares).to_string())?;
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
}

/// cgroup v1 CPU shares (2..262144) as a v2 weight (1..10000), as runc
/// converts them.
fn weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
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

/// How many processes of the cgroup (and below) the OOM killer killed.
pub fn oom_kills(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("agent-cgroup-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn limits_are_written_as_cgroup_v2_values() {
        let d = dir();
        apply(
            &d,
            &resources(
                r#"{"memory":{"limit":536870912},"cpu":{"quota":150000,"period":100000,"shares":1024,"cpus":""},"pids":{"limit":64}}"#,
            ),
        )
        .unwrap();
        let read = |f: &str| fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read("memory.max"), "536870912");
        assert_eq!(read("cpu.max"), "150000 100000");
        assert_eq!(read("cpu.weight"), "39");
        assert_eq!(read("pids.max"), "64");
        apply(
            &d,
            &resources(r#"{"memory":{"limit":-1},"cpu":{"quota":-1}}"#),
        )
        .unwrap();
        assert_eq!(read("memory.max"), "max");
        assert_eq!(read("cpu.max"), "max 100000");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn what_cannot_be_applied_is_refused_by_name() {
        let d = dir();
        for (json, what) in [
            (r#"{"cpu":{"cpus":"0-1"}}"#, "cpu.cpus"),
            (r#"{"blockIO":{"weight":10}}"#, "blockIO"),
            (
                r#"{"hugepageLimits":[{"pageSize":"2MB","limit":1}]}"#,
                "hugepageLimits",
            ),
            (r#"{"unified":{"memory.high":"1"}}"#, "unified"),
        ] {
            let e = apply(&d, &resources(json)).unwrap_err().to_string();
            assert!(e.contains(what), "{json}: {e}");
        }
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0, "nothing written");
        // What Docker writes when no block I/O limit is set.
        apply(
            &d,
            &resources(r#"{"blockIO":{"weight":0,"weightDevice":[],"throttleReadBpsDevice":[]}}"#),
        )
        .unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}

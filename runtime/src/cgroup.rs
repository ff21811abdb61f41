//! The sandbox's host cgroup (cgroup v2): the VMM and virtiofsd run in it,
//! so the host accounts the VM's CPU and memory where the caller asked
//! (`linux.cgroupsPath`: podman's or the kubelet's pod cgroup), not in the
//! runtime's or the shim's. The container's own cgroup and limits live in
//! the guest.
//!
//! `linux.cgroupsPath` takes runc's two forms: a path (`/a/b`, under the
//! cgroup v2 mount) or systemd's `slice:prefix:name`, which names
//! `<slice, expanded>/<prefix>-<name>.scope` (the directory is made
//! directly; no systemd unit is started). Without a cgroupsPath a sandbox
//! gets `sandboxvm/<id>`. A path with `..`, `.` or an empty part is refused,
//! as is an explicit path on a host without cgroup v2; the default is
//! skipped there. Directories this module made are removed when the
//! sandbox ends.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use crate::oci::ContainerId;

/// Where the cgroup v2 hierarchy is mounted.
pub const MOUNT: &str = "/sys/fs/cgroup";

/// Errors placing a sandbox in its cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec's cgroupsPath is not one we accept.
    #[error("linux.cgroupsPath {path:?}: {why}")]
    BadPath {
        /// The path as given (escaped when printed).
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Creating or joining the cgroup failed.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The cgroup directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// The limits in force on a cgroup: the smallest of it and its ancestors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max`, bytes.
    pub memory: Option<u64>,
    /// `cpu.max` as whole CPUs (quota / period, rounded up).
    pub cpus: Option<u8>,
}

/// The limits in force on the cgroup at `dir` (under [`MOUNT`]).
pub fn limits_at(dir: &Path) -> Limits {
    limits_within(Path::new(MOUNT), dir)
}

/// [`limits_at`] of a hierarchy mounted at `mount`.
fn limits_within(mount: &Path, dir: &Path) -> Limits {
    let read = |d: &Path, file: &str| std::fs::read_to_string(d.join(file)).ok();
    let dirs = || dir.ancestors().take_while(|d| d.starts_with(mount));
    Limits {
        memory: dirs()
            .filter_map(|d| read(d, "memory.max")?.trim().parse::<u64>().ok())
            .min(),
        cpus: dirs()
            .filter_map(|d| {
                let text = read(d, "cpu.max")?;
                let mut words = text.split_whitespace();
                let quota: u64 = words.next()?.parse().ok()?;
                let period: u64 = words.next()?.parse().ok().filter(|&p| p > 0)?;
                Some(u8::try_from(quota.div_ceil(period).max(1)).unwrap_or(u8::MAX))
            })
            .min(),
    }
}

/// The limits in force on process `pid`'s cgroup (v2); none for a process
/// that is gone or outside the v2 hierarchy.
pub fn limits_of(pid: u32) -> Limits {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Limits::default();
    };
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Limits::default();
    };
    let rel = rel.trim_start_matches('/');
    if Path::new(rel)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Limits::default();
    }
    limits_at(&Path::new(MOUNT).join(rel))
}

/// Whether `MOUNT` is a cgroup v2 hierarchy.
pub fn have_cgroup2() -> bool {
    Path::new(MOUNT).join("cgroup.controllers").is_file()
}

/// The cgroup directory, relative to [`MOUNT`], that `cgroups_path` names
/// for sandbox `id`; `None` when the host has no cgroup v2 (the sandbox then
/// stays where its parent is).
pub fn resolve(cgroups_path: Option<&str>, id: &ContainerId) -> Result<Option<PathBuf>, Error> {
    let Some(given) = cgroups_path.filter(|p| !p.is_empty()) else {
        return Ok(have_cgroup2().then(|| PathBuf::from("sandboxvm").join(id.as_str())));
    };
    let bad = |why| Error::BadPath {
        path: given.chars().take(200).collect(),
        why,
    };
    let rel = if given.starts_with('/') {
        PathBuf::from(given.trim_start_matches('/'))
    } else if let [slice, prefix, name] = given.split(':').collect::<Vec<_>>()[..] {
        systemd_path(slice, prefix, name).ok_or_else(|| bad("not a systemd slice:prefix:name"))?
    } else {
        PathBuf::from(given)
    };
    let plain = rel.to_str().is_some_and(|r| {
        r.split('/').all(|part| !matches!(part, "" | "." | ".."))
            && !r.chars().any(char::is_control)
    });
    if !plain {
        return Err(bad("not a plain path below the cgroup root"));
    }
    if !have_cgroup2() {
        log::warn!(
            "no cgroup v2 hierarchy at {MOUNT}: the VMM stays in the runtime's cgroups, not in {}",
            rel.display()
        );
        return Ok(None);
    }
    Ok(Some(rel))
}

/// systemd's `slice:prefix:name` as a path: `a-b.slice` expands to
/// `a.slice/a-b.slice`; the unit is `prefix-name.scope` (`name` alone if it
/// already ends in `.slice`). `-.slice` or an empty slice is the root.
fn systemd_path(slice: &str, prefix: &str, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || prefix.contains('/') || slice.contains('/') {
        return None;
    }
    let mut path = PathBuf::new();
    if !slice.is_empty() && slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
            return None;
        }
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            path.push(format!("{acc}.slice"));
        }
    }
    if name.ends_with(".slice") {
        path.push(name);
    } else if prefix.is_empty() {
        path.push(format!("{name}.scope"));
    } else {
        path.push(format!("{prefix}-{name}.scope"));
    }
    Some(path)
}

/// A sandbox's cgroup: made (with the parents it needed) on
/// [`Cgroup::create`], removed with them when dropped, once its processes
/// are gone.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    /// The directories this made, outermost first.
    made: Vec<PathBuf>,
    procs: File,
    /// Where [`Cgroup::record`] noted `made`.
    record: Option<PathBuf>,
}

impl Cgroup {
    /// Makes (or opens) `MOUNT/rel`, with the cpu, memory and pids
    /// controllers enabled in its parents where they can be.
    pub fn create(rel: &Path) -> Result<Cgroup, Error> {
        Cgroup::create_in(Path::new(MOUNT), rel)
    }

    fn create_in(mount: &Path, rel: &Path) -> Result<Cgroup, Error> {
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(Error::BadPath {
                path: rel.display().to_string(),
                why: "not a plain path below the cgroup root",
            });
        }
        let dir = mount.join(rel);
        let made = make_dirs(mount, rel)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|source| {
                remove_dirs(&made);
                Error::Io {
                    path: dir.clone(),
                    source,
                }
            })?;
        Ok(Cgroup {
            dir,
            made,
            procs,
            record: None,
        })
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the child `cmd` starts join this cgroup before it runs
    /// anything (so none of its memory is charged elsewhere).
    pub fn join_on_exec(&self, cmd: &mut std::process::Command) -> Result<(), Error> {
        use std::os::unix::process::CommandExt;
        let fd = self.procs.try_clone().map_err(|source| Error::Io {
            path: self.dir.clone(),
            source,
        })?;
        // SAFETY: write(2) is async-signal-safe; the closure only writes to
        // an fd it owns (a dup the parent keeps open until spawn returns:
        // the closure holds it) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // "0": the writing process itself.
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) -> Result<(), Error> {
        (&self.procs)
            .write_all(pid.to_string().as_bytes())
            .map_err(|source| Error::Io {
                path: self.dir.clone(),
                source,
            })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes were reaped; their cgroup empties a moment later
        // (anything they left, virtiofsd's sandboxed child, is killed).
        remove_made(&self.made, self.record.as_deref());
    }
}

/// The file in a sandbox's state directory naming the cgroup directories
/// it made, so that they go even if the process holding the [`Cgroup`] was
/// killed (`delete`, or the next sandbox of the same id).
const RECORD: &str = "cgroup";

impl Cgroup {
    /// Notes in `state_dir` what [`remove_recorded`] removes (the note
    /// goes with the directories when this is dropped).
    pub fn record(&mut self, state_dir: &Path) -> std::io::Result<()> {
        let mut text = String::new();
        for d in &self.made {
            text.push_str(&d.to_string_lossy());
            text.push('\n');
        }
        let path = state_dir.join(RECORD);
        std::fs::write(&path, text)?;
        self.record = Some(path);
        Ok(())
    }
}

/// Removes the cgroup directories recorded in `state_dir` (innermost
/// first; one still in use stays) and the record.
pub fn remove_recorded(state_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(state_dir.join(RECORD)) else {
        return;
    };
    let made: Vec<PathBuf> = text
        .lines()
        .map(PathBuf::from)
        // Only what this module can have made.
        .filter(|p| p.starts_with(MOUNT) && p.components().all(|c| c != Component::ParentDir))
        .collect();
    remove_made(&made, Some(&state_dir.join(RECORD)));
}

/// Kills what is left in the innermost of `made` (the directories a
/// sandbox made, outermost first: the innermost is its cgroup), removes
/// them once empty, and then the `record` that names them; a record stays
/// while its cgroup does, for a later delete to try again.
fn remove_made(made: &[PathBuf], record: Option<&Path>) {
    // Processes killed just now leave their cgroup a moment later.
    if let Some(leaf) = made.last() {
        let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
        remove_when_empty(leaf);
    }
    remove_dirs(made);
    if let Some(record) = record {
        if made.last().is_none_or(|leaf| !leaf.exists()) {
            let _ = std::fs::remove_file(record);
        }
    }
}

/// Removes cgroup `dir`, waiting up to half a second for its last
/// processes to leave it.
fn remove_when_empty(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Makes `mount/rel` and its missing parents, enabling controllers on the
/// way down; returns the directories it made, outermost first.
fn make_dirs(mount: &Path, rel: &Path) -> Result<Vec<PathBuf>, Error> {
    // A parent another sandbox made may go between our two mkdirs (its
    // sandbox ended): once more then.
    match make_dirs_once(mount, rel) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            make_dirs_once(mount, rel)
        }
        other => other,
    }
}

fn make_dirs_once(mount: &Path, rel: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut made = Vec::new();
    let mut at = mount.to_path_buf();
    for part in rel.components() {
        enable_controllers(&at);
        at.push(part);
        match std::fs::create_dir(&at) {
            Ok(()) => made.push(at.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                remove_dirs(&made);
                return Err(Error::Io { path: at, source });
            }
        }
    }
    Ok(made)
}

/// Removes `made` (outermost first), innermost first; a directory still in
/// use (another sandbox's parent) stays.
fn remove_dirs(made: &[PathBuf]) {
    for d in made.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// Enables the cpu, memory and pids controllers for `dir`'s children, each
/// on its own (one the host lacks does not stop the others). A cgroup with
/// processes of its own cannot (cgroup v2's no-internal-process rule): its
/// children are then accounted without them.
fn enable_controllers(dir: &Path) {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.subtree_control"))
    else {
        return;
    };
    for c in ["+cpu", "+memory", "+pids"] {
        let _ = f.write_all(c.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_limits_in_force_are_the_smallest_up_to_the_mount() {
        let root = std::env::temp_dir().join(format!("sbx-cg-limits-{}", std::process::id()));
        let leaf = root.join("pod/sandbox");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("pod/memory.max"), "536870912\n").unwrap();
        std::fs::write(root.join("pod/cpu.max"), "150000 100000\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        let l = limits_within(&root, &leaf);
        assert_eq!(
            l,
            Limits {
                memory: Some(536870912),
                cpus: Some(2)
            }
        );
        // Nothing above the mount counts.
        assert_eq!(limits_within(&root.join("pod/sandbox"), &leaf).memory, None);
        std::fs::write(leaf.join("memory.max"), "268435456\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "50000 100000\n").unwrap();
        assert_eq!(
            limits_within(&root, &leaf),
            Limits {
                memory: Some(268435456),
                cpus: Some(1)
            }
        );
        assert_eq!(
            limits_within(&root, &root.join("elsewhere")),
            Limits::default()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    use super::*;

    fn id(s: &str) -> ContainerId {
        s.parse().unwrap()
    }

    #[test]
    fn systemd_slices_expand_as_systemd_names_them() {
        assert_eq!(
            systemd_path("kubepods-besteffort-pod12.slice", "cri-containerd", "abc"),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
            ))
        );
        assert_eq!(
            systemd_path("machine.slice", "libpod", "c1"),
            Some(PathBuf::from("machine.slice/libpod-c1.scope"))
        );
        assert_eq!(
            systemd_path("", "", "x.slice"),
            Some(PathBuf::from("x.slice"))
        );
        assert_eq!(
            systemd_path("-.slice", "p", "n"),
            Some(PathBuf::from("p-n.scope"))
        );
        for bad in ["a--b.slice", "-a.slice", "a-.slice", "noslice", ".slice"] {
            assert_eq!(systemd_path(bad, "p", "n"), None, "{bad}");
        }
        assert_eq!(systemd_path("a.slice", "p", "../x"), None);
    }

    #[test]
    fn paths_that_leave_the_cgroup_root_are_refused() {
        for bad in [
            "/a/../../etc",
            "../x",
            "/",
            "/a//b",
            "/a/./b",
            "a/",
            "/a\nb",
            "machine.slice:lib/../pod:x",
        ] {
            assert!(
                matches!(resolve(Some(bad), &id("c")), Err(Error::BadPath { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_good_path_resolves_below_the_mount_where_there_is_cgroup2() {
        let r = resolve(Some("/libpod_parent/libpod-c1"), &id("c1"));
        if have_cgroup2() {
            assert_eq!(r.unwrap(), Some(PathBuf::from("libpod_parent/libpod-c1")));
            assert_eq!(
                resolve(None, &id("c1")).unwrap(),
                Some(PathBuf::from("sandboxvm/c1"))
            );
        } else {
            assert_eq!(r.unwrap(), None);
            assert_eq!(resolve(None, &id("c1")).unwrap(), None);
        }
    }

    #[test]
    fn the_directories_made_are_removed_and_the_others_stay() {
        let mount = std::env::temp_dir().join(format!("sbx-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&mount);
        std::fs::create_dir_all(mount.join("existing")).unwrap();
        let made = make_dirs(&mount, Path::new("existing/new/leaf")).unwrap();
        assert_eq!(
            made,
            vec![mount.join("existing/new"), mount.join("existing/new/leaf")]
        );
        assert!(mount.join("existing/new/leaf").is_dir());
        remove_dirs(&made);
        assert!(!mount.join("existing/new").exists());
        assert!(
            mount.join("existing").is_dir(),
            "a parent it did not make stays"
        );
        std::fs::remove_dir_all(&mount).unwrap();
    }

    /// On a cgroup v2 host (the nested CI host, where the e2e suite also
    /// checks the VMM's cgroup): a child joins before it runs, and the
    /// cgroup is gone after it.
    #[test]
    fn a_child_runs_in_the_cgroup_from_its_start() {
        if !have_cgroup2() || !nix_is_root() {
            eprintln!("skipped: no cgroup v2 at {MOUNT} or not root");
            return;
        }
        let rel = PathBuf::from(format!("sandboxvm-unit-{}", std::process::id()));
        let cg = Cgroup::create(&rel).unwrap();
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        cg.join_on_exec(&mut cmd).unwrap();
        let out = cmd.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("0::/{}", rel.display())
        );
        let dir = cg.dir().to_path_buf();
        drop(cg);
        assert!(!dir.exists());
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}

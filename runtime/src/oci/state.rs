//! A container's persistent state: `<root>/<id>/state.json` written by its
//! monitor once the container is created, plus markers (`started`,
//! `paused`, `exit`). The status is derived from them, the monitor's
//! liveness and the guest agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::Agent;
use crate::oci::ContainerId;

/// Errors reading or using a container's state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such container.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// state.json is unreadable.
    #[error("state of container {id:?}: {reason}")]
    Corrupt {
        /// The container.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// The container's VM cannot answer in this state.
    #[error("container {id} is {status}")]
    NotLive {
        /// The container.
        id: String,
        /// Its status.
        status: &'static str,
    },
    /// The guest agent could not be reached.
    #[error("container {id:?}: cannot reach its guest agent: {reason}")]
    Agent {
        /// The container.
        id: String,
        /// Why.
        reason: String,
    },
}

/// A container's status, as the OCI runtime spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, process not started.
    Created,
    /// The process runs.
    Running,
    /// The VM's vCPUs are stopped.
    Paused,
    /// The process has exited (or the VM is gone).
    Stopped,
}

impl Status {
    /// The spec's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// What the monitor records when the container has been created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Container id.
    pub id: ContainerId,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The root filesystem.
    pub rootfs: PathBuf,
    /// The monitor's host pid (the container's pid for callers).
    pub pid: i32,
    /// The monitor's start time (/proc/<pid>/stat field 22), against pid reuse.
    pub pid_start: u64,
    /// The VMM's host pid.
    pub vmm_pid: i32,
    /// virtiofsd's host pid.
    pub virtiofsd_pid: i32,
    /// Creation time, RFC 3339.
    pub created: String,
    /// The spec's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The VM's size and ceiling (zero: unknown, a record of an older
    /// version); `update` grows it.
    #[serde(default)]
    pub vm: crate::vm_size::VmSize,
}

/// The state directory of container `id`: `root/id`, the id shortened if
/// the VM's sockets would not fit ([`crate::sockets::state_dir`]).
pub fn dir(root: &Path, id: &ContainerId) -> PathBuf {
    crate::sockets::state_dir(root, id.as_str())
}

/// An exclusive lock on a container's state for a read-change-write of
/// its record (`update`): held until dropped.
pub struct Locked {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Record {
    /// Waits for the container's state lock, then loads its record: two
    /// updates at once run one after the other, each from the record the
    /// other wrote.
    pub fn load_locked(root: &Path, id: &ContainerId) -> Result<(Record, Locked), Error> {
        let d = dir(root, id);
        let corrupt = |e: std::io::Error| Error::Corrupt {
            id: id.to_string(),
            reason: format!("cannot lock {}: {e}", d.display()),
        };
        let f = std::fs::File::open(&d).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(id.to_string()),
            _ => corrupt(e),
        })?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| corrupt(e.into()))?;
        Ok((Record::load(root, id)?, Locked { _lock: lock }))
    }

    /// Loads the record of `id`.
    pub fn load(root: &Path, id: &ContainerId) -> Result<Record, Error> {
        let path = dir(root, id).join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(id.to_string()),
            _ => Error::Corrupt {
                id: id.to_string(),
                reason: e.to_string(),
            },
        })?;
        let record: Record = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        if &record.id != id {
            return Err(Error::Corrupt {
                id: id.to_string(),
                reason: format!("state.json names container {:?}", record.id.as_str()),
            });
        }
        Ok(record)
    }

    /// Writes the record atomically into `dir`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        // A name of this process's own: two writers (updates) each replace
        // the record whole, never a mix of both.
        let tmp = dir.join(format!("state.json.tmp.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, dir.join("state.json"))
    }

    /// The state directory.
    pub fn dir(&self, root: &Path) -> PathBuf {
        dir(root, &self.id)
    }

    /// Whether the monitor still runs.
    pub fn monitor_alive(&self) -> bool {
        start_time(self.pid) == Some(self.pid_start)
    }

    /// The current status.
    pub fn status(&self, root: &Path) -> Status {
        let d = self.dir(root);
        if !self.monitor_alive() || d.join("exit").exists() {
            return Status::Stopped;
        }
        if d.join("paused").exists() {
            return Status::Paused;
        }
        match self.agent(root).and_then(|a| {
            a.state(&self.id).map_err(|e| Error::Agent {
                id: self.id.to_string(),
                reason: e.to_string(),
            })
        }) {
            Ok(s) => match s.status.as_str() {
                "created" => Status::Created,
                "running" => Status::Running,
                _ => Status::Stopped,
            },
            Err(e) => {
                log::debug!("{e}");
                if d.join("started").exists() {
                    Status::Running
                } else {
                    Status::Created
                }
            }
        }
    }

    /// A client of the guest agent of a container that is created or
    /// running (a paused VM's agent cannot answer, a stopped one is gone).
    pub fn live_agent(&self, root: &Path) -> Result<Agent, Error> {
        let status = self.status(root);
        if !matches!(status, Status::Created | Status::Running) {
            return Err(Error::NotLive {
                id: self.id.to_string(),
                status: status.as_str(),
            });
        }
        self.agent(root)
    }

    /// A client of the container's guest agent.
    pub fn agent(&self, root: &Path) -> Result<Agent, Error> {
        let err = |reason: String| Error::Agent {
            id: self.id.to_string(),
            reason,
        };
        let stream = protocol::connect_vsock_bridge(
            &crate::sandbox::vsock_path_in(&self.dir(root)),
            protocol::AGENT_PORT,
            Duration::from_secs(5),
        )
        .map_err(|e| err(e.to_string()))?;
        let timeouts = crate::timeouts::Timeouts::from_env().map_err(|e| err(e.to_string()))?;
        Ok(Agent::new(stream)
            .map_err(|e| err(e.to_string()))?
            .with_limits(
                timeouts.call,
                crate::guest_console::Witnesses::of(
                    &self.dir(root),
                    u32::try_from(self.vmm_pid).ok().filter(|&p| p > 0),
                ),
            ))
    }

    /// The state JSON of the OCI runtime spec (and runc's extra fields).
    pub fn oci_state(&self, status: Status) -> serde_json::Value {
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        serde_json::json!({
            "ociVersion": "1.0.2",
            "id": self.id,
            "status": status.as_str(),
            "pid": pid,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "annotations": self.annotations,
            "owner": "",
        })
    }
}

/// A process's start time in clock ticks since boot; None if it is gone or
/// a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The records of the containers under `root`, by id: each directory's
/// state.json, read once, kept when it names the container whose directory
/// that is (a directory's name may be a shortened id).
pub fn list(root: &Path) -> Vec<Record> {
    let mut records: Vec<Record> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("state.json")).ok()?;
            let r: Record = serde_json::from_str(&text).ok()?;
            (dir(root, &r.id) == e.path()).then_some(r)
        })
        .collect();
    records.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: i32, pid_start: u64) -> Record {
        Record {
            id: ContainerId::new("c1").unwrap(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            pid,
            pid_start,
            vmm_pid: 0,
            virtiofsd_pid: 0,
            created: "2026-01-01T00:00:00Z".into(),
            annotations: BTreeMap::from([("k".to_string(), "v".to_string())]),
            vm: crate::vm_size::VmSize::new(1, 1, 256, 256),
        }
    }

    #[test]
    fn start_time_of_self_is_stable_and_of_a_reaped_child_gone() {
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        assert_eq!(start_time(pid), None);
    }

    #[test]
    fn a_locked_load_waits_for_the_holder_and_reads_what_it_wrote() {
        let root = std::env::temp_dir().join(format!("sandboxvm-lock-{}", std::process::id()));
        let r = record(1, 1);
        std::fs::create_dir_all(r.dir(&root)).unwrap();
        r.save(&r.dir(&root)).unwrap();
        let (mut first, held) = Record::load_locked(&root, &r.id).unwrap();
        let (root2, id) = (root.clone(), r.id.clone());
        let second = std::thread::spawn(move || Record::load_locked(&root2, &id).unwrap().0);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!second.is_finished(), "the second load waits for the lock");
        first.vm.added_mib = 128;
        first.save(&r.dir(&root)).unwrap();
        drop(held);
        assert_eq!(second.join().unwrap().vm.added_mib, 128);
        assert!(matches!(
            Record::load_locked(&root, &ContainerId::new("nope").unwrap()),
            Err(Error::NotFound(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_dead_monitor_means_stopped_with_pid_0() {
        let root = std::env::temp_dir().join(format!("sandboxvm-state-{}", std::process::id()));
        let r = record(std::process::id() as i32, 1);
        std::fs::create_dir_all(r.dir(&root)).unwrap();
        r.save(&r.dir(&root)).unwrap();
        assert_eq!(Record::load(&root, &r.id).unwrap(), r);
        assert_eq!(list(&root), vec![r.clone()]);
        // Start time 1 is not ours: a reused pid.
        assert_eq!(r.status(&root), Status::Stopped);
        let s = r.oci_state(Status::Stopped);
        assert_eq!(s["pid"], 0);
        assert_eq!(s["status"], "stopped");
        assert_eq!(s["annotations"]["k"], "v");
        assert!(matches!(
            Record::load(&root, &ContainerId::new("nope").unwrap()),
            Err(Error::NotFound(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn markers_decide_the_status_of_a_live_monitor_without_an_agent() {
        let root = std::env::temp_dir().join(format!("sandboxvm-mark-{}", std::process::id()));
        let me = std::process::id() as i32;
        let r = record(me, start_time(me).unwrap());
        let d = r.dir(&root);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(r.status(&root), Status::Created);
        std::fs::write(d.join("started"), "").unwrap();
        assert_eq!(r.status(&root), Status::Running);
        std::fs::write(d.join("paused"), "").unwrap();
        assert_eq!(r.status(&root), Status::Paused);
        std::fs::write(d.join("exit"), "0").unwrap();
        assert_eq!(r.status(&root), Status::Stopped);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

//! A container of the pod: its root filesystem (containerd's snapshot
//! mounted on `<bundle>/rootfs`, as the runc shim does, then bound into the
//! pod's share as `<cid>/rootfs`), its host bind mounts (under
//! `<cid>/mounts/`), the guest's version of its spec, and its processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::protos::types::mount::Mount;
use nix::mount::{umount2, MntFlags};
use sandboxvm::bundle::Bundle;
use sandboxvm::sandbox::ROOTFS_TAG;

use crate::error::{Error, Result};
use crate::mounts;
use crate::pod::Pod;
use crate::process::Process;
use crate::spec;
use crate::stdio::Paths;

/// containerd's snapshot mounted on `<bundle>/rootfs`; unmounted when
/// dropped.
pub struct Rootfs {
    target: Option<PathBuf>,
}

impl Rootfs {
    /// Mounts `mounts` on `<bundle>/rootfs`; none: the bundle's rootfs is
    /// used as it is.
    pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<Rootfs> {
        if mounts.is_empty() {
            return Ok(Rootfs { target: None });
        }
        let target = bundle.join("rootfs");
        std::fs::create_dir_all(&target)
            .map_err(|e| Error::io(format!("create {}", target.display()), e))?;
        mounts::mount_all(mounts, &target)?;
        Ok(Rootfs {
            target: Some(target),
        })
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            if let Err(e) = umount2(&t, MntFlags::MNT_DETACH) {
                log::warn!("umount {}: {e}", t.display());
            }
        }
    }
}

/// The container's directory in the pod's share; unmounted and removed when
/// dropped.
struct Share(PathBuf);

impl Drop for Share {
    fn drop(&mut self) {
        mounts::remove_dir(&self.0);
    }
}

/// A container created in the pod's VM.
pub struct Container {
    /// Its id.
    pub id: String,
    /// The bundle directory.
    pub bundle: String,
    /// Its init process.
    pub init: Arc<Process>,
    /// Exec processes by exec id.
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    // Dropped in this order: the share (bound from the rootfs), then the
    // rootfs.
    _share: Share,
    _rootfs: Rootfs,
}

fn make_target(path: &Path, dir: bool) -> Result<()> {
    let r = if dir {
        std::fs::create_dir_all(path)
    } else {
        std::fs::File::create(path).map(drop)
    };
    r.map_err(|e| Error::io(format!("create {}", path.display()), e))
}

impl Container {
    /// Creates the container in the pod's VM: binds its rootfs and host
    /// mounts into the share, rewrites its spec and asks the agent.
    /// `sandbox_pid` is the guest pid of the pod's sandbox container.
    pub fn create(
        pod: &Pod,
        req: &CreateTaskRequest,
        bundle: &Bundle,
        rootfs: Rootfs,
        sandbox_pid: Option<u32>,
    ) -> Result<Container> {
        let id = req.id.clone();
        let dir = pod.shared().join(&id);
        if dir.exists() {
            // Left by a container of the same id that was not cleaned up.
            drop(Share(dir.clone()));
        }
        make_target(&dir.join("rootfs"), true)?;
        let share = Share(dir.clone());
        mounts::bind(&bundle.rootfs, &dir.join("rootfs"))?;

        let mut spec_json: serde_json::Value = serde_json::from_str(&bundle.config_json)
            .map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
        let binds = spec::for_guest(&mut spec_json, &id, sandbox_pid)?;
        if !binds.is_empty() {
            make_target(&dir.join("mounts"), true)?;
        }
        for b in &binds {
            let target = dir.join("mounts").join(&b.name);
            make_target(&target, b.source.is_dir())?;
            sandboxvm::share::bind_tree(&b.source, &target, b.readonly).map_err(|e| {
                Error::Invalid(format!(
                    "bind {} on {}: {e}",
                    b.source.display(),
                    target.display()
                ))
            })?;
        }
        pod.agent.create_in(
            &id,
            &spec_json.to_string(),
            ROOTFS_TAG,
            &format!("{id}/rootfs"),
        )?;
        let stdio = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        Ok(Container {
            init: Process::new(&id, "", stdio, String::new()),
            id,
            bundle: req.bundle.clone(),
            execs: Mutex::new(HashMap::new()),
            _share: share,
            _rootfs: rootfs,
        })
    }

    /// The init (exec_id "") or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("process {exec_id} of {}", self.id)))
    }

    /// All processes, init first.
    pub fn processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(
            self.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        all
    }
}

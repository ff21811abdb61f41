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
use sandboxvm::guest_spec::{amend, Amend, GuestNetns};
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
        let spec_json: serde_json::Value = serde_json::from_str(&bundle.config_json)
            .map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
        let share = sandboxvm::share::Share::new(pod.shared(), ROOTFS_TAG)?;
        let guest = amend(
            &spec_json,
            &Amend {
                id: &id,
                share_dir: share.guest_path(&id),
                netns: GuestNetns::Pod,
                sandbox_pid,
                // A CRI pod's containers all bind the pod's shm directory (a
                // host tmpfs): through the share it stays one for the pod.
                pod_shm: spec_json["annotations"][spec::CONTAINER_TYPE].is_string(),
                drop_user_and_time: true,
                bundle_dir: PathBuf::from(&req.bundle),
            },
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let cleanup = Share(dir.clone());
        share.add_container(&format!("{id}/"), &bundle.rootfs, &guest)?;
        pod.agent
            .create_in(&id, &guest.json, ROOTFS_TAG, &format!("{id}/rootfs"))?;
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
            _share: cleanup,
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

//! The shim binary's side of containerd's shim protocol: `start` spawns (or
//! finds) the pod's shim daemon, `delete` cleans up after a dead one, and
//! the daemon serves the task service until Shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::synchronous::util::write_address;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::events::{timestamp, Publish};
use crate::pod;
use crate::process::KILLED;
use crate::service::Service;
use crate::spec;
use crate::{mounts, Error};

/// containerd's name for this runtime.
pub const RUNTIME_ID: &str = "io.containerd.sandboxvm.v2";

/// The shim.
pub struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    socket: String,
}

/// The pod of the container whose bundle is `bundle` (its config.json's
/// CRI annotations), or the container itself.
fn pod_of(bundle: &Path, id: &str) -> String {
    std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .map(|spec| spec::pod_id(&spec, id))
        .unwrap_or_else(|| id.to_string())
}

fn other(e: Error) -> containerd_shim::Error {
    containerd_shim::Error::Other(e.to_string())
}

impl Shim {
    /// The task service, publishing its events through `publisher`.
    pub fn task_service(&self, publisher: impl Publish) -> Service {
        Service::new(&self.namespace, publisher, self.exit.clone())
    }
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
        }
    }

    /// One shim per pod: containers of a pod group by the CRI sandbox id,
    /// so they reach the shim (and the VM) their sandbox container started.
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = pod_of(Path::new("."), &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        write_address(&address)?;
        Ok(address)
    }

    /// Cleans up after a shim that is gone (containerd calls this from the
    /// container's bundle): the container's rootfs mount and share, and
    /// the whole pod (VM, virtiofsd, mounts, state) if its shim is dead.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir().map_err(|e| other(Error::io("cwd", e)))?;
        let pod_id = pod_of(&bundle, &self.id);
        let dir = pod::pod_dir(&self.namespace, &pod_id);
        if dir.exists() {
            if pod::owner_alive(&dir) {
                mounts::remove_dir(&dir.join("shared").join(&self.id));
            } else {
                pod::remove_dead(&dir);
            }
        }
        sandboxvm::share::unmount_under(&bundle.join("rootfs"));
        // The dead shim's socket, unless a live shim serves it.
        if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
            let path = address.trim().trim_start_matches("unix://");
            if !path.is_empty() && std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(DeleteResponse {
            exit_status: KILLED,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The library removes the socket it finds in the bundle's address
        // file; the bundle of the pod's first container may be gone by now.
        let path = self.socket.trim_start_matches("unix://");
        if !path.is_empty() && !path.starts_with('@') {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Not what the bootstrap calls (it does not connect a RemotePublisher,
    /// whose ttrpc client polls): see [`Shim::task_service`].
    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        self.task_service(publisher)
    }
}

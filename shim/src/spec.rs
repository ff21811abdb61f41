//! The container's config.json as the guest needs it: host namespace paths
//! and the network namespace go (the pod shares the guest's network), host
//! bind-mount sources become paths in the pod's virtio-fs share (a CRI pod's
//! /dev/shm among them), a stand-alone container's /dev/shm from the host
//! becomes a tmpfs, cgroupsPath and hooks are the guest's.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Where the guest agent mounts virtio-fs shares.
pub const GUEST_SHARES_DIR: &str = "/run/sandboxvm/shares";

/// The CRI annotation naming a container's role.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI annotation naming the pod (sandbox) a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// A host path to bind-mount into the container's share, under
/// `mounts/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path.
    pub source: PathBuf,
    /// Its name under the container's `mounts/` directory.
    pub name: String,
    /// Read-only (`ro`/`rro`): in the share too, submounts included, so a
    /// guest that mounts the share itself cannot write it either.
    pub readonly: bool,
}

/// The pod a container belongs to: the CRI sandbox id for a pod's
/// (non-sandbox) container, else the container itself.
pub fn pod_id(spec: &Value, container_id: &str) -> String {
    let ann = &spec["annotations"];
    match (ann[CONTAINER_TYPE].as_str(), ann[SANDBOX_ID].as_str()) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => sandbox.to_string(),
        _ => container_id.to_string(),
    }
}

/// Whether the spec says this is a pod's sandbox (pause) container or a
/// stand-alone one.
pub fn is_sandbox(spec: &Value) -> bool {
    spec["annotations"][CONTAINER_TYPE].as_str() != Some("container")
}

fn is_bind(m: &Value) -> bool {
    m["type"].as_str() == Some("bind")
        || m["options"].as_array().is_some_and(|o| {
            o.iter()
                .any(|o| matches!(o.as_str(), Some("bind" | "rbind")))
        })
}

/// A file name for `source` under `mounts/`, unique by index.
fn bind_name(index: usize, source: &Path) -> String {
    let base: String = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{index}-{base}")
}

/// Rewrites `spec` for container `cid` in the guest. `sandbox_pid` is the
/// guest pid of the pod's sandbox container, whose IPC, UTS and PID
/// namespaces the pod's other containers join where the spec asks for a
/// shared one. Returns the host paths to bind into the share.
pub fn for_guest(spec: &mut Value, cid: &str, sandbox_pid: Option<u32>) -> Result<Vec<HostBind>> {
    if !spec.is_object() {
        return Err(Error::Invalid("config.json is not a JSON object".into()));
    }
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        namespaces.retain(|ns| !matches!(ns["type"].as_str(), Some("network" | "user" | "time")));
        for ns in namespaces.iter_mut() {
            let typ = ns["type"].as_str().unwrap_or_default().to_string();
            let Some(obj) = ns.as_object_mut() else {
                continue;
            };
            if obj
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                obj.remove("path");
                continue;
            }
            match (sandbox_pid, typ.as_str()) {
                (Some(pid), "ipc" | "uts" | "pid") => {
                    obj.insert("path".into(), json!(format!("/proc/{pid}/ns/{typ}")));
                }
                _ => {
                    obj.remove("path");
                }
            }
        }
    }
    let share = format!(
        "{GUEST_SHARES_DIR}/{}/{cid}/mounts",
        sandboxvm::sandbox::ROOTFS_TAG
    );
    // A CRI pod's containers all bind the pod's shm directory (a host
    // tmpfs): through the share it stays one for the pod, as Kubernetes
    // has it. A stand-alone container's /dev/shm is a tmpfs of its own.
    let pod_shm = spec["annotations"][CONTAINER_TYPE].is_string();
    let mut binds = Vec::new();
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for m in mounts.iter_mut() {
            if !is_bind(m) {
                continue;
            }
            let dest = m["destination"].as_str().unwrap_or_default();
            if dest == "/dev/shm" && !pod_shm {
                *m = json!({
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
                });
                continue;
            }
            let source = PathBuf::from(m["source"].as_str().unwrap_or_default());
            if !source.is_absolute() {
                return Err(Error::Invalid(format!(
                    "bind mount {dest}: source {} is not an absolute path",
                    source.display()
                )));
            }
            if !source.exists() {
                return Err(Error::Invalid(format!(
                    "bind mount {dest}: {}: no such file or directory",
                    source.display()
                )));
            }
            let name = bind_name(binds.len(), &source);
            let readonly = m["options"].as_array().is_some_and(|o| {
                o.iter()
                    .filter_map(Value::as_str)
                    .any(sandboxvm::share::is_readonly_option)
            });
            m["source"] = json!(format!("{share}/{name}"));
            binds.push(HostBind {
                source,
                name,
                readonly,
            });
        }
    }
    if let Some(linux) = spec["linux"].as_object_mut() {
        linux.insert("cgroupsPath".into(), json!(format!("/sandboxvm/{cid}")));
    }
    if let Some(obj) = spec.as_object_mut() {
        // Hooks name host programs; the runtime does not run them in the guest.
        obj.remove("hooks");
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri_spec() -> Value {
        json!({
            "ociVersion": "1.0.2-dev",
            "process": {"args": ["sh"]},
            "annotations": {
                CONTAINER_TYPE: "container",
                SANDBOX_ID: "pod1",
            },
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "uts", "path": "/proc/4242/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                ],
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "type": "bind",
                 "source": "/tmp", "options": ["rbind", "ro"]},
                {"destination": "/etc/resolv.conf", "source": "/etc/resolv.conf",
                 "options": ["bind", "ro"]},
            ],
        })
    }

    #[test]
    fn a_pods_container_groups_with_its_sandbox() {
        let s = cri_spec();
        assert_eq!(pod_id(&s, "c1"), "pod1");
        assert!(!is_sandbox(&s));
        let plain = json!({"process": {}});
        assert_eq!(pod_id(&plain, "c2"), "c2");
        assert!(is_sandbox(&plain));
        let sandbox = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}});
        assert_eq!(pod_id(&sandbox, "pod1"), "pod1");
        assert!(is_sandbox(&sandbox));
    }

    #[test]
    fn namespaces_join_the_sandboxs_in_the_guest_and_network_goes() {
        let mut s = cri_spec();
        for_guest(&mut s, "c1", Some(17)).unwrap();
        assert_eq!(
            s["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/17/ns/ipc"},
                {"type": "uts", "path": "/proc/17/ns/uts"},
                {"type": "mount"},
            ])
        );
        let mut s = cri_spec();
        for_guest(&mut s, "c1", None).unwrap();
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}])
        );
    }

    #[test]
    fn host_binds_move_into_the_share_with_a_pods_shm() {
        let mut s = cri_spec();
        let binds = for_guest(&mut s, "c1", None).unwrap();
        let bind = |source: &str, name: &str, readonly| HostBind {
            source: source.into(),
            name: name.into(),
            readonly,
        };
        assert_eq!(
            binds,
            vec![
                bind("/etc/hosts", "0-hosts", false),
                bind("/tmp", "1-tmp", true),
                bind("/etc/resolv.conf", "2-resolv.conf", true),
            ]
        );
        let m = &s["mounts"];
        assert_eq!(m[0]["source"], "proc");
        let share = "/run/sandboxvm/shares/sbx-rootfs/c1/mounts";
        assert_eq!(m[1]["source"], format!("{share}/0-hosts"));
        assert_eq!(m[2]["destination"], "/dev/shm");
        assert_eq!(m[2]["source"], format!("{share}/1-tmp"));
        assert_eq!(m[3]["source"], format!("{share}/2-resolv.conf"));
        assert_eq!(s["linux"]["cgroupsPath"], "/sandboxvm/c1");
        assert!(s.get("hooks").is_none());
    }

    #[test]
    fn a_stand_alone_containers_shm_becomes_a_tmpfs() {
        let mut s = cri_spec();
        s.as_object_mut().unwrap().remove("annotations");
        let binds = for_guest(&mut s, "c1", None).unwrap();
        assert_eq!(binds.len(), 2, "{binds:?}");
        let shm = &s["mounts"][2];
        assert_eq!(shm["destination"], "/dev/shm");
        assert_eq!(shm["type"], "tmpfs");
    }

    #[test]
    fn a_missing_bind_source_is_an_error() {
        let mut s = json!({"mounts": [{"destination": "/x", "type": "bind",
                                        "source": "/nonexistent/sandboxvm"}]});
        let e = for_guest(&mut s, "c", None).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/sandboxvm"), "{e}");
    }
}

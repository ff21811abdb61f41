//! The container's spec as its guest needs it: one function for `run`,
//! `create` and the containerd shim (as Kata's `amend_spec`). The spec a
//! caller gives names host things the guest cannot see or must not touch:
//!
//! - **bind mounts** of host paths become paths in the sandbox's virtio-fs
//!   share; the caller binds each returned [`HostBind`] there (read-only
//!   ones read-only for a guest that mounts the share itself, see
//!   [`crate::share::bind_tree`]). A source must be an absolute path that
//!   exists. `/dev/shm` becomes a tmpfs of the guest's, unless the
//!   container is one of a pod whose containers share it (the pod's shm
//!   directory then comes through the share, one for the pod);
//! - **the network namespace** is the pod network's (the guest's own) or a
//!   new one ([`GuestNetns`]);
//! - **namespace paths** name host processes: dropped, except that a pod's
//!   containers join the IPC, UTS and PID namespaces of the pod's sandbox
//!   container in the guest where the spec asks for shared ones;
//! - **hooks** name host programs: the runtime runs them on the host, the
//!   guest sees only `startContainer`, whose paths are the container's;
//! - **cgroupsPath** is a host path (the VM's cgroup there, see
//!   [`crate::cgroup`]): in the guest the container's cgroup is
//!   `/sandboxvm/<id>`.
//!
//! The spec is amended as JSON, so fields this runtime does not know reach
//! the agent unchanged.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Errors amending a spec.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is not what a container can be made of.
    #[error("{0}")]
    Invalid(String),
}

/// A host path to bind into the share at `<container dir>/mounts/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path.
    pub source: PathBuf,
    /// Its name under the container's `mounts/` directory.
    pub name: String,
    /// Read-only (`ro`/`rro`): in the share too, submounts included.
    pub readonly: bool,
}

/// Where the container's network namespace is in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestNetns {
    /// The guest's root namespace, the pod network: the spec's network
    /// namespace entry goes.
    Pod,
    /// A new namespace of its own (loopback only): a host path in the
    /// spec's entry goes (it means nothing in the guest).
    Isolated,
}

/// How to amend a spec.
#[derive(Debug, Clone)]
pub struct Amend<'a> {
    /// The container's id.
    pub id: &'a str,
    /// The container's directory in the share as the guest sees it; host
    /// binds go to its `mounts/`.
    pub share_dir: PathBuf,
    /// Its network namespace.
    pub netns: GuestNetns,
    /// The guest pid of the pod's sandbox container, whose IPC, UTS and PID
    /// namespaces the container joins where its spec names one by path.
    pub sandbox_pid: Option<u32>,
    /// A pod's container: its `/dev/shm` bind (the pod's) is shared, not
    /// made a tmpfs.
    pub pod_shm: bool,
    /// A Kubernetes pod's container: user and time namespaces, which the
    /// agent does not make, are dropped with a warning (a pod's
    /// `hostUsers: false`; the VM is the pod's boundary) rather than
    /// refused, as `run` and `create` refuse them (the agent says so).
    pub drop_user_and_time: bool,
    /// Where a relative bind source is (the bundle directory).
    pub bundle_dir: PathBuf,
}

/// The amended spec and the host paths the guest's mounts need.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The spec for the agent.
    pub json: String,
    /// What to bind into the share, under the container's `mounts/`.
    pub binds: Vec<HostBind>,
    /// `root.readonly`: the rootfs is shared read-only, so that a guest
    /// that mounts the share itself cannot write it either; the agent
    /// cannot then make mount points in it: [`GuestSpec::mount_points`].
    pub readonly_root: bool,
    /// With `readonly_root`, the mount points the agent needs in the rootfs
    /// itself (a mount's destination not inside another mount), relative to
    /// the rootfs, and whether each is a file (a bind of a file); else none
    /// (the agent makes them in the writable rootfs).
    pub mount_points: Vec<(PathBuf, bool)>,
}

/// The guest's version of `spec` (config.json), as the module says.
pub fn amend(spec: &Value, how: &Amend<'_>) -> Result<GuestSpec, Error> {
    let mut spec = spec.clone();
    if !spec.is_object() {
        return Err(Error::Invalid("config.json is not a JSON object".into()));
    }
    amend_namespaces(&mut spec, how)?;
    warn_unapplied_labels(&spec, how.id);
    let readonly_root = spec["root"]["readonly"].as_bool().unwrap_or(false);
    let mount_points = if readonly_root {
        mount_points(&spec, &how.bundle_dir)
    } else {
        Vec::new()
    };
    let binds = amend_mounts(&mut spec, how)?;
    if let Some(linux) = spec["linux"].as_object_mut() {
        linux.insert(
            "cgroupsPath".into(),
            json!(format!("/sandboxvm/{}", how.id)),
        );
    }
    if let Some(obj) = spec.as_object_mut() {
        match obj
            .get("hooks")
            .and_then(|h| h.get("startContainer"))
            .cloned()
        {
            Some(start) => {
                obj.insert("hooks".into(), json!({ "startContainer": start }));
            }
            None => {
                obj.remove("hooks");
            }
        }
    }
    let json = serde_json::to_string(&spec).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(GuestSpec {
        json,
        binds,
        readonly_root,
        mount_points,
    })
}

/// The security labels of the spec that the guest cannot apply, one
/// warning each: its kernel has no AppArmor or SELinux, and a host's
/// profile confines host processes, which the container's are not (the VM
/// and the confined VMM are its boundary). They are not refused because
/// Docker and podman set their default profile on every container of a
/// host with either LSM, as Kata and gVisor accept them; `sandboxvm
/// features` says both are disabled, and an exec asking for one by flag is
/// refused.
fn warn_unapplied_labels(spec: &Value, id: &str) {
    for (key, value) in [
        (
            "process.apparmorProfile",
            &spec["process"]["apparmorProfile"],
        ),
        ("process.selinuxLabel", &spec["process"]["selinuxLabel"]),
        ("linux.mountLabel", &spec["linux"]["mountLabel"]),
    ] {
        match value.as_str() {
            None | Some("" | "unconfined") => {}
            Some(label) => log::warn!(
                "container {id}: {key} {:?} is not applied: the guest kernel has no AppArmor or \
                 SELinux (the VM confines the container)",
                label.chars().take(200).collect::<String>()
            ),
        }
    }
}

/// The spec's mount destinations that lie in the rootfs itself (not
/// below another mount's destination), as paths relative to the rootfs;
/// a destination with `..` or `.` is left to the agent, which refuses it.
/// A relative bind source is `bundle_dir`'s.
fn mount_points(spec: &Value, bundle_dir: &Path) -> Vec<(PathBuf, bool)> {
    let mounts = spec["mounts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let rel = |m: &Value| -> Option<PathBuf> {
        let d = m["destination"].as_str()?;
        let parts: Vec<&str> = d.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || parts.iter().any(|p| matches!(*p, "." | "..")) {
            return None;
        }
        Some(parts.iter().collect())
    };
    let dests: Vec<PathBuf> = mounts.iter().filter_map(rel).collect();
    let mut out: Vec<(PathBuf, bool)> = Vec::new();
    for m in mounts {
        let Some(d) = rel(m) else { continue };
        if dests.iter().any(|o| o != &d && d.starts_with(o)) || out.iter().any(|(o, _)| o == &d) {
            continue;
        }
        let is_file = is_bind(m)
            && m["source"]
                .as_str()
                .is_some_and(|s| std::fs::metadata(bundle_dir.join(s)).is_ok_and(|m| !m.is_dir()));
        out.push((d, is_file));
    }
    out
}

/// The spec's namespaces as the guest makes them. A path the guest can
/// stand for is rewritten (a pod's sandbox container's IPC, UTS and PID
/// namespaces); a network namespace path is mirrored into the VM by the
/// host ([`crate::net`]), so the guest's is a new one; any other path names
/// a host process's namespace, which a guest kernel cannot enter: refused,
/// as the runtime spec asks of what a runtime cannot apply.
fn amend_namespaces(spec: &mut Value, how: &Amend<'_>) -> Result<(), Error> {
    let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() else {
        return Ok(());
    };
    if how.netns == GuestNetns::Pod {
        namespaces.retain(|ns| ns["type"] != "network");
    }
    if how.drop_user_and_time {
        namespaces.retain(|ns| {
            let drop = matches!(ns["type"].as_str(), Some("user" | "time"));
            if drop {
                log::warn!(
                    "container {}: no {} namespace in the guest (the VM isolates the pod)",
                    how.id,
                    ns["type"].as_str().unwrap_or_default()
                );
            }
            !drop
        });
    }
    for ns in namespaces.iter_mut() {
        let typ = ns["type"].as_str().unwrap_or_default().to_string();
        let Some(obj) = ns.as_object_mut() else {
            continue;
        };
        let path = obj
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        match (path, how.sandbox_pid, typ.as_str()) {
            (Some(_), Some(pid), "ipc" | "uts" | "pid") => {
                obj.insert("path".into(), json!(format!("/proc/{pid}/ns/{typ}")));
            }
            (None, ..) | (Some(_), _, "network") => {
                obj.remove("path");
            }
            (Some(path), ..) => {
                return Err(Error::Invalid(format!(
                    "linux.namespaces: the {typ} namespace at {path} cannot be joined: \
                     the container runs in a VM of its own, whose kernel cannot enter a host \
                     process's namespace"
                )));
            }
        }
    }
    Ok(())
}

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"].as_array().is_some_and(|o| {
            o.iter()
                .any(|o| matches!(o.as_str(), Some("bind" | "rbind")))
        })
}

/// A file name for `source` under `mounts/`, unique by `index`, of
/// characters that need no quoting anywhere.
fn bind_name(index: usize, source: &Path) -> String {
    let base: String = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .take(64)
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

fn amend_mounts(spec: &mut Value, how: &Amend<'_>) -> Result<Vec<HostBind>, Error> {
    let mut binds = Vec::new();
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok(binds);
    };
    for m in mounts.iter_mut() {
        if !is_bind(m) {
            continue;
        }
        let dest = m["destination"].as_str().unwrap_or_default().to_string();
        if dest == "/dev/shm" && !how.pod_shm {
            *m = json!({
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            });
            continue;
        }
        let given = m["source"].as_str().unwrap_or_default();
        if given.is_empty() {
            return Err(Error::Invalid(format!("bind mount {dest:?} has no source")));
        }
        // A relative source is the bundle's (the OCI spec allows it).
        let source = how.bundle_dir.join(given);
        if std::fs::metadata(&source).is_err() {
            return Err(Error::Invalid(format!(
                "bind mount {dest:?}: {}: no such file or directory",
                source.display()
            )));
        }
        let name = bind_name(binds.len(), &source);
        let readonly = m["options"].as_array().is_some_and(|o| {
            o.iter()
                .filter_map(Value::as_str)
                .any(crate::share::is_readonly_option)
        });
        m["source"] = json!(how.share_dir.join("mounts").join(&name));
        binds.push(HostBind {
            source,
            name,
            readonly,
        });
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
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "uts", "path": "/proc/4242/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "user"},
                    {"type": "time"},
                ],
                "unknownToUs": {"kept": true},
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "type": "bind",
                 "source": "/tmp", "options": ["rbind", "ro"]},
                {"destination": "/etc/resolv.conf", "source": "/etc/resolv.conf",
                 "options": ["bind", "rro"]},
            ],
        })
    }

    fn how(netns: GuestNetns, sandbox_pid: Option<u32>, pod_shm: bool) -> Amend<'static> {
        Amend {
            id: "c1",
            share_dir: PathBuf::from("/run/sandboxvm/shares/sbx-rootfs/c1"),
            netns,
            sandbox_pid,
            pod_shm,
            drop_user_and_time: pod_shm,
            bundle_dir: PathBuf::from("/nonexistent/bundle"),
        }
    }

    fn amended(spec: &Value, how: &Amend<'_>) -> (Value, Vec<HostBind>) {
        let g = amend(spec, how).unwrap();
        (serde_json::from_str(&g.json).unwrap(), g.binds)
    }

    #[test]
    fn a_pods_container_joins_its_sandboxs_namespaces_and_the_pod_network() {
        let (s, _) = amended(&cri_spec(), &how(GuestNetns::Pod, Some(17), true));
        assert_eq!(
            s["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/17/ns/ipc"},
                {"type": "uts", "path": "/proc/17/ns/uts"},
                {"type": "mount"},
            ])
        );
    }

    fn without_ipc_and_uts_paths() -> Value {
        let mut spec = cri_spec();
        for ns in spec["linux"]["namespaces"].as_array_mut().unwrap() {
            if ns["type"] != "network" {
                ns.as_object_mut().unwrap().remove("path");
            }
        }
        spec
    }

    #[test]
    fn a_mirrored_netns_path_goes_and_an_isolated_container_keeps_a_netns_of_its_own() {
        let spec = without_ipc_and_uts_paths();
        let (s, _) = amended(&spec, &how(GuestNetns::Isolated, None, false));
        assert_eq!(
            s["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network"},
                {"type": "user"},
                {"type": "time"},
            ])
        );
        let (s, _) = amended(&spec, &how(GuestNetns::Pod, None, false));
        assert_eq!(
            s["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "user"},
                {"type": "time"},
            ])
        );
    }

    #[test]
    fn a_host_namespace_path_the_guest_cannot_stand_for_is_refused() {
        // No sandbox container to join: the ipc path is a host process's.
        let e = amend(&cri_spec(), &how(GuestNetns::Isolated, None, false)).unwrap_err();
        assert_eq!(e.to_string().lines().count(), 1, "one line: {e}");
        assert!(
            e.to_string()
                .contains("the ipc namespace at /proc/4242/ns/ipc cannot be joined"),
            "{e}"
        );
        // Not even in a pod: only ipc, uts and pid are the sandbox's.
        let mut spec = cri_spec();
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "cgroup", "path": "/proc/1/ns/cgroup"}));
        let e = amend(&spec, &how(GuestNetns::Pod, Some(17), true)).unwrap_err();
        assert!(
            e.to_string()
                .contains("the cgroup namespace at /proc/1/ns/cgroup"),
            "{e}"
        );
    }

    #[test]
    fn a_kubernetes_pods_user_and_time_namespaces_go() {
        let (s, _) = amended(&cri_spec(), &how(GuestNetns::Pod, Some(17), true));
        assert_eq!(
            s["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/17/ns/ipc"},
                {"type": "uts", "path": "/proc/17/ns/uts"},
                {"type": "mount"}
            ])
        );
    }

    #[test]
    fn host_binds_move_into_the_share_with_a_pods_shm() {
        let (s, binds) = amended(&cri_spec(), &how(GuestNetns::Pod, Some(17), true));
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
    }

    #[test]
    fn hooks_go_the_cgroup_is_the_guests_and_unknown_fields_stay() {
        let (s, _) = amended(&cri_spec(), &how(GuestNetns::Pod, Some(17), true));
        assert!(s.get("hooks").is_none());
        let mut spec = cri_spec();
        spec["hooks"]["startContainer"] = json!([{"path": "/bin/in-the-container"}]);
        let (s, _) = amended(&spec, &how(GuestNetns::Pod, Some(17), true));
        assert_eq!(
            s["hooks"],
            json!({"startContainer": [{"path": "/bin/in-the-container"}]}),
            "only the hooks the guest runs"
        );
        assert_eq!(s["linux"]["cgroupsPath"], "/sandboxvm/c1");
        assert_eq!(s["linux"]["unknownToUs"], json!({"kept": true}));
        assert_eq!(s["process"]["args"], json!(["sh"]));
    }

    #[test]
    fn a_stand_alone_containers_shm_becomes_a_tmpfs() {
        let (s, binds) = amended(&cri_spec(), &how(GuestNetns::Pod, Some(17), false));
        assert_eq!(binds.len(), 2, "{binds:?}");
        let shm = &s["mounts"][2];
        assert_eq!(shm["destination"], "/dev/shm");
        assert_eq!(shm["type"], "tmpfs");
    }

    #[test]
    fn bad_bind_sources_are_errors() {
        for (source, says) in [
            ("/nonexistent/sandboxvm", "no such file"),
            (
                "relative/path",
                "/nonexistent/bundle/relative/path: no such file",
            ),
            ("", "has no source"),
        ] {
            let s = json!({"mounts": [{"destination": "/x", "type": "bind", "source": source}]});
            let e = amend(&s, &how(GuestNetns::Pod, Some(17), false))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{source}: {e}");
        }
        let e = amend(&json!([1]), &how(GuestNetns::Pod, Some(17), false)).unwrap_err();
        assert!(e.to_string().contains("not a JSON object"));
    }

    #[test]
    fn mount_points_are_those_in_the_rootfs_itself() {
        let spec = json!({
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts"},
                {"destination": "/data/vol", "type": "bind", "source": "/tmp"},
                {"destination": "/x/../../escape", "type": "tmpfs", "source": "t"},
                {"destination": "/proc", "type": "proc", "source": "proc"},
            ],
        });
        let g = amend(&spec, &how(GuestNetns::Pod, Some(17), false)).unwrap();
        assert!(g.readonly_root);
        assert_eq!(
            g.mount_points,
            vec![
                (PathBuf::from("proc"), false),
                (PathBuf::from("dev"), false),
                (PathBuf::from("etc/hosts"), true),
                (PathBuf::from("data/vol"), false),
            ]
        );
        assert!(
            !amended(&cri_spec(), &how(GuestNetns::Pod, Some(17), false)).0["root"]["readonly"]
                .as_bool()
                .unwrap_or(false)
        );
    }

    #[test]
    fn a_relative_bind_source_is_the_bundles() {
        let mut h = how(GuestNetns::Pod, Some(17), false);
        h.bundle_dir = std::env::temp_dir();
        let name = format!("sandboxvm-rel-{}", std::process::id());
        std::fs::write(std::env::temp_dir().join(&name), "x").unwrap();
        let s = json!({
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [{"destination": "/x", "type": "bind", "source": name}],
        });
        let g = amend(&s, &h).unwrap();
        std::fs::remove_file(std::env::temp_dir().join(&name)).unwrap();
        assert_eq!(g.binds[0].source, std::env::temp_dir().join(&name));
        // A file, so its mount point in a read-only rootfs is a file.
        assert_eq!(g.mount_points, vec![(PathBuf::from("x"), true)]);
    }

    #[test]
    fn bind_names_are_plain_and_bounded() {
        assert_eq!(bind_name(3, Path::new("/a/b c$(x)")), "3-b_c__x_");
        assert_eq!(bind_name(0, Path::new("/")), "0-root");
        assert!(bind_name(9, Path::new(&format!("/{}", "y".repeat(300)))).len() < 70);
    }
}

//! Turns OCI runtime-spec values into plain settings the forked container
//! processes use (computed in the agent, before forking).

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::Error;

/// The default `PATH` when the process environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capability sets of a process (None = leave as inherited).
#[derive(Clone, Debug, Default)]
pub struct CapSets {
    pub bounding: HashSet<caps::Capability>,
    pub effective: HashSet<caps::Capability>,
    pub permitted: HashSet<caps::Capability>,
    pub inheritable: HashSet<caps::Capability>,
    pub ambient: HashSet<caps::Capability>,
}

/// What a container process runs as.
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<CString>,
    pub path_env: String,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub terminal: bool,
    pub caps: Option<CapSets>,
    pub rlimits: Vec<(i32, u64, u64)>,
    pub no_new_privileges: bool,
    /// Written to /proc/self/oom_score_adj before the identity changes.
    pub oom_score_adj: Option<i32>,
    /// The container's seccomp profile (an exec'd process gets its
    /// container's).
    pub seccomp: Option<Arc<super::seccomp::Program>>,
}

/// One mount of `mounts`, with its options decoded.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub destination: PathBuf,
    pub typ: String,
    pub source: Option<PathBuf>,
    pub flags: MsFlags,
    pub propagation: MsFlags,
    pub data: String,
    pub bind: bool,
}

/// Everything the container init needs to set up its sandbox.
#[derive(Clone, Debug)]
pub struct ContainerConfig {
    pub rootfs: PathBuf,
    pub readonly_root: bool,
    /// `linux.rootfsPropagation`, applied to the container's / once it is
    /// its root (empty: private, as the agent makes every mount first).
    pub root_propagation: MsFlags,
    pub hostname: Option<String>,
    /// Namespaces to create.
    pub new_ns: CloneFlags,
    /// Namespaces to join (type, path), a user namespace first.
    pub join_ns: Vec<(CloneFlags, PathBuf)>,
    /// The maps of a new user namespace (`new_ns` has CLONE_NEWUSER).
    pub id_maps: Option<super::userns::IdMaps>,
    pub mounts: Vec<MountConfig>,
    pub masked_paths: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    /// `linux.sysctl`: (path under /proc/sys, value), written in the
    /// container's namespaces.
    pub sysctl: Vec<(PathBuf, String)>,
    /// `linux.devices`: nodes made in the container's /dev (the guest's
    /// devices: its kernel's numbers).
    pub devices: Vec<DeviceConfig>,
    pub process: ProcessConfig,
    /// Files shown over the rootfs's own (path relative to the rootfs,
    /// content): /etc/resolv.conf and /etc/hosts of the pod network.
    pub etc_files: Vec<(PathBuf, String)>,
    /// The hostname and `etc_files` as the agent wrote them for the
    /// container ([`super::mounts::stage_etc`]).
    pub staged_etc: Vec<super::mounts::EtcFile>,
    /// `hooks.startContainer`, run in the container just before its
    /// program, as the container's user.
    pub start_hooks: Vec<HookConfig>,
    /// The state JSON the hooks read (id, status, bundle; the pid is added
    /// in the container).
    pub state: String,
}

/// A device node of `linux.devices`.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Absolute, in the container.
    pub path: PathBuf,
    /// S_IFCHR, S_IFBLK or S_IFIFO.
    pub kind: nix::sys::stat::SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

fn device_config(d: &oci_spec::runtime::LinuxDevice) -> Result<DeviceConfig, Error> {
    use nix::sys::stat::SFlag;
    use oci_spec::runtime::LinuxDeviceType as T;
    let bad =
        |what: &str| Error::InvalidSpec(format!("linux.devices {}: {what}", d.path().display()));
    let path = d.path().clone();
    if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
        return Err(bad("the path must be absolute, without .."));
    }
    let kind = match d.typ() {
        T::C | T::U => SFlag::S_IFCHR,
        T::B => SFlag::S_IFBLK,
        T::P => SFlag::S_IFIFO,
        T::A => return Err(bad("type a is for the device cgroup, not a node")),
    };
    let num = |v: i64, what: &str| u64::try_from(v).map_err(|_| bad(&format!("negative {what}")));
    Ok(DeviceConfig {
        path,
        kind,
        major: num(d.major(), "major")?,
        minor: num(d.minor(), "minor")?,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// A hook to run in the guest.
#[derive(Clone, Debug)]
pub struct HookConfig {
    pub path: CString,
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    /// Seconds; None: no limit.
    pub timeout: Option<u32>,
}

impl ContainerConfig {
    /// Whether the container stays in the guest's network namespace.
    pub fn in_guest_netns(&self) -> bool {
        !self.new_ns.contains(CloneFlags::CLONE_NEWNET)
            && !self
                .join_ns
                .iter()
                .any(|(f, _)| f.contains(CloneFlags::CLONE_NEWNET))
    }

    /// Whether the spec mounts something at `dest` (absolute).
    pub fn mounts_at(&self, dest: &Path) -> bool {
        self.mounts.iter().any(|m| m.destination == dest)
    }
}

fn ns_flag(t: LinuxNamespaceType) -> Option<CloneFlags> {
    Some(match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        _ => return None,
    })
}

/// Parses config.json and decodes what the agent supports.
pub fn container_config(spec: &Spec, rootfs: PathBuf) -> Result<ContainerConfig, Error> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("config.json has no process".into()))?;
    let mut new_ns = CloneFlags::CLONE_NEWNS;
    let mut join_ns = Vec::new();
    let mut masked_paths = Vec::new();
    let mut readonly_paths = Vec::new();
    let mut sysctl = Vec::new();
    let mut devices = Vec::new();
    let mut id_maps = None;
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().iter().flatten() {
            let Some(flag) = ns_flag(ns.typ()) else {
                return Err(Error::InvalidSpec(format!(
                    "namespace type {} is not supported by the agent",
                    ns.typ()
                )));
            };
            match ns.path() {
                Some(p) if !p.as_os_str().is_empty() => join_ns.push((flag, p.clone())),
                _ => new_ns |= flag,
            }
        }
        // A user namespace is joined before the others (they may be its).
        join_ns.sort_by_key(|(f, _)| !f.contains(CloneFlags::CLONE_NEWUSER));
        id_maps = super::userns::id_maps(linux, new_ns.contains(CloneFlags::CLONE_NEWUSER))?;
        let abs = |v: &Option<Vec<String>>| -> Vec<PathBuf> {
            v.iter()
                .flatten()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .collect()
        };
        masked_paths = abs(linux.masked_paths());
        readonly_paths = abs(linux.readonly_paths());
        for (key, value) in linux.sysctl().iter().flatten() {
            sysctl.push((sysctl_path(key)?, value.clone()));
        }
        for d in linux.devices().iter().flatten() {
            devices.push(device_config(d)?);
        }
    }
    let mut process = process_config(process)?;
    process.seccomp = super::seccomp::from_spec(spec.linux().as_ref())?;
    let mut mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        mounts.push(mount_config(m)?);
    }
    let root_propagation = match spec.linux().as_ref().and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") => MsFlags::empty(),
        Some(p) => protocol::mount_options::propagation_of(p).ok_or_else(|| {
            Error::InvalidSpec(format!(
                "linux.rootfsPropagation {p:?}: expected shared, slave, private or unbindable (r... for recursive)"
            ))
        })?,
    };
    Ok(ContainerConfig {
        rootfs,
        root_propagation,
        readonly_root: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        new_ns,
        join_ns,
        id_maps,
        mounts,
        masked_paths,
        readonly_paths,
        sysctl,
        devices,
        process,
        etc_files: Vec::new(),
        staged_etc: Vec::new(),
        start_hooks: spec
            .hooks()
            .as_ref()
            .and_then(|h| h.start_container().as_ref())
            .into_iter()
            .flatten()
            .map(hook_config)
            .collect::<Result<_, _>>()?,
        state: String::new(),
    })
}

fn hook_config(h: &oci_spec::runtime::Hook) -> Result<HookConfig, Error> {
    let bad = |what: &str| {
        Error::InvalidSpec(format!(
            "hooks.startContainer {}: {what}",
            h.path().display()
        ))
    };
    let cstr = |s: &str| CString::new(s).map_err(|_| bad("a NUL byte"));
    if !h.path().is_absolute() {
        return Err(bad("the path must be absolute"));
    }
    let path = cstr(&h.path().to_string_lossy())?;
    let mut args = h
        .args()
        .iter()
        .flatten()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    if args.is_empty() {
        args.push(path.clone());
    }
    Ok(HookConfig {
        path,
        args,
        env: h
            .env()
            .iter()
            .flatten()
            .map(|e| cstr(e))
            .collect::<Result<_, _>>()?,
        timeout: h
            .timeout()
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0),
    })
}

/// `net.ipv4.ip_forward` → `net/ipv4/ip_forward`. A sysctl of the guest
/// kernel: namespaced ones (net.*, kernel.shm*, fs.mqueue.*...) are the
/// container's, others the pod VM's own (runc refuses those, as they
/// would change the host; here they only change this pod's guest).
fn sysctl_path(key: &str) -> Result<PathBuf, Error> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        });
    if !ok {
        return Err(Error::InvalidSpec(format!(
            "linux.sysctl: {:?} is not a sysctl name",
            key.chars().take(100).collect::<String>()
        )));
    }
    Ok(key.split('.').collect())
}

fn mount_config(m: &oci_spec::runtime::Mount) -> Result<MountConfig, Error> {
    let destination = m.destination().clone();
    if !destination.is_absolute() {
        return Err(Error::InvalidSpec(format!(
            "mount destination {} is not absolute",
            destination.display()
        )));
    }
    if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
        return Err(Error::InvalidSpec(format!(
            "mount {}: id-mapped mounts (uidMappings/gidMappings) are not supported",
            destination.display()
        )));
    }
    let options = m.options().clone().unwrap_or_default();
    let (flags, propagation, data) = protocol::mount_options::parse(&options);
    let bind = m.typ().as_deref() == Some("bind") || flags.contains(MsFlags::MS_BIND);
    Ok(MountConfig {
        destination,
        typ: m
            .typ()
            .clone()
            .unwrap_or_else(|| if bind { "bind".into() } else { "none".into() }),
        source: m.source().clone(),
        flags,
        propagation,
        data,
        bind,
    })
}

fn cap_set(
    set: &Option<oci_spec::runtime::Capabilities>,
) -> Result<HashSet<caps::Capability>, Error> {
    let mut out = HashSet::new();
    for c in set.iter().flatten() {
        let name = format!("CAP_{c}");
        let cap = name
            .parse::<caps::Capability>()
            .map_err(|_| Error::InvalidSpec(format!("unknown capability {name}")))?;
        if caps::all().contains(&cap) || caps::runtime::thread_all_supported().contains(&cap) {
            out.insert(cap);
        }
    }
    Ok(out)
}

fn rlimit_resource(name: &str) -> Option<i32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as i32)
}

/// Decodes an OCI `process`.
pub fn process_config(p: &Process) -> Result<ProcessConfig, Error> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(Error::InvalidSpec("process.args is empty".into()));
    }
    let env_strs = p.env().clone().unwrap_or_default();
    let path_env = env_strs
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let env = env_strs
        .iter()
        .map(|e| CString::new(e.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Error::InvalidSpec("process.env has a NUL byte".into()))?;
    let caps = match p.capabilities() {
        None => None,
        Some(c) => Some(CapSets {
            bounding: cap_set(c.bounding())?,
            effective: cap_set(c.effective())?,
            permitted: cap_set(c.permitted())?,
            inheritable: cap_set(c.inheritable())?,
            ambient: cap_set(c.ambient())?,
        }),
    };
    let mut rlimits = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let name = r.typ().to_string();
        let res = rlimit_resource(&name)
            .ok_or_else(|| Error::InvalidSpec(format!("unknown rlimit {name}")))?;
        rlimits.push((res, r.soft(), r.hard()));
    }
    let cwd = p.cwd().clone();
    Ok(ProcessConfig {
        args,
        env,
        path_env,
        cwd: if cwd.as_os_str().is_empty() {
            "/".into()
        } else {
            cwd
        },
        uid: p.user().uid(),
        gid: p.user().gid(),
        additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
        umask: p.user().umask(),
        terminal: p.terminal().unwrap_or(false),
        caps,
        rlimits,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        oom_score_adj: p.oom_score_adj(),
        seccomp: None,
    })
}

/// Finds `arg0` like execvp, in the current root (the container's, once
/// called after pivot_root/chroot). Errors with the message the caller sees.
pub fn resolve_executable(arg0: &str, path_env: &str) -> Result<CString, String> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let found = if arg0.contains('/') {
        if !Path::new(arg0).exists() {
            return Err(format!(
                "exec: \"{arg0}\": stat {arg0}: no such file or directory"
            ));
        }
        PathBuf::from(arg0)
    } else {
        path_env
            .split(':')
            .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(arg0))
            .find(|p| is_exec(p))
            .ok_or_else(|| format!("exec: \"{arg0}\": executable file not found in $PATH"))?
    };
    CString::new(found.into_os_string().into_encoded_bytes())
        .map_err(|_| format!("exec: \"{arg0}\": NUL byte in path"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespaces_sandboxvm_features_lists_are_the_ones_taken() {
        let all = [
            "cgroup", "ipc", "mount", "network", "pid", "uts", "user", "time",
        ];
        for name in all {
            let t: LinuxNamespaceType = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(
                ns_flag(t).is_some(),
                protocol::guest_features::NAMESPACES.contains(&name),
                "{name}"
            );
        }
    }

    #[test]
    fn a_sysctl_name_is_dots_between_plain_words() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("net/ipv4/ip_forward")
        );
        for bad in [
            "",
            "net..x",
            ".net",
            "net/../x",
            "kernel.x y",
            "net.ipv4.conf.eth0/1",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad:?}");
        }
    }

    /// `linux.rootfsPropagation` becomes the flags applied to the
    /// container's root; a value that is none is refused by name.
    #[test]
    fn the_rootfs_propagation_is_read_or_refused() {
        let config = |p: Option<&str>| {
            let mut spec: Spec = serde_json::from_value(serde_json::json!({
                "ociVersion": "1.2.0",
                "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"},
                "linux": {"rootfsPropagation": p}
            }))
            .unwrap();
            if p.is_none() {
                spec.set_linux(None);
            }
            container_config(&spec, "/r".into())
        };
        assert_eq!(config(None).unwrap().root_propagation, MsFlags::empty());
        assert_eq!(
            config(Some("rshared")).unwrap().root_propagation,
            MsFlags::MS_SHARED | MsFlags::MS_REC
        );
        assert_eq!(
            config(Some("unbindable")).unwrap().root_propagation,
            MsFlags::MS_UNBINDABLE
        );
        let e = config(Some("bogus")).unwrap_err().to_string();
        assert!(e.contains("linux.rootfsPropagation \"bogus\""), "{e}");
    }
}

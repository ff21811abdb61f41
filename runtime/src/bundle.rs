//! An OCI bundle: `config.json` and the root filesystem it names.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Errors loading a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bundle directory does not exist.
    #[error("bundle {0}: no such directory")]
    NoBundle(PathBuf),
    /// config.json is missing.
    #[error("{0}: no such file (is this an OCI bundle?)")]
    NoConfig(PathBuf),
    /// config.json does not parse.
    #[error("{path}: malformed config: {reason}")]
    Malformed {
        /// The config file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// ociVersion is not a 1.x version.
    #[error("{path}: unsupported ociVersion {version:?} (1.0.0 to 1.3.x supported)")]
    Version {
        /// The config file.
        path: PathBuf,
        /// The version found.
        version: String,
    },
    /// No process, or no args.
    #[error("{0}: process.args must not be empty")]
    NoArgs(PathBuf),
    /// root.path does not exist.
    #[error("root filesystem {0}: no such directory")]
    NoRootfs(PathBuf),
}

/// A loaded, checked bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory (absolute).
    pub dir: PathBuf,
    /// The root filesystem (absolute).
    pub rootfs: PathBuf,
    /// The parsed spec.
    pub spec: Spec,
    /// config.json as found (what the agent gets).
    pub config_json: String,
}

impl Bundle {
    /// Loads `dir/config.json` and checks what the runtime relies on.
    pub fn load(dir: &Path) -> Result<Bundle, Error> {
        if !dir.is_dir() {
            return Err(Error::NoBundle(dir.to_path_buf()));
        }
        let dir = std::fs::canonicalize(dir).map_err(|_| Error::NoBundle(dir.to_path_buf()))?;
        let path = dir.join("config.json");
        let config_json = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NoConfig(path.clone()),
            _ => Error::Malformed {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
        let spec: Spec = serde_json::from_str(&config_json).map_err(|e| Error::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        check_version(spec.version()).map_err(|version| Error::Version {
            path: path.clone(),
            version,
        })?;
        let args_ok = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .is_some_and(|a| !a.is_empty());
        if !args_ok {
            return Err(Error::NoArgs(path));
        }
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root.is_absolute() {
            root
        } else {
            dir.join(root)
        };
        if !rootfs.is_dir() {
            return Err(Error::NoRootfs(rootfs));
        }
        Ok(Bundle {
            dir,
            rootfs,
            spec,
            config_json,
        })
    }

    /// The host cgroup of sandbox `id`'s VMM and virtiofsd: the spec's
    /// `linux.cgroupsPath` ([`crate::cgroup::resolve`]).
    pub fn host_cgroup(
        &self,
        id: &crate::oci::ContainerId,
    ) -> Result<Option<PathBuf>, crate::cgroup::Error> {
        let path = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy());
        crate::cgroup::resolve(path.as_deref(), id)
    }

    /// A number the CRI put in annotation `key` (containerd writes a pod
    /// sandbox's resources, the sum of its containers' limits, there).
    fn cri_number(&self, key: &str) -> Option<i64> {
        self.spec
            .annotations()
            .as_ref()?
            .get(key)?
            .trim()
            .parse()
            .ok()
    }

    /// vCPUs for the VM: enough for the spec's CPU quota, or for a pod
    /// sandbox the quota of the whole pod the CRI annotates it with,
    /// whichever is larger; at least 1, at most 32.
    pub fn vcpus(&self) -> u8 {
        let cpu = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.cpu().as_ref());
        let own = match cpu {
            Some(c) => cpus_for(c.quota().unwrap_or(0), c.period().unwrap_or(100_000)),
            None => 1,
        };
        let pod = match (
            self.cri_number(SANDBOX_CPU_QUOTA),
            self.cri_number(SANDBOX_CPU_PERIOD),
        ) {
            (Some(quota), Some(period)) => cpus_for(quota, u64::try_from(period).unwrap_or(0)),
            _ => 1,
        };
        own.max(pod)
    }

    /// Guest memory in MiB the spec needs: its memory limit (or for a pod
    /// sandbox, the pod's the CRI annotates it with, whichever is larger)
    /// plus room for the guest kernel and agent; None without a limit (the
    /// configuration's default applies, [`crate::config::Config::size`]).
    pub fn memory_mib(&self) -> Option<u64> {
        let own = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        let pod = self.cri_number(SANDBOX_MEMORY);
        let limit = own.into_iter().chain(pod).filter(|&l| l > 0).max();
        limit.map(|bytes| (bytes as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB)
    }

    /// The spec's annotations.
    pub fn annotations(&self) -> impl Iterator<Item = (&String, &String)> {
        self.spec.annotations().iter().flat_map(|a| a.iter())
    }

    /// Whether the process wants a terminal.
    pub fn terminal(&self) -> bool {
        self.spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
    }
}

/// What the guest kernel and agent need on top of the container's limit.
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// The CRI's annotations of a pod sandbox's resources (containerd 1.6+,
/// from the kubelet's PodSandboxConfig: the sum of the containers' limits).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// See [`SANDBOX_CPU_QUOTA`].
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// See [`SANDBOX_CPU_QUOTA`]: bytes.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// vCPUs enough for a CPU quota per period: at least 1, at most 32.
pub(crate) fn cpus_for(quota: i64, period: u64) -> u8 {
    if quota <= 0 || period == 0 {
        return 1;
    }
    (quota as u64)
        .div_ceil(period)
        .clamp(1, crate::config::VCPU_LIMIT.into()) as u8
}

/// The newest runtime-spec version understood (any 1.3.x is taken).
pub const OCI_VERSION_MAX: &str = "1.3.0";

/// Accepts OCI runtime spec versions 1.0.0 to 1.3.x.
fn check_version(v: &str) -> Result<(), String> {
    let mut parts = v.split(['.', '-', '+']);
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    let patch = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor, patch) {
        (Some(1), Some(0..=3), Some(_)) => Ok(()),
        _ => Err(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str, rootfs: bool) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        std::fs::write(d.path().join("config.json"), config).unwrap();
        if rootfs {
            std::fs::create_dir(d.path().join("rootfs")).unwrap();
        }
        d
    }

    /// A minimal temporary directory, removed on drop.
    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p = std::env::temp_dir()
                    .join(format!("sandboxvm-bundle-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","process":{"args":["echo","hi"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"},
        "linux":{"resources":{"memory":{"limit":536870912},"cpu":{"quota":150000,"period":100000}}}}"#;

    #[test]
    fn a_good_bundle_loads_and_sizes_the_vm_from_its_resources() {
        let d = bundle(GOOD, true);
        let b = Bundle::load(d.path()).unwrap();
        assert_eq!(
            b.rootfs,
            std::fs::canonicalize(d.path()).unwrap().join("rootfs")
        );
        assert_eq!(b.vcpus(), 2);
        assert_eq!(b.memory_mib(), Some(512 + GUEST_OVERHEAD_MIB));
        assert!(!b.terminal());
    }

    #[test]
    fn a_pod_sandbox_is_sized_for_its_pod_from_the_cri_annotations() {
        let pause = r#"{"ociVersion":"1.0.2","process":{"args":["/pause"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"},
            "annotations":{"io.kubernetes.cri.container-type":"sandbox",
                "io.kubernetes.cri.sandbox-cpu-quota":"250000","io.kubernetes.cri.sandbox-cpu-period":"100000",
                "io.kubernetes.cri.sandbox-memory":"1073741824"},
            "linux":{"resources":{"cpu":{"shares":2}}}}"#;
        let b = Bundle::load(bundle(pause, true).path()).unwrap();
        assert_eq!(b.vcpus(), 3);
        assert_eq!(b.memory_mib(), Some(1024 + GUEST_OVERHEAD_MIB));
        // No limits in the pod (0, as containerd writes it): the defaults.
        let unlimited = pause.replace("250000", "0").replace("1073741824", "0");
        let b = Bundle::load(bundle(&unlimited, true).path()).unwrap();
        assert_eq!(b.vcpus(), 1);
        assert_eq!(b.memory_mib(), None);
        // Garbage is ignored; the container's own limits still count.
        let junk = GOOD.replace(
            r#""root":"#,
            r#""annotations":{"io.kubernetes.cri.sandbox-memory":"lots","io.kubernetes.cri.sandbox-cpu-quota":"-5","io.kubernetes.cri.sandbox-cpu-period":"x"},"root":"#,
        );
        let b = Bundle::load(bundle(&junk, true).path()).unwrap();
        assert_eq!(b.vcpus(), 2);
        assert_eq!(b.memory_mib(), Some(512 + GUEST_OVERHEAD_MIB));
    }

    #[test]
    fn bad_bundles_get_errors_naming_the_problem() {
        let d = tempdir::Dir::new();
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("config.json: no such file (is this an OCI bundle?)"),
            "{e}"
        );

        let d = bundle("{not json", true);
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("config.json: malformed config: "), "{e}");

        let d = bundle(&GOOD.replace("1.0.2", "2.0.0"), true);
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("unsupported ociVersion \"2.0.0\""), "{e}");

        let d = bundle(&GOOD.replace(r#"["echo","hi"]"#, "[]"), true);
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(e.ends_with("process.args must not be empty"), "{e}");

        let d = bundle(GOOD, false);
        let e = Bundle::load(d.path()).unwrap_err().to_string();
        assert!(
            e.starts_with("root filesystem ") && e.ends_with("rootfs: no such directory"),
            "{e}"
        );

        let e = Bundle::load(Path::new("/nonexistent/b"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "bundle /nonexistent/b: no such directory");
    }

    #[test]
    fn versions() {
        for ok in ["1.0.0", "1.0.2-dev", "1.1.0", "1.2.1", "1.3.0"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1", "0.9.0", "1.4.0", "2.0.0", "latest"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }
}

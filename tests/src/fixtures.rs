//! Fixtures of the end-to-end tests: the guest kernel, the agent initramfs
//! and busybox bundles (resources/make-busybox-bundle), built once per test
//! binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::{agent_initramfs, guest_kernel, on_kvm_host, repo_root, sandboxvm_bin};

/// What a sandbox needs.
pub struct Artefacts {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initrd: PathBuf,
    /// A bundle made by resources/make-busybox-bundle (its rootfs is copied
    /// per test).
    pub template: PathBuf,
}

/// This test process's scratch directory.
pub fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("sandboxvm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds (or finds in the cache) the kernel, initramfs and a template
/// bundle, once.
pub fn artefacts() -> &'static Artefacts {
    static A: OnceLock<Artefacts> = OnceLock::new();
    A.get_or_init(|| {
        let kernel = guest_kernel().expect("guest kernel");
        let initrd = agent_initramfs().expect("agent initramfs");
        let template = work_dir().join("template");
        let out = Command::new(repo_root().join("resources/make-busybox-bundle"))
            .arg(&template)
            .env("SANDBOXVM", sandboxvm_bin())
            .output()
            .expect("run make-busybox-bundle");
        assert!(
            out.status.success(),
            "make-busybox-bundle failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Artefacts {
            kernel,
            initrd,
            template,
        }
    })
}

/// A fresh bundle named `name` with process.args `args`, the spec tweaked by
/// `tweak`.
pub fn bundle(name: &str, args: &[&str], tweak: impl FnOnce(&mut Value)) -> PathBuf {
    let a = artefacts();
    let dir = work_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(a.template.join("rootfs"))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let mut spec: Value =
        serde_json::from_str(&std::fs::read_to_string(a.template.join("config.json")).unwrap())
            .unwrap();
    spec["process"]["args"] = json!(args);
    tweak(&mut spec);
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
    dir
}

/// Writes `text` as `dir/script.sh` and runs it (`bash -x`) on the KVM host
/// under a child subreaper (tests/scripts/subreaper.py, as containerd's
/// shims and conmon are), which writes "pid exit-code" of each orphan it
/// reaped (the container monitors) to `dir/reaped`; the script's output
/// goes to `dir/script.log`.
pub fn run_reaped(dir: &Path, text: &str) {
    let path = dir.join("script.sh");
    std::fs::write(&path, text).unwrap();
    let reaper = repo_root().join("tests/scripts/subreaper.py");
    let out = on_kvm_host(&[
        "python3",
        reaper.to_str().unwrap(),
        dir.join("reaped").to_str().unwrap(),
        "bash",
        "-x",
        path.to_str().unwrap(),
    ])
    .output()
    .expect("run the test script");
    std::fs::write(
        dir.join("script.log"),
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )
    .unwrap();
}

/// A container engine's script (podman's, Docker's) run on the KVM host by
/// [`engine_script`]: its directory, where it wrote its files, and its
/// output.
pub struct EngineRun {
    /// The script's directory.
    pub dir: PathBuf,
    /// What the script printed (its `set -x` trace among it).
    pub log: String,
}

impl EngineRun {
    /// The file `name` the script wrote ("" if none).
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// The exit status the script wrote to `name` (-1000 if none).
    pub fn code(&self, name: &str) -> i32 {
        self.read(name).trim().parse().unwrap_or(-1000)
    }

    /// Asserts that nothing of sandboxvm is left: no virtiofsd, VMM or
    /// monitor, no state under /run/sandboxvm, no mount naming sandboxvm.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.read("leftovers"),
            "",
            "sandboxvm left things behind\n{}",
            self.log
        );
    }
}

/// Runs `body` (bash, `set -x`) on the KVM host in a fresh directory
/// `<name>.out`, with `$BIN` the sandboxvm binary, `$ROOTFS` the busybox
/// bundle's rootfs, the test kernel and initramfs in the environment and
/// the cgroup v2 hierarchy mounted; afterwards it records what sandboxvm
/// left (see [`EngineRun::assert_clean`]).
pub fn engine_script(name: &str, body: &str) -> EngineRun {
    let a = artefacts();
    let b = bundle(name, &["true"], |_| {});
    let dir = work_dir().join(format!("{name}.out"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"set -x
cd {dir}
export SANDBOXVM_KERNEL={kernel} SANDBOXVM_INITRD={initrd} SANDBOXVM_BOOT_TIMEOUT=120
BIN={bin}
ROOTFS={rootfs}
# Engines look up the container pid's cgroup (the CI host may have none mounted).
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
{body}
sleep 0.2
set +x
{{
  ls -A /run/sandboxvm 2>/dev/null
  pgrep -a virtiofsd
  pgrep -af 'sandboxvm .*(boot|_monitor) '
  grep -F sandboxvm /proc/self/mountinfo
}} >leftovers 2>&1
true
"#,
        dir = dir.display(),
        kernel = a.kernel.display(),
        initrd = a.initrd.display(),
        bin = sandboxvm_bin().display(),
        rootfs = b.join("rootfs").display(),
    );
    let path = dir.join("script.sh");
    std::fs::write(&path, script).unwrap();
    let out = on_kvm_host(&["bash", path.to_str().unwrap()])
        .output()
        .unwrap();
    EngineRun {
        dir,
        log: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// This host's kernel release (the guest's must differ).
pub fn host_kernel() -> String {
    let out = Command::new("uname").arg("-r").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

//! `sandboxvm run` of a bundle on the KVM host, as the e2e tests drive it:
//! a small shell script runs it with its stdout, stderr and status going to
//! files, then records what is left behind (state directories, virtiofsd or
//! VMM processes, mounts).

use std::path::Path;

use serde_json::json;

use crate::fixtures::artefacts;
use crate::{on_kvm_host, sandboxvm_bin};

/// What a run left: the command's output and status, and the leftovers.
#[derive(Debug)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
    /// Entries left in the state root, virtiofsd/VMM processes still alive,
    /// virtiofs/fuse mounts: all must be empty.
    pub leftovers: String,
}

/// Runs `sandboxvm run <extra> <bundle>` on a KVM host with `stdin` on its
/// standard input (`wrap` may wrap the command, e.g. in `script`).
pub fn run_with(bundle: &Path, extra: &str, stdin: &str, wrap: Option<&str>) -> Ran {
    run_during(bundle, extra, stdin, wrap, "")
}

/// As [`run_with`], running the shell code `during` on the KVM host while
/// sandboxvm runs (in the directory holding its `stdout` file).
pub fn run_during(
    bundle: &Path,
    extra: &str,
    stdin: &str,
    wrap: Option<&str>,
    during: &str,
) -> Ran {
    let a = artefacts();
    let dir = bundle.with_extension("out");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("stdin"), stdin).unwrap();
    let root = dir.join("state");
    let kernel = if extra.contains("--kernel") {
        String::new()
    } else {
        format!("--kernel {}", a.kernel.display())
    };
    let initrd = if extra.contains("--initrd") {
        String::new()
    } else {
        format!("--initrd {}", a.initrd.display())
    };
    let cmd = format!(
        "{} run --root {} {kernel} {initrd} {extra} {}",
        sandboxvm_bin().display(),
        root.display(),
        bundle.display()
    );
    let cmd = match wrap {
        Some(w) => w.replace("{}", &cmd),
        None => cmd,
    };
    let script = format!(
        r#"cd {dir}
{cmd} <stdin >stdout 2>stderr &
pid=$!
{during}
wait $pid
echo $? >code
sleep 0.2
{{
  ls -A state 2>/dev/null
  pgrep -a virtiofsd
  pgrep -af 'sandboxvm.* boot '
  grep -F -e {dir} -e /run/sandboxvm /proc/self/mountinfo
}} >leftovers 2>&1
true
"#,
        dir = dir.display()
    );
    let script_path = dir.join("script.sh");
    std::fs::write(&script_path, script).unwrap();
    let out = on_kvm_host(&["bash", script_path.to_str().unwrap()])
        .output()
        .expect("run the test script");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let code = read("code").trim().parse().unwrap_or_else(|_| {
        panic!(
            "the script did not finish: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Ran {
        stdout: read("stdout"),
        stderr: read("stderr"),
        code,
        leftovers: read("leftovers"),
    }
}

pub fn run(bundle: &Path) -> Ran {
    run_with(bundle, "", "", None)
}

pub fn assert_clean(r: &Ran) {
    assert_eq!(r.leftovers, "", "sandboxvm left things behind: {r:?}");
}

/// A run that failed as bad input must: non-zero status, no output, one
/// line on stderr that contains `expect`, nothing left behind.
pub fn assert_fails(r: &Ran, expect: &str) {
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "one line expected: {r:?}");
    assert!(r.stderr.starts_with("sandboxvm: "), "{r:?}");
    assert!(r.stderr.contains(expect), "expected {expect:?} in {r:?}");
    assert_clean(r);
}

/// Asserts that a `MemTotal:` line of a guest's /proc/meminfo shows a VM
/// of `mib` MiB (MemTotal is that less what the guest kernel keeps).
pub fn assert_guest_memory(meminfo_line: &str, mib: u64) {
    let kib: u64 = meminfo_line
        .strip_prefix("MemTotal:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a MemTotal line: {meminfo_line:?}"));
    assert!(
        (mib * 1024 * 3 / 4..=mib * 1024).contains(&kib),
        "a {mib} MiB guest shows MemTotal {kib} kB"
    );
}

/// Makes the container play an owned guest kernel (`--privileged`): every
/// capability and every device, and the guest's pid namespace, so that it
/// reaches the guest's own mount of the share through PID 1 (the agent).
pub fn as_owned_guest(s: &mut serde_json::Value) {
    let all_caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_RAWIO",
        "CAP_MKNOD",
        "CAP_SYS_CHROOT",
        "CAP_DAC_READ_SEARCH",
        "CAP_LINUX_IMMUTABLE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_MODULE",
        "CAP_NET_BIND_SERVICE",
        "CAP_AUDIT_WRITE",
        "CAP_SYS_BOOT"
    ]);
    for set in ["bounding", "effective", "permitted"] {
        s["process"]["capabilities"][set] = all_caps.clone();
    }
    s["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "pid");
}

/// The start of an owned guest's script: `$m` is the guest's mount of the
/// share; `try CODE NAME` prints "WROTE NAME" or "refused NAME: error".
pub const OWNED_GUEST: &str = r#"
m=/proc/1/root/run/sandboxvm/shares/sbx-rootfs
try() { if e=$( (eval "$1") 2>&1 ); then echo "WROTE $2"; else echo "refused $2: $e"; fi; }
"#;

/// Each of `attempts` was refused by the host's read-only mount (not
/// missing, not some other error).
pub fn assert_read_only_refused(r: &Ran, attempts: &[&str]) {
    for what in attempts {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("refused {what}:")));
        assert!(
            line.is_some_and(|l| l.contains("Read-only file system")),
            "{what}: {r:?}"
        );
    }
}

//! Shared helpers of the end-to-end tests and the boot benchmark: the test
//! guest's initramfs, and where the binaries, the kernel and the CI host are.

pub mod containerd;
pub mod fixtures;
pub mod run;

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the test guest prints once its init runs.
pub const MARKER: &str = "SANDBOXVM-GUEST-INIT-REACHED";

/// The test guest's /init. The kernel passes unknown `key=value` command
/// line parameters to init as environment variables: `sbxtest=panic` makes
/// init exit, which panics the kernel; `sbxtest=poweroff` powers off;
/// otherwise it prints the marker and a few facts, then reboots (which ends
/// the VM). `sbxhold=S` makes it sleep S seconds after the marker, then print
/// a `timer-check:` line with the timer softirq and local timer interrupt
/// counts (`ci/stall-count` reads it: a guest whose timer wheel is dead still
/// has a timer softirq count of 1 or so after the sleep).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
case "$sbxtest" in
panic)
    echo "test guest: exiting init to panic the kernel"
    exit 3
    ;;
esac
if [ "$sbxtest" = poweroff ]; then
    echo "test guest: powering off"
    /bin/busybox poweroff -f
fi
echo SANDBOXVM-GUEST-INIT-REACHED
echo "guest kernel: $(/bin/busybox uname -r)"
echo "guest cpus: $(/bin/busybox grep -c ^processor /proc/cpuinfo)"
echo "guest memory: $(/bin/busybox grep MemTotal /proc/meminfo)"
if [ -n "$sbxhold" ]; then
    /bin/busybox sleep "$sbxhold"
    timer=$(/bin/busybox awk '$1 == "TIMER:" { n = 0; for (i = 2; i <= NF; i++) n += $i; print n }' /proc/softirqs)
    loc=$(/bin/busybox awk '$1 == "LOC:" { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n }' /proc/interrupts)
    read -r up _ </proc/uptime
    echo "timer-check: timer_softirq=$timer local_timer_irqs=$loc uptime=$up"
fi
/bin/busybox reboot -f
"#;

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Writes the test guest's initramfs (uncompressed newc) to `out`.
pub fn write_test_initramfs(out: &Path) -> Result<(), String> {
    write_busybox_initramfs(out, INIT, &[])
}

/// Writes an initramfs (uncompressed newc) to `out` whose `/init` is the
/// busybox script `init`, with the host files `extra` as `(guest path,
/// host path)`, modes kept.
pub fn write_busybox_initramfs(
    out: &Path,
    init: &str,
    extra: &[(&str, &Path)],
) -> Result<(), String> {
    let busybox = Path::new(BUSYBOX);
    let mut cpio = initramfs::Writer::new(Vec::new());
    (|| -> initramfs::Result<()> {
        for dir in ["bin", "dev", "proc", "sys", "tmp"] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.char_device("dev/null", 0o666, 1, 3)?;
        cpio.host_file("bin/busybox", busybox)?;
        cpio.symlink("bin/sh", "busybox")?;
        cpio.file("init", 0o755, init.as_bytes())?;
        for (guest, host) in extra {
            cpio.host_file(guest, host)?;
        }
        Ok(())
    })()
    .map_err(|e| format!("{e} (is Debian's busybox-static installed?)"))?;
    let bytes = cpio.finish().map_err(|e| e.to_string())?;
    std::fs::write(out, bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `sandboxvm` binary: `$SANDBOXVM_BIN`, or the one cargo built next to
/// this test executable.
pub fn sandboxvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SANDBOXVM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    dir.join("sandboxvm")
}

/// The guest kernel: `$SANDBOXVM_KERNEL`, or what `kernel-config/build`
/// builds (or finds in its cache).
pub fn guest_kernel() -> Result<PathBuf, String> {
    from_env_or_script("SANDBOXVM_KERNEL", "kernel-config/build", &[])
}

/// The guest agent's initramfs, as users get it (release build):
/// `$SANDBOXVM_INITRD`, or what `guest-agent/build-initramfs --release`
/// builds (or finds in its cache).
pub fn agent_initramfs() -> Result<PathBuf, String> {
    from_env_or_script(
        "SANDBOXVM_INITRD",
        "guest-agent/build-initramfs",
        &["--release"],
    )
}

/// The path in `$var`, or the last line `script` (in the repository)
/// prints.
fn from_env_or_script(var: &str, script: &str, args: &[&str]) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new(repo_root().join(script))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        stdout.lines().last().unwrap_or_default().trim(),
    ))
}

/// The test-only guest kernel with `/dev/mem` over all physical memory
/// (MMIO included) for the hostile-guest tests: `$SANDBOXVM_DEVMEM_KERNEL`,
/// or what `kernel-config/build --variant devmem` builds (or finds).
pub fn devmem_kernel() -> Result<PathBuf, String> {
    from_env_or_script(
        "SANDBOXVM_DEVMEM_KERNEL",
        "kernel-config/build",
        &["--variant", "devmem"],
    )
}

/// The static `guest-attack` binary the hostile-guest tests copy into a
/// bundle: `$SANDBOXVM_GUEST_ATTACK`, or what `ci/build-static` builds.
pub fn guest_attack_bin() -> Result<PathBuf, String> {
    from_env_or_script(
        "SANDBOXVM_GUEST_ATTACK",
        "ci/build-static",
        &["--release", "e2e", "guest-attack"],
    )
}

/// Whether this host boots standard guests itself (`sandboxvm check` says
/// so); if not, the tests go through the nested CI host.
pub fn host_boots_guests() -> bool {
    Command::new(sandboxvm_bin())
        .args(["check", "--quiet"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A command that runs `args` on a host that can boot guests: directly, or
/// through `ci/nested`.
pub fn on_kvm_host(args: &[&str]) -> Command {
    if host_boots_guests() {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        cmd
    } else {
        let mut cmd = Command::new(repo_root().join("ci/nested"));
        cmd.arg("--").args(args);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_prints_the_marker_it_promises() {
        assert!(INIT.contains(&format!("echo {MARKER}")));
    }
}

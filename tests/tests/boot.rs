//! End to end: `sandboxvm boot` of the real guest kernel on real KVM (this
//! host if it has hardware virtualization, else the nested CI host).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use e2e::{guest_kernel, on_kvm_host, repo_root, sandboxvm_bin, write_test_initramfs, MARKER};

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The kernel (built or cached) and the test initramfs, made once.
fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let kernel = guest_kernel().expect("guest kernel");
        let initrd =
            std::env::temp_dir().join(format!("sandboxvm-e2e-{}.cpio", std::process::id()));
        write_test_initramfs(&initrd).expect("test initramfs");
        Guest { kernel, initrd }
    })
}

/// Runs `sandboxvm boot` with `extra` args under ci/time-to-marker, on a KVM
/// host; returns the combined output and the exit code.
fn boot(kernel: &Path, extra: &[&str]) -> (String, i32) {
    let g = guest();
    let timer = repo_root().join("ci/time-to-marker");
    let bin = sandboxvm_bin();
    let mut args: Vec<&str> = vec![
        timer.to_str().unwrap(),
        MARKER,
        "--",
        bin.to_str().unwrap(),
        "boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let Output {
        status,
        stdout,
        stderr,
    } = on_kvm_host(&args).output().expect("run sandboxvm boot");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (text, status.code().unwrap_or(-1))
}

/// The `marker_ms=` figure of ci/time-to-marker.
fn marker_ms(output: &str) -> Option<u64> {
    let line = output.lines().find(|l| l.starts_with("time-to-marker:"))?;
    let field = line
        .split_whitespace()
        .find(|f| f.starts_with("marker_ms="))?;
    field.trim_start_matches("marker_ms=").parse().ok()
}

fn kernel_release() -> String {
    let dir = guest().kernel.parent().unwrap();
    std::fs::read_to_string(dir.join("release"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "6.1".to_string())
}

#[test]
fn vmlinux_boots_to_init_and_the_vm_exits_0_when_the_guest_reboots() {
    let (out, code) = boot(&guest().kernel, &["--cmdline", "quiet"]);
    assert_eq!(code, 0, "sandboxvm boot failed:\n{out}");
    assert!(out.contains(MARKER), "no marker in:\n{out}");
    assert!(
        out.contains(&format!("guest kernel: {}", kernel_release())),
        "guest did not run our kernel:\n{out}"
    );
    assert!(out.contains("guest cpus: 1"), "{out}");
    let ms = marker_ms(&out).expect("time to marker measured");
    println!("boot time, VMM start -> marker on the console (vmlinux, PVH): {ms} ms");
}

#[test]
fn bzimage_boots_through_the_64_bit_entry() {
    let bzimage = guest().kernel.with_file_name("bzImage");
    let (out, code) = boot(&bzimage, &["--cmdline", "quiet", "--memory", "128"]);
    assert_eq!(code, 0, "sandboxvm boot failed:\n{out}");
    assert!(out.contains(MARKER), "no marker in:\n{out}");
    assert!(out.contains("MemTotal"), "{out}");
    println!("boot time (bzImage): {:?} ms", marker_ms(&out));
}

#[test]
fn two_vcpus_come_up_from_the_mp_table() {
    let (out, code) = boot(&guest().kernel, &["--cmdline", "quiet", "--cpus", "2"]);
    assert_eq!(code, 0, "sandboxvm boot failed:\n{out}");
    assert!(out.contains("guest cpus: 2"), "second vCPU missing:\n{out}");
}

#[test]
fn a_guest_kernel_panic_exits_non_zero_with_the_reason() {
    let (out, code) = boot(&guest().kernel, &["--cmdline", "quiet sbxtest=panic"]);
    assert_eq!(code, 1, "a panic must fail the VM:\n{out}");
    assert!(
        out.contains(
            "sandboxvm: the VM failed: guest kernel panic: Kernel panic - not syncing: \
             Attempted to kill init! exitcode=0x00000300"
        ),
        "no one-line panic error in:\n{out}"
    );
    assert!(!out.contains(MARKER), "{out}");
}

#[test]
fn a_guest_power_off_ends_the_vm_with_status_0() {
    let (out, code) = boot(
        &guest().kernel,
        &["-v", "--cmdline", "quiet sbxtest=poweroff"],
    );
    assert_eq!(code, 0, "power-off must be a clean exit:\n{out}");
    assert!(out.contains("test guest: powering off"), "{out}");
    assert!(out.contains("guest powered off"), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("sandboxvm: ")),
        "no error expected:\n{out}"
    );
}

#[test]
fn a_missing_kernel_is_a_one_line_error() {
    let out = std::process::Command::new(sandboxvm_bin())
        .args(["boot", "--kernel", "/nonexistent/vmlinux", "--pvm-guest"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        "sandboxvm: cannot start the VM: cannot read kernel /nonexistent/vmlinux: \
         No such file or directory (os error 2)\n"
    );
}

#[test]
fn check_agrees_with_boot_on_this_host() {
    let check = std::process::Command::new(sandboxvm_bin())
        .arg("check")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout).to_string();
    match check.status.code() {
        Some(0) => assert!(said.contains("can boot sandboxvm guests"), "{said}"),
        Some(2) => {
            // PVM: a standard kernel must be refused at once, not tried.
            let out = std::process::Command::new(sandboxvm_bin())
                .args(["boot", "--kernel"])
                .arg(&guest().kernel)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("KVM here is PVM"), "{stderr}");
            assert!(said.contains("only PVM-enabled guest kernels"), "{said}");
        }
        other => panic!("unexpected check result {other:?}: {said}"),
    }
}

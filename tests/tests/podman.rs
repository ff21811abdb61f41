//! End to end: podman (Debian's, with conmon) using sandboxvm as its OCI
//! runtime (`--runtime /path/to/sandboxvm`) for an image imported from the
//! busybox bundle's rootfs: run (output and exit code), create, start,
//! exec, stop, rm; nothing of sandboxvm is left afterwards.

use e2e::fixtures::{engine_script, host_kernel};

#[test]
fn podman_runs_containers_with_sandboxvm_as_its_runtime() {
    let r = engine_script(
        "podman",
        r#"
# Podman's storage on a tmpfs of the CI host's own (its / may be virtiofs).
T=$(mktemp -d /run/sandboxvm-podman.XXXXXX)
mount -t tmpfs tmpfs "$T"
P="podman --root $T/storage --runroot $T/run --storage-driver vfs --cgroup-manager cgroupfs --events-backend file --runtime $BIN"
tar -C "$ROOTFS" -c . | $P import - localhost/busybox:e2e >/dev/null
$P run --rm --network none localhost/busybox:e2e sh -c 'echo hello from podman; uname -r; exit 4' >run.out 2>run.err
echo $? >run.rc
$P create --name c1 --network none localhost/busybox:e2e sleep 1000 >/dev/null
$P start c1 >/dev/null; echo $? >start.rc
$P exec c1 sh -c 'echo exec ok; cat /proc/1/cmdline | tr "\0" " "' >exec.out; echo $? >exec.rc
$P inspect -f '{{.State.Status}}' c1 >status.running 2>&1
$P stop -t 2 c1 >/dev/null; echo $? >stop.rc
$P inspect -f '{{.State.Status}}' c1 >status.stopped 2>&1
$P rm c1 >/dev/null; echo $? >rm.rc
$P ps -aq >ps.after
umount -l "$T"; rmdir "$T"
"#,
    );
    let (log, read, code) = (&r.log, |f: &str| r.read(f), |f: &str| r.code(f));
    assert_eq!(code("run.rc"), 4, "{log}\n{}", read("run.err"));
    let run_out = read("run.out");
    let lines: Vec<&str> = run_out.lines().collect();
    assert_eq!(lines.first(), Some(&"hello from podman"), "{run_out}");
    // The guest's kernel, not the host's.
    assert_eq!(lines.len(), 2, "{run_out}");
    assert_ne!(lines[1], host_kernel(), "{run_out}");
    assert_eq!(code("start.rc"), 0, "{log}");
    assert_eq!(code("exec.rc"), 0, "{log}");
    assert_eq!(read("exec.out"), "exec ok\nsleep 1000 ", "{log}");
    assert_eq!(read("status.running").trim(), "running");
    assert_eq!(code("stop.rc"), 0, "{log}");
    assert_eq!(read("status.stopped").trim(), "exited");
    assert_eq!(code("rm.rc"), 0, "{log}");
    assert_eq!(read("ps.after"), "");
    r.assert_clean();
}

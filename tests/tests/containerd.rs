//! End to end: Debian's containerd with the sandboxvm shim, driven by `ctr`
//! (the harness: e2e::containerd).
//!
//! Each test runs one script on a host that boots guests (the nested CI
//! host here): its own containerd, a busybox OCI image built by the test
//! (no registry), the test's `ctr` steps, and a record of what is left:
//! shims, VMMs, virtiofsd, mounts, sandboxvm state, shim sockets.

use std::path::Path;
use std::process::Command;

use e2e::containerd::{fixture, guest_release, work_dir, Ran, Script, IMAGE};

/// Runs `body` (shell, with `$C` = ctr for the test's containerd and
/// namespace, `$R` = the runtime flag, `$SN` = the snapshotter flag and
/// `step NAME CMD...`) around a containerd of its own.
fn run(name: &str, body: &str) -> Ran {
    run_with(name, "", body)
}

/// As [`run`], with the shell code `env` run before containerd starts
/// (e.g. exports containerd and so the shim inherit).
fn run_with(name: &str, env: &str, body: &str) -> Ran {
    e2e::containerd::run(&Script {
        name,
        env,
        images: &[&fixture().image],
        body,
        ..Script::default()
    })
}

#[test]
fn ctr_run_shows_output_exit_code_and_the_guest_kernel() {
    let r = run(
        "run",
        r#"
step hello $C run $SN $R --rm @IMAGE@ hello sh -c 'echo hello; echo to-stderr >&2; exit 3'
step kernel $C run $SN $R --rm @IMAGE@ kernel sh -c 'uname -r; dmesg | head -n 3'
step stdin sh -c "echo piped-in | $C run $SN $R --rm @IMAGE@ stdin sh -c 'tr a-z A-Z; echo done'"
step host_kernel uname -r
step containers $C containers ls -q
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let hello = r.step("hello");
    assert_eq!(hello.code, 3, "{hello:?}\n{}", r.tail());
    assert_eq!(hello.out, "hello\n", "{hello:?}");
    assert_eq!(hello.err, "to-stderr\n", "{hello:?}");

    let kernel = r.step("kernel");
    assert_eq!(kernel.code, 0, "{kernel:?}\n{}", r.tail());
    let first = kernel.out.lines().next().unwrap_or_default();
    assert_eq!(first, guest_release(), "{kernel:?}");
    assert_ne!(first, r.step("host_kernel").out.trim());
    assert!(
        kernel.out.contains("Linux version"),
        "dmesg shows the guest's boot log: {kernel:?}"
    );
    let stdin = r.step("stdin");
    assert_eq!(
        (stdin.code, stdin.out.as_str()),
        (0, "PIPED-IN\ndone\n"),
        "{stdin:?}"
    );
    assert_eq!(r.step("containers").out, "", "--rm removed the containers");
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(r.events.contains(topic), "{topic} in {}", r.events);
    }
    r.assert_clean();
}

#[test]
fn a_detached_task_takes_exec_ps_pause_resume_kill_and_delete() {
    let r = run(
        "long",
        r#"
step run $C run $SN $R -d @IMAGE@ long sh -c 'echo started; sleep 1000; echo never'
step exec $C task exec --exec-id x long sh -c 'echo from-exec; echo exec-err >&2; exit 5'
step ps $C task ps long
step metrics $C task metrics long
step pause $C task pause long
step ls_paused $C task ls
step resume $C task resume long
step ls_resumed $C task ls
step exec2 $C task exec --exec-id y long sh -c 'echo after-resume'
step kill $C task kill -s SIGKILL long
for _ in $(seq 100); do $C task ls | grep -q 'long.*STOPPED' && break; sleep 0.1; done
step ls_killed $C task ls
step delete $C task delete long
step delete_container $C container delete long
step tasks $C task ls -q
step containers $C container ls -q
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let run = r.step("run");
    assert_eq!(run.code, 0, "{run:?}\n{}", r.tail());
    let exec = r.step("exec");
    assert_eq!(exec.code, 5, "{exec:?}\n{}", r.tail());
    assert_eq!(exec.out, "from-exec\n", "{exec:?}");
    assert_eq!(exec.err, "exec-err\n", "{exec:?}");
    let ps = r.step("ps");
    assert_eq!(ps.code, 0, "{ps:?}");
    // A header and the container's processes (sh and its sleep).
    assert!(ps.out.lines().count() >= 3, "{ps:?}");
    let metrics = r.step("metrics");
    assert_eq!(metrics.code, 0, "{metrics:?}");
    for metric in ["cpu.usage_usec", "memory.usage", "pids.current"] {
        assert!(metrics.out.contains(metric), "{metric}: {metrics:?}");
    }
    assert_eq!(r.step("pause").code, 0, "{:?}", r.step("pause"));
    assert!(
        r.step("ls_paused").out.contains("PAUSED"),
        "{:?}",
        r.step("ls_paused")
    );
    assert_eq!(r.step("resume").code, 0, "{:?}", r.step("resume"));
    assert!(
        r.step("ls_resumed").out.contains("RUNNING"),
        "{:?}",
        r.step("ls_resumed")
    );
    let exec2 = r.step("exec2");
    assert_eq!(
        (exec2.code, exec2.out.as_str()),
        (0, "after-resume\n"),
        "{exec2:?}"
    );
    assert_eq!(r.step("kill").code, 0, "{:?}", r.step("kill"));
    assert!(
        r.step("ls_killed").out.contains("STOPPED"),
        "{:?}\n{}",
        r.step("ls_killed"),
        r.tail()
    );
    assert!(
        r.events
            .lines()
            .any(|l| l.contains("/tasks/exit") && l.contains("\"exit_status\":137")),
        "the kill's exit event: {}",
        r.events
    );
    for topic in [
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/delete",
    ] {
        assert!(r.events.contains(topic), "{topic} in {}", r.events);
    }
    assert_eq!(r.step("delete").code, 0, "{:?}", r.step("delete"));
    let deleted = r.step("delete_container");
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert_eq!(r.step("tasks").out, "");
    assert_eq!(r.step("containers").out, "");
    r.assert_clean();
}

#[test]
fn a_terminal_gets_the_clients_size_through_resize_pty() {
    // `ctr -t` in a terminal of a known size (script's pty): it resizes the
    // task's pty after start (ResizePty), so the container waits for a
    // size other than the initial 0x0.
    let r = run(
        "tty",
        r#"
WAIT='for i in $(seq 100); do s=$(stty size); [ "$s" != "0 0" ] && break; sleep 0.1; done; echo "size $s"; tty'
step run_t script -qec "stty rows 33 cols 77; $C run $SN $R -t --rm @IMAGE@ tty1 sh -c '$WAIT'" /dev/null
step detached $C run $SN $R -d @IMAGE@ tty2 sleep 1000
step exec_t script -qec "stty rows 20 cols 50; $C task exec -t --exec-id t1 tty2 sh -c '$WAIT; exit 4'" /dev/null
step kill $C task kill -s SIGKILL tty2
for _ in $(seq 100); do $C task ls | grep -q 'tty2.*STOPPED' && break; sleep 0.1; done
step delete $C task delete tty2
step rm $C container rm tty2
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let run = r.step("run_t");
    assert_eq!(run.code, 0, "{run:?}\n{}", r.tail());
    assert!(run.out.contains("size 33 77\r"), "{run:?}");
    assert!(run.out.contains("/dev/pts/0"), "a pty: {run:?}");
    assert_eq!(r.step("detached").code, 0, "{:?}", r.step("detached"));
    let exec = r.step("exec_t");
    assert_eq!(exec.code, 4, "{exec:?}\n{}", r.tail());
    assert!(exec.out.contains("size 20 50\r"), "{exec:?}");
    for s in ["kill", "delete", "rm"] {
        assert_eq!(r.step(s).code, 0, "{s}: {:?}\n{}", r.step(s), r.tail());
    }
    r.assert_clean();
}

#[test]
fn the_containers_of_a_pod_share_one_vm() {
    // What the CRI plugin does for a pod, by hand: its annotations on a
    // sandbox container and on a container of the same pod.
    let r = run(
        "pod",
        r#"
A="--annotation io.kubernetes.cri.sandbox-id=pod1 --annotation io.kubernetes.cri.container-type"
step sandbox $C run $SN $R -d $A=sandbox @IMAGE@ pod1 sh -c 'sleep 1000; echo never'
step app $C run $SN $R -d $A=container @IMAGE@ app sh -c 'sleep 1000; echo never'
count() { pgrep -fc "$1" || true; }
step vmms count 'sandboxvm.* boot '
step shims count 'containerd-shim-sandboxvm-v2 .*-id pod1'
step app_exec $C task exec --exec-id k app sh -c 'uname -r; echo in-app'
step app_kill $C task kill -s SIGKILL app
for _ in $(seq 100); do $C task ls | grep -q 'app.*STOPPED' && break; sleep 0.1; done
step app_delete $C task delete app
step vmms_after_app count 'sandboxvm.* boot '
step sandbox_exec $C task exec --exec-id s pod1 echo sandbox-alive
step sandbox_kill $C task kill -s SIGKILL pod1
for _ in $(seq 100); do $C task ls | grep -q 'pod1.*STOPPED' && break; sleep 0.1; done
step sandbox_delete $C task delete pod1
step vmms_after_pod count 'sandboxvm.* boot '
$C container delete app pod1
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    for s in ["sandbox", "app"] {
        assert_eq!(r.step(s).code, 0, "{s}: {:?}\n{}", r.step(s), r.tail());
    }
    assert_eq!(r.step("vmms").out.trim(), "1", "one VM for the pod");
    assert_eq!(r.step("shims").out.trim(), "1", "one shim for the pod");
    let exec = r.step("app_exec");
    assert_eq!(exec.code, 0, "{exec:?}");
    assert_eq!(exec.out, format!("{}\nin-app\n", guest_release()));
    assert_eq!(r.step("app_delete").code, 0, "{:?}", r.step("app_delete"));
    assert_eq!(
        r.step("vmms_after_app").out.trim(),
        "1",
        "the pod's VM outlives its container"
    );
    let exec = r.step("sandbox_exec");
    assert_eq!(
        (exec.code, exec.out.as_str()),
        (0, "sandbox-alive\n"),
        "{exec:?}"
    );
    assert_eq!(r.step("sandbox_delete").code, 0);
    assert_eq!(
        r.step("vmms_after_pod").out.trim(),
        "0",
        "the last delete stops the VM"
    );
    r.assert_clean();
}

#[test]
fn a_killed_shim_is_cleaned_up_after() {
    let r = run(
        "killed",
        r#"
step run $C run $SN $R -d @IMAGE@ victim sh -c 'sleep 1000; echo never'
step kill_shim pkill -KILL -f 'containerd-shim-sandboxvm-v2 .*-id victim'
for _ in $(seq 100); do $C task ls | grep -q 'victim.*RUNNING' || break; sleep 0.1; done
sleep 1
step ls $C task ls
$C task delete victim >/dev/null 2>&1
step container_delete $C container delete victim
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    assert_eq!(r.step("run").code, 0, "{:?}\n{}", r.step("run"), r.tail());
    assert_eq!(r.step("kill_shim").code, 0, "{:?}", r.step("kill_shim"));
    assert!(
        !r.step("ls").out.contains("RUNNING"),
        "{:?}\n{}",
        r.step("ls"),
        r.tail()
    );
    let d = r.step("container_delete");
    assert_eq!(d.code, 0, "{d:?}");
    r.assert_clean();
}

#[test]
fn a_missing_entrypoint_fails_clearly_and_leaves_nothing() {
    let r = run(
        "missing",
        r#"
step missing $C run $SN $R --rm @IMAGE@ missing /no/such/program
step containers $C containers ls -q
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let m = r.step("missing");
    assert_ne!(m.code, 0, "{m:?}");
    assert!(m.err.contains("/no/such/program"), "{m:?}\n{}", r.tail());
    assert_eq!(r.step("containers").out, "", "--rm removed the container");
    r.assert_clean();
}

#[test]
fn a_vm_that_does_not_boot_fails_create_and_leaves_nothing() {
    // An initramfs without /init: the guest kernel panics at once.
    let empty = work_dir().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let r = run_with(
        "noboot",
        &format!("export SANDBOXVM_INITRD={}", empty.display()),
        r#"
step noboot $C run $SN $R --rm @IMAGE@ noboot echo never
step containers $C containers ls -q
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let m = r.step("noboot");
    assert_ne!(m.code, 0, "{m:?}");
    assert!(
        m.err.contains("did not boot") && m.err.contains("Kernel panic"),
        "{m:?}\n{}",
        r.tail()
    );
    assert_eq!(m.out, "", "{m:?}");
    assert_eq!(r.step("containers").out, "", "--rm removed the container");
    r.assert_clean();
}

#[test]
fn the_image_layout_names_its_blobs_by_digest() {
    let f = fixture();
    let out = Command::new("tar")
        .arg("-tf")
        .arg(&f.image)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("oci-layout"), "{list}");
    assert!(list.contains("index.json"), "{list}");
    assert_eq!(
        list.lines()
            .filter(|l| l.starts_with("blobs/sha256/") && l.len() > 20)
            .count(),
        3,
        "manifest, config and layer: {list}"
    );
    assert!(Path::new(&f.image).metadata().unwrap().len() > 100_000);
}

#[test]
fn containerds_runc_shim_drives_sandboxvm_as_its_runc() {
    // The runc-compatible CLI under containerd's own runc shim: create with
    // --pid-file, start, state, exec --detach, kill, delete; the shim reaps
    // the pid sandboxvm reports and takes its exit status.
    let r = run(
        "runc-shim",
        r#"
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
RC="--runtime io.containerd.runc.v2 --runc-binary @BIN@/sandboxvm"
step run $C run $SN $RC --rm @IMAGE@ rs1 sh -c 'echo via the runc shim; uname -r; exit 6'
step detached $C run $SN $RC -d @IMAGE@ rs2 sleep 1000
step exec $C task exec --exec-id e1 rs2 sh -c 'echo exec out; exit 4'
step kill $C task kill -s SIGKILL rs2
step wait sh -c "for i in \$(seq 100); do $C task ls | grep -q 'rs2.*STOPPED' && exit 0; sleep 0.2; done; exit 1"
step delete $C task delete rs2
step rm $C container rm rs2
step left sh -c "ls -A /run/containerd/runc/test 2>/dev/null; pgrep -af '[s]andboxvm .*_monitor '"
"#
        .replace("@IMAGE@", IMAGE)
        .replace("@BIN@", fixture().bin_dir.to_str().unwrap())
        .as_str(),
    );
    let run = r.step("run");
    assert_eq!(run.code, 6, "{run:?}\n{}", r.tail());
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(
        lines,
        ["via the runc shim", guest_release().as_str()],
        "{run:?}"
    );
    assert_eq!(
        r.step("detached").code,
        0,
        "{:?}\n{}",
        r.step("detached"),
        r.tail()
    );
    let exec = r.step("exec");
    assert_eq!(
        (exec.code, exec.out.as_str()),
        (4, "exec out\n"),
        "{exec:?}"
    );
    for s in ["kill", "wait", "delete", "rm"] {
        assert_eq!(r.step(s).code, 0, "{s}: {:?}\n{}", r.step(s), r.tail());
    }
    // No container state (runc's --root) and no monitor left.
    assert_eq!(r.step("left").out, "", "{:?}", r.step("left"));
    r.assert_clean();
}

#[test]
fn a_pods_network_namespace_is_mirrored_into_its_vm() {
    // What CNI leaves for a pod: a namespace with a veth and an address.
    // The shim mirrors it into the VM (tap + tc) and configures the guest.
    let r = run(
        "pod-net",
        r#"
ip netns add sbxctd
ip link add sbxctd0 type veth peer name eth0 netns sbxctd
ip addr add 10.231.7.1/24 dev sbxctd0; ip link set sbxctd0 up
ip -n sbxctd addr add 10.231.7.2/24 dev eth0
ip -n sbxctd link set eth0 up; ip -n sbxctd link set lo up
ip netns exec sbxctd cat /sys/class/net/eth0/address >mac
step net $C run $SN $R --rm --with-ns network:/var/run/netns/sbxctd @IMAGE@ n1 sh -c 'cat /sys/class/net/eth0/address; ip -4 addr show eth0 | grep -o "inet [0-9./]*"; ping -c 1 -W 10 10.231.7.1 >/dev/null && echo ping-ok'
step left sh -c "ip netns exec sbxctd tc filter show dev eth0 ingress; ip netns exec sbxctd ip -o link show type tun"
ip netns del sbxctd; ip link del sbxctd0 2>/dev/null
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let net = r.step("net");
    assert_eq!(net.code, 0, "{net:?}\n{}", r.tail());
    let mac = std::fs::read_to_string(r.dir.join("mac")).unwrap();
    assert_eq!(
        net.out,
        format!("{}inet 10.231.7.2/24\nping-ok\n", mac),
        "{net:?}"
    );
    let left = r.step("left");
    assert_eq!(left.out, "", "tap or tc filter left: {left:?}");
    r.assert_clean();
}

/// The owned guest races the host: a privileged first container of a pod
/// mounts the share's tag itself and, while the pod's second container is
/// created (a read-only rootfs whose mount point the host makes, a volume
/// shared with the attacker, a read-only volume nested in it), keeps
/// swapping directories for symlinks to a host path, in the shared volume
/// and at the second container's paths under its own mount of the tag. (A
/// guest mounting the tag again gets the guest kernel's newest virtio-fs
/// superblock of that device: with virtiofsd's announced submounts, one of
/// the submounts, here the shared volume. The skeleton's own refusal is
/// run.rs's `an_owned_guest_writes_only_its_own_rootfs_through_the_share`.)
/// The host never follows them: the escape target stays empty, the
/// read-only volume keeps its file, the second container gets its
/// read-only rootfs and the mount point the host made in it.
#[test]
fn an_owned_guest_racing_symlinks_cannot_steer_the_next_containers_share() {
    let r = run(
        "race",
        r#"
mkdir -p race/v race/ro race/escape; echo keep >race/ro/file
E=$W/race/escape
A="--annotation io.kubernetes.cri.sandbox-id=pod1 --annotation io.kubernetes.cri.container-type"
step attacker $C run $SN $R -d --privileged --mount type=bind,src=$W/race/v,dst=/v,options=rbind:rw $A=sandbox @IMAGE@ pod1 sh -c '
mkdir -p /mnt/s && mount -t virtiofs sbx-rootfs /mnt/s && echo mounted-the-tag >/attack.log
end=$(( $(date +%s) + 20 )); n=0
while [ $(date +%s) -lt $end ]; do
  rm -f /v/sub; ln -sfn '$E' /v/sub 2>/dev/null; rm -f /v/sub; mkdir /v/sub 2>/dev/null; rmdir /v/sub 2>/dev/null
  for t in app app/rootfs app/mounts app/rootfs/new app/rootfs/new/dir; do
    rm -rf /mnt/s/$t 2>/dev/null; ln -sfn '$E' /mnt/s/$t 2>/dev/null
  done
  n=$((n+1))
done >>/attack.log 2>&1
echo swaps $n >>/attack.log
sleep 1000'
sleep 2
step app $C run $SN $R --read-only --mount type=bind,src=$W/race/v,dst=/v,options=rbind:rw --mount type=bind,src=$W/race/ro,dst=/v/sub,options=rbind:ro --mount type=bind,src=$W/race/ro,dst=/new/dir,options=rbind:ro $A=container @IMAGE@ app sh -c 'cat /new/dir/file; cat /v/sub/file 2>/dev/null || echo sub-gone; echo x 2>/dev/null >/new/dir/file || echo refused'
for i in $(seq 60); do $C task exec --exec-id w$i pod1 grep -q swaps /attack.log && break; sleep 1; done
step attack_log $C task exec --exec-id log pod1 cat /attack.log
$C task delete app; $C container delete app
$C task kill -s SIGKILL pod1
for _ in $(seq 100); do $C task ls | grep -q 'pod1.*STOPPED' && break; sleep 0.1; done
$C task delete pod1; $C container delete pod1
step escape ls -A race/escape
step ro cat race/ro/file
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let attacker = r.step("attacker");
    assert_eq!(attacker.code, 0, "{attacker:?}\n{}", r.tail());
    let app = r.step("app");
    assert_eq!(app.code, 0, "{app:?}\n{}", r.tail());
    // The volume nested in the shared one may be gone: the attacker shares
    // its parent and removes the directory it is mounted on (inside the
    // guest, between two containers of one pod: not the host's boundary).
    // Never anything but the host's read-only file.
    assert!(
        ["keep\nkeep\nrefused\n", "keep\nsub-gone\nrefused\n"].contains(&app.out.as_str()),
        "{app:?}"
    );
    let log = r.step("attack_log").out;
    assert!(log.starts_with("mounted-the-tag\n"), "{log}");
    let swaps: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("swaps "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the attack did not finish: {log}"));
    assert!(swaps > 0, "{log}");
    assert_eq!(r.step("escape").out, "", "the host followed a symlink");
    assert_eq!(r.step("ro").out, "keep\n");
    r.assert_clean();
}

#[test]
fn the_runtime_config_path_option_configures_the_pods_vm() {
    let r = run(
        "config",
        r#"
cat >sbx.toml <<'TOML'
[guest]
kernel_params = "sbx_shim_config=1"
default_memory_mib = 384
TOML
printf '[guest]\nmax_memory_mib = 100\n' >bad.toml
step sized $C run $SN $R --runtime-config-path $W/sbx.toml --rm @IMAGE@ sized sh -c 'cat /proc/cmdline; grep MemTotal /proc/meminfo'
step refused $C run $SN $R --runtime-config-path $W/bad.toml --rm @IMAGE@ refused true
step containers $C containers ls -q
"#
        .replace("@IMAGE@", IMAGE)
        .as_str(),
    );
    let sized = r.step("sized");
    assert_eq!(sized.code, 0, "{sized:?}\n{}", r.tail());
    let lines: Vec<&str> = sized.out.lines().collect();
    assert!(
        lines[0].split(' ').any(|p| p == "sbx_shim_config=1"),
        "{sized:?}"
    );
    e2e::run::assert_guest_memory(lines[1], 384);
    let refused = r.step("refused");
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused
            .err
            .contains("guest.default_memory_mib = 256 is above guest.max_memory_mib = 100"),
        "{refused:?}"
    );
    r.assert_clean();
}

//! End to end: the runc-compatible OCI lifecycle (`sandboxvm create`,
//! `start`, `state`, `exec`, `ps`, `events`, `pause`/`resume`, `kill`,
//! `delete`) on busybox bundles, with the real guest kernel, agent,
//! virtiofsd and KVM (this host, or the nested CI host).
//!
//! Each test runs a shell script on the KVM host under a child subreaper
//! (tests/scripts/subreaper.py, as containerd's shim and conmon are), so the
//! exit status of the container's host process (the pid `create` reports)
//! is observed exactly as a supervisor sees it. Each script ends by
//! recording what is left behind: state dirs, VMM/virtiofsd/monitor
//! processes, mounts.

use std::collections::HashMap;
use std::path::PathBuf;

use e2e::fixtures::{artefacts, bundle, run_reaped, work_dir};
use e2e::{repo_root, sandboxvm_bin};
use serde_json::{json, Value};

/// What a script left in its directory.
struct Out {
    dir: PathBuf,
}

impl Out {
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
    fn code(&self, name: &str) -> i32 {
        self.read(name).trim().parse().unwrap_or(-1000)
    }
    fn json(&self, name: &str) -> Value {
        serde_json::from_str(&self.read(name))
            .unwrap_or_else(|e| panic!("{name} is not JSON ({e}): {:?}", self.read(name)))
    }
    /// Exit codes of the reaped orphans (the monitors), by pid.
    fn reaped(&self) -> HashMap<i32, i32> {
        self.read("reaped")
            .lines()
            .filter_map(|l| {
                let (p, c) = l.split_once(' ')?;
                Some((p.parse().ok()?, c.parse().ok()?))
            })
            .collect()
    }
    fn assert_clean(&self) {
        assert_eq!(
            self.read("leftovers"),
            "",
            "sandboxvm left things behind (script output: {})",
            self.read("script.log")
        );
    }
}

/// Runs `body` (bash; `$S` is sandboxvm with a fresh --root and the test
/// kernel/initramfs in the environment) in a fresh directory `name` on the
/// KVM host, under the subreaper.
fn script(name: &str, body: &str) -> Out {
    let a = artefacts();
    let dir = work_dir().join(format!("{name}.out"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        r#"cd {dir}
export SANDBOXVM_KERNEL={kernel} SANDBOXVM_INITRD={initrd}
S="{bin} --root {dir}/state -v --log {dir}/sandboxvm.log"
# Waits until container $1 is stopped (at most 30 s).
wait_stopped() {{
  for _ in $(seq 300); do
    $S state "$1" 2>/dev/null | grep -q '"stopped"' && return 0
    sleep 0.1
  done
  return 1
}}
{body}
sleep 0.2
set +x
{{
  ls -A state 2>/dev/null
  pgrep -a virtiofsd
  pgrep -af 'sandboxvm .*(boot|_monitor) '
  grep -F -e {dir} /proc/self/mountinfo
}} >leftovers 2>&1
true
"#,
        dir = dir.display(),
        kernel = a.kernel.display(),
        initrd = a.initrd.display(),
        bin = sandboxvm_bin().display(),
    );
    run_reaped(&dir, &text);
    Out { dir }
}

fn status_of(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("?")
}

#[test]
fn a_container_goes_through_the_oci_states_and_its_pid_exits_with_its_status() {
    let hooks_dir = work_dir().join("hooks");
    std::fs::create_dir_all(&hooks_dir).unwrap();
    let hook = |name: &str| json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}/{name}.json", hooks_dir.display())]});
    let b = bundle(
        "lifecycle",
        &[
            "sh",
            "-c",
            "echo started; trap 'echo got TERM; exit 5' TERM; while true; do sleep 0.1; done",
        ],
        |s| {
            s["hooks"] = json!({
                "prestart": [hook("prestart")],
                "createContainer": [hook("createContainer")],
                "poststart": [hook("poststart")],
                "poststop": [hook("poststop")],
            });
            s["annotations"] = json!({"org.example/team": "sandboxvm"});
            // Where the host accounts the VM (podman passes such a path).
            s["linux"]["cgroupsPath"] = json!("/e2e-oci/c1");
        },
    );
    let o = script(
        "lifecycle",
        &format!(
            r#"
# A permissive umask (as some container images and CI runners have) must
# not open the state to other host users.
(umask 000; $S create --bundle {b} --pid-file pid c1 </dev/null >out 2>err); echo $? >create.rc
$S state c1 >state.created
stat -c '%a %n' state state/c1 state/c1/vmm state/c1/vmm/vsock.sock >modes
setpriv --reuid=65534 --regid=65534 --clear-groups ls state/c1 >/dev/null 2>&1; echo $? >nobody.rc
# The VMM's threads: no capabilities, no new privileges.
grep -hE '^(CapEff|CapBnd|NoNewPrivs):' /proc/$(cat state/c1/vmm.pid)/task/*/status | sort -u >vmm.status
grep -c . /proc/$(cat state/c1/vmm.pid)/task/*/status | wc -l >vmm.threads
# A user of its own (real, effective, saved, fs uids), on every thread.
grep -h '^Uid:' /proc/$(cat state/c1/vmm.pid)/task/*/status | sort -u >vmm.uid
cp state/c1/vmm.pid vmm.pid
# virtiofsd's own sandbox: the process serving the guest (the child of
# the one we started, which only waits for it) has seccomp on and another
# mount namespace.
f=$(cat state/c1/virtiofsd.pid)
f=$(awk '{{print $1}}' /proc/$f/task/$f/children)
{{ grep '^Seccomp:' /proc/$f/status; [ "$(readlink /proc/$f/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] && echo own-mount-ns; }} >vfs.sandbox
# Its root: only the way to its state directory.
# Not the OCI record the runtime acts on (a taken-over VMM could forge it).
{{ ls -A /proc/$(cat state/c1/vmm.pid)/root/; test -e /proc/$(cat state/c1/vmm.pid)/root/etc/passwd && echo passwd; }} >vmm.root
v=/proc/$(cat state/c1/vmm.pid)/root$PWD/state/c1
{{ ls -A $v; ls -A $v/vmm; }} >vmm.sees 2>vmm.sees.err
# The VMM and virtiofsd in the spec's cgroup.
cat /proc/$(cat state/c1/vmm.pid)/cgroup /proc/$(cat state/c1/virtiofsd.pid)/cgroup >vm.cgroups
$S start c1; echo $? >start.rc
sleep 0.5
$S state c1 >state.running
$S exec c1 sh -c 'echo exec-out; exit 3' >exec.out; echo $? >exec.rc
$S ps --format json c1 >ps.json
$S events --stats c1 >stats.json
$S list --format json >list.json
$S pause c1; $S state c1 >state.paused; $S resume c1; $S state c1 >state.resumed
$S kill c1 TERM; echo $? >kill.rc
wait_stopped c1
$S state c1 >state.stopped
$S start c1 2>start2.err; echo $? >start2.rc
$S delete c1; echo $? >delete.rc
$S state c1 2>gone.err; echo $? >gone.rc
ls -d /sys/fs/cgroup/e2e-oci >cgroup.left 2>&1
"#,
            b = b.display()
        ),
    );
    assert_eq!(o.code("create.rc"), 0, "create: {}", o.read("script.log"));
    assert_eq!(
        o.read("modes"),
        "700 state\n700 state/c1\n700 state/c1/vmm\n600 state/c1/vmm/vsock.sock\n",
        "modes under umask 000"
    );
    assert_ne!(o.code("nobody.rc"), 0, "another user listed the state");
    assert_eq!(
        o.read("vm.cgroups"),
        "0::/e2e-oci/c1\n0::/e2e-oci/c1\n",
        "the VMM's and virtiofsd's cgroups"
    );
    let top = o
        .dir
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    assert_eq!(o.read("vmm.root"), format!("{top}\n"), "the VMM's root");
    let sees = o.read("vmm.sees");
    assert_eq!(
        sees.lines().next(),
        Some("vmm"),
        "the VMM's view of its state directory: {sees} {}",
        o.read("vmm.sees.err")
    );
    assert!(
        sees.contains("console.log") && sees.contains("vsock.sock"),
        "{sees}"
    );
    assert!(
        !sees.contains("state.json") && !sees.contains("vmm.pid"),
        "{sees}"
    );
    assert_eq!(
        o.read("vfs.sandbox"),
        "Seccomp:\t2\nown-mount-ns\n",
        "virtiofsd's sandbox"
    );
    let vmm_pid: u32 = o.read("vmm.pid").trim().parse().unwrap_or(0);
    let uid = 0x7000_0000 + vmm_pid;
    assert_eq!(
        o.read("vmm.uid"),
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
        "the VMM's user (pid {vmm_pid})"
    );
    assert_eq!(
        o.read("vmm.status"),
        "CapBnd:\t0000000000000000\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\n",
        "the VMM's {} threads",
        o.read("vmm.threads").trim()
    );
    let pid: i32 = o.read("pid").trim().parse().expect("pid file");
    let created = o.json("state.created");
    assert_eq!(status_of(&created), "created");
    assert_eq!(created["id"], "c1");
    assert_eq!(created["pid"], pid);
    assert_eq!(created["bundle"], b.to_str().unwrap());
    assert_eq!(created["annotations"]["org.example/team"], "sandboxvm");
    assert!(created["ociVersion"].as_str().unwrap().starts_with("1."));
    assert_eq!(o.code("start.rc"), 0);
    assert_eq!(status_of(&o.json("state.running")), "running");
    assert_eq!(o.read("exec.out"), "exec-out\n");
    assert_eq!(o.code("exec.rc"), 3);
    assert!(!o.json("ps.json").as_array().unwrap().is_empty());
    let stats = o.json("stats.json");
    assert_eq!(stats["type"], "stats");
    assert!(stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0);
    assert_eq!(o.json("list.json")[0]["id"], "c1");
    assert_eq!(status_of(&o.json("state.paused")), "paused");
    assert_eq!(status_of(&o.json("state.resumed")), "running");
    assert_eq!(o.code("kill.rc"), 0);
    let stopped = o.json("state.stopped");
    assert_eq!(status_of(&stopped), "stopped");
    assert_eq!(stopped["pid"], 0);
    assert_eq!(o.read("out"), "started\ngot TERM\n");
    assert_eq!(o.read("err"), "");
    assert_ne!(o.code("start2.rc"), 0);
    assert!(o
        .read("start2.err")
        .contains("cannot start a container that has stopped"));
    assert_eq!(o.code("delete.rc"), 0);
    assert_eq!(o.code("gone.rc"), 1);
    assert_eq!(
        o.read("gone.err"),
        "sandboxvm: container \"c1\" does not exist\n"
    );
    assert!(
        o.read("cgroup.left").contains("No such file"),
        "the cgroup it made is gone: {}",
        o.read("cgroup.left")
    );
    // The supervisor sees the container's exit status on the pid.
    assert_eq!(
        o.reaped().get(&pid),
        Some(&5),
        "reaped: {}",
        o.read("reaped")
    );
    // Hooks ran on the host with the state on stdin.
    for (hook, status) in [
        ("prestart", "created"),
        ("createContainer", "created"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ] {
        let text = std::fs::read_to_string(hooks_dir.join(format!("{hook}.json")))
            .unwrap_or_else(|_| panic!("{hook} hook did not run"));
        let st: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(st["id"], "c1", "{hook}");
        assert_eq!(st["status"], status, "{hook}");
    }
    o.assert_clean();
}

#[test]
fn update_changes_the_limits_at_once_grows_the_vm_and_refuses_what_it_cannot_hold() {
    let b = bundle("update", &["sleep", "1000"], |s| {
        s["linux"]["resources"] = json!({"memory": {"limit": 128u64 << 20}});
        // What a tmpfs holds is guest memory (its default size is half of
        // the memory at boot: too small here).
        s["mounts"].as_array_mut().unwrap().push(
            json!({"destination": "/big", "type": "tmpfs", "source": "tmpfs", "options": ["size=512m"]}),
        );
    });
    let o = script(
        "update",
        &format!(
            r#"
# The VM boots with 1 vCPU of 2 and 256 MiB that may grow to 1536.
printf '[guest]\nmax_vcpus = 2\nmax_memory_mib = 1536\n' >config.toml
SANDBOXVM_CONFIG=$PWD/config.toml $S create --bundle {b} --pid-file pid c1 </dev/null; $S start c1
$S exec c1 sh -c 'grep MemTotal /proc/meminfo; cat /sys/devices/system/cpu/online' >boot.out
# The VM grows for a 1 GiB limit; then it holds 288 MiB, more than it booted with.
$S update --memory 1g --cpu-quota 200000 --cpu-period 100000 c1; echo $? >grow.rc
$S exec c1 sh -c 'grep MemTotal /proc/meminfo; cat /sys/devices/system/cpu/online' >grown.out
$S exec c1 sh -c 'rm -f /big/fill; head -c 301989888 /dev/zero >/big/fill && wc -c </big/fill && rm /big/fill || df -m /big' >fill.out 2>fill.err
$S state c1 >grown.state
$S update --memory 96m --cpu-quota 50000 --cpu-period 100000 --cpu-share 512 --pids-limit 20 c1; echo $? >flags.rc
$S exec c1 cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.weight /sys/fs/cgroup/pids.max >flags.out
echo '{{"memory":{{"limit":-1}},"pids":{{"limit":-1}}}}' | $S update -r - c1; echo $? >stdin.rc
$S exec c1 cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max >stdin.out
$S update --memory 2g c1 2>big.err; echo $? >big.rc
$S update --cpuset-cpus 0 c1 2>cpuset.err; echo $? >cpuset.rc
$S update --cpu-rt-runtime 5 c1 2>rt.err; echo $? >rt.rc
$S update --memory lots c1 2>bad.err; echo $? >bad.rc
$S pause c1; $S update --memory 64m c1 2>paused.err; echo $? >paused.rc; $S resume c1
$S exec c1 cat /sys/fs/cgroup/memory.max >after.out
$S delete --force c1
$S update --memory 64m c1 2>gone.err; echo $? >gone.rc
"#,
            b = b.display()
        ),
    );
    let log = o.read("script.log");
    let mem_total_mib = |file: &str| -> u64 {
        let text = o.read(file);
        let kib: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{file}: {text:?}\n{log}"));
        kib >> 10
    };
    let boot = mem_total_mib("boot.out");
    assert!(boot < 256, "{boot} MiB at boot\n{log}");
    assert!(
        o.read("boot.out").ends_with("\n0\n"),
        "one vCPU online\n{log}"
    );
    assert_eq!(o.code("grow.rc"), 0, "{log}");
    // 1024 + 64 MiB need 832 MiB more: 7 blocks of 128.
    let grown = mem_total_mib("grown.out");
    assert!(
        (892..=896).contains(&(grown - boot)),
        "{boot} -> {grown} MiB\n{log}"
    );
    assert!(
        o.read("grown.out").ends_with("\n0-1\n"),
        "two vCPUs online\n{log}"
    );
    assert_eq!(
        o.read("fill.out"),
        "301989888\n",
        "{}\n{log}",
        o.read("fill.err")
    );
    assert_eq!(o.code("flags.rc"), 0, "{log}");
    assert_eq!(
        o.read("flags.out"),
        "100663296\n50000 100000\n20\n20\n",
        "{log}"
    );
    assert_eq!(o.code("stdin.rc"), 0, "{log}");
    assert_eq!(o.read("stdin.out"), "max\nmax\n", "{log}");
    for (name, says) in [
        (
            "big",
            "a memory limit of 2048 MiB needs a VM of 2112 MiB; this one has 1152 MiB and it can grow to 1536 MiB",
        ),
        (
            "cpuset",
            "linux.resources.cpu.cpus is not supported in the guest",
        ),
        ("rt", "--cpu-rt-runtime is not supported"),
        ("bad", "--memory \"lots\": not a size in bytes"),
        ("paused", "container c1 is paused"),
        ("gone", "c1"),
    ] {
        assert_eq!(o.code(&format!("{name}.rc")), 1, "{name}: {log}");
        let err = o.read(&format!("{name}.err"));
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err:?}");
        assert!(err.contains(says), "{name}: {err:?}");
    }
    // What was refused changed nothing.
    assert_eq!(o.read("after.out"), "max\n", "{log}");
    o.assert_clean();
}

#[test]
fn seccomp_sysctls_devices_hooks_and_oom_score_adj_of_the_spec_hold_in_the_guest() {
    // A runtime-spec 1.3 config (as runtime-tools writes now). The profile
    // lets everything through but getcwd (EPERM, the default errno) and
    // mkdir (EOPNOTSUPP); exec'd processes get it too.
    let b = bundle("seccomp", &["sleep", "1000"], |s| {
        s["ociVersion"] = json!("1.3.0");
        // Runs in the guest, in the container, just before its program.
        s["hooks"] = json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "cat >/tmp/start-hook.json"]}
        ]});
        s["process"]["oomScoreAdj"] = json!(123);
        for set in ["bounding", "effective", "permitted"] {
            let list = s["process"]["capabilities"][set].as_array_mut().unwrap();
            list.extend([json!("CAP_MKNOD"), json!("CAP_DAC_OVERRIDE")]);
        }
        s["linux"]["sysctl"] = json!({
            "net.ipv4.ip_unprivileged_port_start": "0",
            "kernel.msgmax": "4321",
        });
        s["linux"]["devices"] = json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o640, "uid": 7, "gid": 8},
            {"path": "/dev/extra/fifo", "type": "p", "major": 0, "minor": 0},
        ]);
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95},
            ],
        });
    });
    let notify = bundle("seccomp-notify", &["true"], |s| {
        s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_NOTIFY"}]});
    });
    let bad_sysctl = bundle("bad-sysctl", &["true"], |s| {
        s["linux"]["sysctl"] = json!({"net/../../kernel/x": "1"});
    });
    let o = script(
        "seccomp",
        &format!(
            r#"
$S create --bundle {b} c1 </dev/null; $S start c1
$S exec c1 busybox pwd >pwd.out 2>pwd.err; echo $? >pwd.rc
$S exec c1 mkdir /tmp/d 2>mkdir.err; echo $? >mkdir.rc
$S exec c1 cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/msgmax /proc/1/oom_score_adj >values.out
$S exec c1 cat /tmp/start-hook.json >start-hook.json
$S exec c1 stat -c '%F %t:%T %a %u:%g' /dev/fuse /dev/extra/fifo >devices.out
$S exec c1 sh -c 'mknod /dev/kmsg2 c 1 11 && echo made; true </dev/kmsg2 && echo kmsg; true <>/dev/fuse && echo fuse' >filter.out 2>filter.err
$S delete --force c1
$S create --bundle {notify} c2 </dev/null 2>notify.err; echo $? >notify.rc
$S create --bundle {bad_sysctl} c3 </dev/null 2>sysctl.err; echo $? >sysctl.rc
"#,
            b = b.display(),
            notify = notify.display(),
            bad_sysctl = bad_sysctl.display(),
        ),
    );
    let log = o.read("script.log");
    assert_eq!(o.code("pwd.rc"), 1, "{log}");
    assert!(
        o.read("pwd.err").contains("Operation not permitted"),
        "{}",
        o.read("pwd.err")
    );
    assert_eq!(o.code("mkdir.rc"), 1, "{log}");
    assert!(
        o.read("mkdir.err").contains("upported"),
        "{}",
        o.read("mkdir.err")
    );
    assert_eq!(o.read("values.out"), "0\n4321\n123\n", "{log}");
    assert_eq!(
        o.read("devices.out"),
        "character special file a:e5 640 7:8\nfifo 0:0 666 0:0\n",
        "{log}"
    );
    // The device filter: runc's defaults and linux.devices, nothing else.
    assert_eq!(o.read("filter.out"), "made\nfuse\n", "{log}");
    assert!(
        o.read("filter.err")
            .contains("/dev/kmsg2: Operation not permitted"),
        "{log}"
    );
    let hook = o.json("start-hook.json");
    assert_eq!(hook["id"], "c1", "{hook}");
    assert_eq!(hook["status"], "created", "{hook}");
    assert_eq!(
        hook["pid"], 1,
        "the container's init, in its PID namespace: {hook}"
    );
    for (name, says) in [
        ("notify", "linux.seccomp: SCMP_ACT_NOTIFY is not supported"),
        (
            "sysctl",
            "linux.sysctl: \"net/../../kernel/x\" is not a sysctl name",
        ),
    ] {
        assert_eq!(o.code(&format!("{name}.rc")), 1, "{name}: {log}");
        let err = o.read(&format!("{name}.err"));
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err:?}");
        assert!(err.contains(says), "{name}: {err:?}");
    }
    o.assert_clean();
}

#[test]
fn a_user_namespace_maps_the_containers_ids_and_its_root_is_not_the_guests() {
    // Container ids 0-65535 are the guest's uids 100000- and gids 200000-.
    // Its root holds CAP_MKNOD and CAP_DAC_OVERRIDE in its own namespace
    // only: no device node, no write to a file of the guest's root (the
    // rootfs), linux.devices bound from the guest; an exec'd process is in
    // the same namespace.
    let b = bundle("userns", &["sleep", "1000"], |s| {
        let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
        ns.push(json!({"type": "user"}));
        s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
        s["linux"]["devices"] =
            json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]);
        for set in ["bounding", "effective", "permitted"] {
            let list = s["process"]["capabilities"][set].as_array_mut().unwrap();
            list.extend([json!("CAP_MKNOD"), json!("CAP_DAC_OVERRIDE")]);
        }
    });
    let unmapped = bundle("userns-unmapped", &["true"], |s| {
        let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
        ns.push(json!({"type": "user"}));
    });
    let o = script(
        "userns",
        &format!(
            r#"
$S create --bundle {b} c1 </dev/null; $S start c1
$S exec c1 sh -c 'cat /proc/1/uid_map /proc/self/gid_map; id -u; stat -c "%u:%g" / /dev/fuse; stat -c "%F %t:%T" /dev/fuse' >ids.out 2>&1
$S exec c1 touch /owned-by-guest-root 2>touch.err; echo $? >touch.rc
$S exec c1 mknod /dev/null2 c 1 3 2>mknod.err; echo $? >mknod.rc
$S delete --force c1
$S create --bundle {unmapped} c2 </dev/null 2>unmapped.err; echo $? >unmapped.rc
"#,
            b = b.display(),
            unmapped = unmapped.display(),
        ),
    );
    let log = o.read("script.log");
    let ids: Vec<String> = o
        .read("ids.out")
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        ids,
        [
            "0 100000 65536",
            "0 200000 65536",
            "0",
            "65534:65534",
            "65534:65534",
            "character special file a:e5"
        ],
        "{log}"
    );
    assert_eq!(o.code("touch.rc"), 1, "{log}");
    assert!(o.read("touch.err").contains("Permission denied"), "{log}");
    assert_eq!(o.code("mknod.rc"), 1, "{log}");
    assert!(o.read("mknod.err").contains("not permitted"), "{log}");
    assert_eq!(o.code("unmapped.rc"), 1, "{log}");
    let err = o.read("unmapped.err");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains("linux.uidMappings: a new user namespace needs at least one mapping"),
        "{err:?}"
    );
    o.assert_clean();
}

#[test]
fn runcs_own_command_line_works() {
    // As runc's manual writes them: `run` in the bundle directory with the
    // lifecycle flags, `run --bundle DIR --keep ID`, `exec --cap`, `spec`
    // and `features`.
    let long = bundle("runc-syntax", &["sleep", "1000"], |_| {});
    let short = bundle(
        "runc-syntax-short",
        &["sh", "-c", "echo ran; exit 3"],
        |_| {},
    );
    let o = script(
        "runc-syntax",
        &format!(
            r#"
(cd {long} && $S run -d --pid-file "$OLDPWD/pid" --no-pivot --no-new-keyring c1 </dev/null); echo $? >detach.rc
$S state c1 >detach.state
$S exec --cap CAP_NET_ADMIN -c cap_sys_time c1 grep CapEff /proc/self/status >cap.out; echo $? >cap.rc
$S exec --apparmor my-profile c1 true 2>apparmor.err; echo $? >apparmor.rc
$S delete --force c1
$S run --bundle {short} --keep c2 </dev/null >keep.out; echo $? >keep.rc
$S state c2 >keep.state
$S delete c2; echo $? >keep-delete.rc
$S run -b {short} c3 </dev/null >plain.out; echo $? >plain.rc
$S state c3 2>plain.state.err; echo $? >plain.state.rc
mkdir spec-dir rootless-dir; $S spec --rootless --bundle rootless-dir; echo $? >rootless.rc
$S spec --bundle spec-dir; echo $? >spec.rc
$S features >features.json
"#,
            long = long.display(),
            short = short.display(),
        ),
    );
    let log = o.read("script.log");
    assert_eq!(o.code("detach.rc"), 0, "{log}");
    let st = o.json("detach.state");
    assert_eq!(status_of(&st), "running", "{st}");
    assert_eq!(
        o.read("pid").trim(),
        st["pid"].to_string(),
        "--pid-file has the container's pid"
    );
    assert_eq!(o.code("cap.rc"), 0, "{log}");
    let eff = o.read("cap.out");
    let eff = u64::from_str_radix(eff.trim().trim_start_matches("CapEff:").trim(), 16)
        .unwrap_or_else(|_| panic!("{eff:?}"));
    assert_ne!(eff & (1 << 12), 0, "CAP_NET_ADMIN: {eff:x}");
    assert_ne!(eff & (1 << 25), 0, "CAP_SYS_TIME: {eff:x}");
    assert_eq!(o.code("apparmor.rc"), 1, "{log}");
    assert!(o.read("apparmor.err").contains("no AppArmor"), "{log}");
    assert_eq!(
        (o.code("keep.rc"), o.read("keep.out").as_str()),
        (3, "ran\n"),
        "{log}"
    );
    assert_eq!(
        status_of(&o.json("keep.state")),
        "stopped",
        "--keep keeps it"
    );
    assert_eq!(o.code("keep-delete.rc"), 0, "{log}");
    assert_eq!(
        (o.code("plain.rc"), o.read("plain.out").as_str()),
        (3, "ran\n"),
        "{log}"
    );
    assert_eq!(o.code("plain.state.rc"), 1, "run without --keep deletes it");
    assert_eq!(o.code("rootless.rc"), 0, "{log}");
    let rootless = o.json("rootless-dir/config.json");
    assert_eq!(
        rootless["linux"]["uidMappings"],
        json!([{"containerID": 0, "hostID": 0, "size": 1}]),
        "runc's rootless spec maps the caller (root here) to the container's root: {rootless}"
    );
    assert_eq!(o.code("spec.rc"), 0, "{log}");
    let f = o.json("features.json");
    assert_eq!(f["ociVersionMax"], "1.3.0", "{f}");
    assert_eq!(f["linux"]["seccomp"]["enabled"], true, "{f}");
    o.assert_clean();
}

#[test]
fn delete_force_and_a_killed_vm_leave_nothing() {
    let b = bundle("force", &["sleep", "1000"], |_| {});
    let o = script(
        "force",
        &format!(
            r#"
$S create --bundle {b} --pid-file pid1 c1 </dev/null; $S start c1
$S create --bundle {b} --pid-file pid2 c2 </dev/null; $S start c2
$S delete c1 2>delete.err; echo $? >delete.rc
$S delete --force c1; echo $? >force.rc
kill -9 $(cat state/c2/vmm.pid)
wait_stopped c2
$S state c2 >state.c2
$S delete c2; echo $? >delete2.rc
$S delete --force nothing-here; echo $? >force-missing.rc
"#,
            b = b.display()
        ),
    );
    assert_eq!(o.code("delete.rc"), 1, "{}", o.read("script.log"));
    assert!(o
        .read("delete.err")
        .contains("cannot delete container c1 that is not stopped: running"));
    assert_eq!(o.code("force.rc"), 0);
    assert_eq!(status_of(&o.json("state.c2")), "stopped");
    assert_eq!(o.code("delete2.rc"), 0);
    assert_eq!(o.code("force-missing.rc"), 0);
    let pid2: i32 = o.read("pid2").trim().parse().unwrap();
    assert_eq!(o.reaped().get(&pid2), Some(&137), "{}", o.read("reaped"));
    o.assert_clean();
}

#[test]
fn a_terminal_goes_to_the_console_socket() {
    let b = bundle(
        "tty",
        &["sh", "-c", "tty; stty size; read x; echo got $x"],
        |s| s["process"]["terminal"] = json!(true),
    );
    let receiver = repo_root().join("tests/scripts/console-receiver.py");
    let o = script(
        "tty",
        &format!(
            r#"
python3 {receiver} console.sock console.out &
rpid=$!
for _ in $(seq 50); do [ -S console.sock ] && break; sleep 0.1; done
$S create --bundle {b} --console-socket console.sock c1 </dev/null; echo $? >create.rc
sleep 0.5
$S start c1
wait_stopped c1
wait $rpid
$S delete c1
"#,
            b = b.display(),
            receiver = receiver.display()
        ),
    );
    assert_eq!(o.code("create.rc"), 0, "{}", o.read("script.log"));
    let out = o.read("console.out");
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    // "hello" was typed before start: the guest terminal echoes it.
    assert!(lines.iter().any(|l| l.starts_with("/dev/pts/")), "{out:?}");
    assert!(lines.contains(&"30 100"), "{out:?}");
    assert!(lines.contains(&"got hello"), "{out:?}");
    o.assert_clean();
}

#[test]
fn bad_input_gets_one_line_and_leaves_nothing() {
    let root = work_dir().join("bad-root");
    let _ = std::fs::remove_dir_all(&root);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(sandboxvm_bin())
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let malformed = bundle("malformed", &["true"], |_| {});
    std::fs::write(malformed.join("config.json"), "{ nope").unwrap();
    let no_rootfs = bundle("norootfs", &["true"], |_| {});
    std::fs::remove_dir_all(no_rootfs.join("rootfs")).unwrap();
    let tty = bundle("tty-no-socket", &["true"], |s| {
        s["process"]["terminal"] = json!(true)
    });
    let ok = bundle("bad-kernel", &["true"], |_| {});
    // podman's --ipc container:X between two VMs: a host process's
    // namespace, which the guest cannot join.
    let ns_path = bundle("ns-path", &["true"], |s| {
        let list = s["linux"]["namespaces"].as_array_mut().unwrap();
        list.retain(|ns| ns["type"] != "ipc");
        list.push(json!({"type": "ipc", "path": "/proc/1/ns/ipc"}));
    });
    let m = malformed.to_str().unwrap();
    let victim = root.parent().unwrap().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    for (args, want) in [
        (vec!["create", "--bundle", m, "x"], "malformed config"),
        (
            vec!["create", "--bundle", no_rootfs.to_str().unwrap(), "x"],
            "no such directory",
        ),
        (
            vec!["create", "--bundle", tty.to_str().unwrap(), "x"],
            "--console-socket is needed",
        ),
        (vec!["create", "--bundle", m, "a/b"], "invalid container id"),
        (
            vec!["create", "--bundle", ns_path.to_str().unwrap(), "x"],
            "the ipc namespace at /proc/1/ns/ipc cannot be joined",
        ),
        // Ids never name a path outside the root: measured before, this
        // removed the directory beside the root.
        (vec!["delete", "-f", "../victim"], "invalid container id"),
        (vec!["delete", "-f", "/"], "invalid container id"),
        (vec!["kill", "..", "KILL"], "invalid container id"),
        (vec!["state", ".x"], "invalid container id"),
        (
            // The VMM cannot load this "kernel": the monitor reports it.
            vec![
                "create",
                "--bundle",
                ok.to_str().unwrap(),
                "--kernel",
                "/bin/true",
                "x",
            ],
            "the VMM exited unexpectedly",
        ),
        (vec!["start", "x"], "container \"x\" does not exist"),
        (vec!["kill", "x", "KILL"], "does not exist"),
        (vec!["state", "x"], "does not exist"),
        (vec!["delete", "x"], "does not exist"),
    ] {
        let (code, err) = run(&args);
        // A refused id is a usage error (2), like clap's others.
        let usage = want == "invalid container id";
        assert_eq!(code, if usage { 2 } else { 1 }, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("sandboxvm: "), "{err}");
    }
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the state root: {left:?}");
    assert!(victim.is_dir(), "a directory beside the root was removed");
    std::fs::remove_dir_all(&victim).unwrap();
}

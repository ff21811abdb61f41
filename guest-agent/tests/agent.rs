//! Host integration tests: the agent in `--listen unix://` mode, a busybox
//! rootfs, the generated ttrpc client. Needs root (namespaces, mounts).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use protocol::agent::*;
use protocol::agent_ttrpc::AgentClient;

static N: AtomicUsize = AtomicUsize::new(0);

struct Agent {
    child: Child,
    dir: PathBuf,
    cgroup_root: PathBuf,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Shared by the tests of this process: the last one removes it.
        let _ = std::fs::remove_dir(&self.cgroup_root);
    }
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// The message of an rpc error.
fn msg(e: protocol::ttrpc::Error) -> String {
    match e {
        protocol::ttrpc::Error::RpcStatus(s) => s.message,
        e => e.to_string(),
    }
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

fn start_agent() -> Agent {
    let dir = std::env::temp_dir().join(format!(
        "sandboxvm-agent-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    // The mount points an image has (a container in a user namespace
    // cannot make them in a rootfs owned by the host's root).
    for d in ["tmp", "proc", "dev"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    // The spec's hostname is bound over it (by the container, from a file
    // the agent wrote).
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/hostname"), "image\n").unwrap();
    for l in [
        "sh", "echo", "cat", "id", "sleep", "hostname", "test", "tty", "true", "ls",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).unwrap();
    }
    let sock = dir.join("agent.sock");
    let cg = format!(
        "/sys/fs/cgroup/unified/sandboxvm-test-{}",
        std::process::id()
    );
    let child = Command::new(env!("CARGO_BIN_EXE_sandboxvm-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--cgroup-root")
        .arg(&cg)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("agent did not listen: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let client = protocol::agent_client(stream).unwrap();
    Agent {
        child,
        dir,
        cgroup_root: cg.into(),
        client,
    }
}

fn t() -> protocol::ttrpc::context::Context {
    protocol::ctx(Duration::from_secs(20))
}

fn spec(args: &[&str], extra: &str) -> String {
    let args = serde_json::to_string(args).unwrap();
    format!(
        r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "terminal": false, "user": {{"uid": 0, "gid": 0}}, "args": {args},
    "env": ["PATH=/usr/bin:/bin", "TERM=xterm"], "cwd": "/", "noNewPrivileges": true {extra}
  }},
  "root": {{"path": "rootfs"}},
  "hostname": "sbx-test",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid","strictatime","mode=755","size=65536k"]}},
    {{"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620"]}},
    {{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid","nodev"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "mount"}}],
    "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]
  }}
}}"#
    )
}

impl Agent {
    fn create(&self, id: &str, spec: &str) -> protocol::ttrpc::Result<Empty> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec.into(),
            share_tag: String::new(),
            rootfs_subpath: self.dir.join("rootfs").display().to_string(),
            ..Default::default()
        };
        self.client.create_container(t(), &req)
    }
    fn creq(&self, id: &str) -> ContainerRequest {
        ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        }
    }
    fn start(&self, id: &str) {
        self.client.start_container(t(), &self.creq(id)).unwrap();
    }
    fn remove(&self, id: &str) {
        self.client.remove_container(t(), &self.creq(id)).unwrap();
    }
    fn wait(&self, id: &str, exec: &str) -> i32 {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        self.client
            .wait_process(protocol::ctx(Duration::ZERO), &req)
            .unwrap()
            .status
    }
    fn stdout(&self, id: &str, exec: &str) -> String {
        let mut out = Vec::new();
        loop {
            let req = ReadStreamRequest {
                container_id: id.into(),
                exec_id: exec.into(),
                len: 4096,
                ..Default::default()
            };
            let r = self
                .client
                .read_stdout(protocol::ctx(Duration::ZERO), &req)
                .unwrap();
            if r.data.is_empty() {
                return String::from_utf8_lossy(&out).into_owned();
            }
            out.extend_from_slice(&r.data);
        }
    }
    /// SIGKILL to the init; its status is 137.
    fn kill9(&self, id: &str) {
        let k = SignalProcessRequest {
            container_id: id.into(),
            signal: 9,
            ..Default::default()
        };
        self.client.signal_process(t(), &k).unwrap();
        assert_eq!(self.wait(id, ""), 137);
    }
    /// create + start + full stdout + status + remove.
    fn run(&self, id: &str, spec: &str) -> (String, i32) {
        self.create(id, spec).unwrap();
        self.start(id);
        let out = self.stdout(id, "");
        let status = self.wait(id, "");
        self.remove(id);
        (out, status)
    }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

#[test]
fn echo_exit_hostname_id() {
    need_root!();
    let before = mount_count();
    let a = start_agent();
    let d = a.client.guest_details(t(), &Empty::new()).unwrap();
    assert!(!d.kernel_release.is_empty());
    assert_eq!(
        a.run("echo", &spec(&["echo", "hello"], "")),
        ("hello\n".into(), 0)
    );
    assert_eq!(a.run("exit7", &spec(&["sh", "-c", "exit 7"], "")).1, 7);
    assert_eq!(
        a.run(
            "host",
            &spec(&["sh", "-c", "hostname; cat /etc/hostname"], "")
        )
        .0,
        "sbx-test\nsbx-test\n"
    );
    let user = spec(&["id"], "").replace(
        r#""uid": 0, "gid": 0"#,
        r#""uid": 1000, "gid": 1000, "additionalGids": [10]"#,
    );
    let (out, st) = a.run("id", &user);
    assert_eq!(st, 0);
    assert!(
        out.contains("uid=1000") && out.contains("gid=1000"),
        "{out}"
    );
    // PID namespace: the workload is PID 1.
    assert_eq!(a.run("pid", &spec(&["sh", "-c", "echo $$"], "")).0, "1\n");
    drop(a);
    assert_eq!(mount_count(), before, "mounts leaked");
}

#[test]
fn stdin_reaches_cat() {
    need_root!();
    let a = start_agent();
    a.create("cat", &spec(&["cat"], "")).unwrap();
    a.start("cat");
    let w = WriteStdinRequest {
        container_id: "cat".into(),
        data: b"from stdin\n".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.client.write_stdin(t(), &w).unwrap().len, 11);
    let c = ProcessRequest {
        container_id: "cat".into(),
        ..Default::default()
    };
    a.client.close_stdin(t(), &c).unwrap();
    assert_eq!(a.stdout("cat", ""), "from stdin\n");
    assert_eq!(a.wait("cat", ""), 0);
    a.remove("cat");
}

#[test]
fn missing_binary_is_a_clear_error() {
    need_root!();
    let a = start_agent();
    let e = a.create("nosuch", &spec(&["nosuch"], "")).unwrap_err();
    assert!(
        msg(e.clone()) == r#"exec: "nosuch": executable file not found in $PATH"#,
        "{e}"
    );
    // Nothing is left behind: the id is free again.
    assert_eq!(a.run("nosuch", &spec(&["true"], "")).1, 0);
}

#[test]
fn exec_signal_state() {
    need_root!();
    let a = start_agent();
    a.create("sl", &spec(&["sleep", "10"], "")).unwrap();
    let st = a.client.state_container(t(), &a.creq("sl")).unwrap();
    assert_eq!(st.status, "created");
    a.start("sl");
    assert_eq!(
        a.client.state_container(t(), &a.creq("sl")).unwrap().status,
        "running"
    );
    let p = r#"{"user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "echo exec $(hostname)"], "env": ["PATH=/bin"], "cwd": "/"}"#;
    let req = ExecProcessRequest {
        container_id: "sl".into(),
        exec_id: "e1".into(),
        process_json: p.into(),
        ..Default::default()
    };
    a.client.exec_process(t(), &req).unwrap();
    assert_eq!(a.stdout("sl", "e1"), "exec sbx-test\n");
    assert_eq!(a.wait("sl", "e1"), 0);
    let bad = ExecProcessRequest {
        exec_id: "e2".into(),
        process_json: p.replace(r#"["sh", "-c", "echo exec $(hostname)"]"#, r#"["nosuch"]"#),
        ..req.clone()
    };
    let e = a.client.exec_process(t(), &bad).unwrap_err();
    assert_eq!(
        msg(e),
        r#"exec: "nosuch": executable file not found in $PATH"#
    );
    a.kill9("sl");
    let st = a.client.state_container(t(), &a.creq("sl")).unwrap();
    assert_eq!((st.status.as_str(), st.exit_status), ("stopped", 137));
    a.remove("sl");
}

#[test]
fn terminal_process_sees_a_tty() {
    need_root!();
    let a = start_agent();
    let s = spec(&["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"], "")
        .replace(r#""terminal": false"#, r#""terminal": true"#);
    let (out, st) = a.run("tty", &s);
    assert_eq!(st, 0, "{out}");
    assert!(out.contains("is-a-tty"), "{out:?}");
}

#[test]
fn remove_before_start_and_unknown_ids() {
    need_root!();
    let a = start_agent();
    a.create("never", &spec(&["echo", "x"], "")).unwrap();
    a.remove("never");
    let e = a.client.start_container(t(), &a.creq("never")).unwrap_err();
    assert_eq!(msg(e), r#"container "never" not found"#);
    let _ = Path::new("/");
}

/// `spec` with a new user namespace mapping container ids 0-65535 to the
/// host's 100000- (uids) and 200000- (gids).
fn userns_spec(args: &[&str]) -> String {
    spec(args, "")
        .replace(
            r#"{"type": "mount"}]"#,
            r#"{"type": "mount"}, {"type": "user"}]"#,
        )
        .replace(
            r#""maskedPaths""#,
            r#""uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}],
    "maskedPaths""#,
        )
}

#[test]
fn a_user_namespace_holds_the_init_and_its_execs_and_its_root_is_not_the_hosts() {
    need_root!();
    let a = start_agent();
    // Its root has every capability, in its namespace only: the rootfs
    // (the host root's) shows as unmapped, and no device node can be made.
    let (out, st) = a.run(
        "userns",
        &userns_spec(&[
            "sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c %u:%g /bin/busybox; \
             cat /etc/hostname; mknod /tmp/n c 1 3 2>/dev/null && echo made-a-node || echo no-node",
        ]),
    );
    let out: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        (out, st),
        (
            vec![
                "0 100000 65536".to_string(),
                "0 200000 65536".into(),
                "0".into(),
                "65534:65534".into(),
                "sbx-test".into(),
                "no-node".into()
            ],
            0
        )
    );
    a.create("userns-exec", &userns_spec(&["sleep", "10"]))
        .unwrap();
    a.start("userns-exec");
    let req = ExecProcessRequest {
        container_id: "userns-exec".into(),
        exec_id: "e1".into(),
        process_json: r#"{"user": {"uid": 1000, "gid": 1000}, "args": ["cat", "/proc/self/uid_map"], "env": ["PATH=/bin"], "cwd": "/"}"#.into(),
        ..Default::default()
    };
    a.client.exec_process(t(), &req).unwrap();
    let map = a.stdout("userns-exec", "e1");
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"],
        "{map:?}"
    );
    assert_eq!(a.wait("userns-exec", "e1"), 0);
    let host_uid = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap()
    };
    let st = a
        .client
        .state_container(t(), &a.creq("userns-exec"))
        .unwrap();
    assert_eq!(
        host_uid(&st.pid.to_string()),
        "100000",
        "the init as the host sees it"
    );
    a.kill9("userns-exec");
    a.remove("userns-exec");
    // Maps the kernel refuses (overlapping ranges) fail the create in one
    // line that names them.
    let overlap = userns_spec(&["true"]).replace(
        r#"[{"containerID": 0, "hostID": 100000, "size": 65536}]"#,
        r#"[{"containerID": 0, "hostID": 100000, "size": 10}, {"containerID": 5, "hostID": 300000, "size": 10}]"#,
    );
    let e = msg(a.create("overlap", &overlap).unwrap_err());
    assert!(
        e.contains("uid_map (0 100000 10, 5 300000 10): Invalid argument"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn the_device_filter_lets_through_what_the_rules_allow_and_nothing_else() {
    need_root!();
    let a = start_agent();
    // The container's root may make any node; it may open /dev/null (runc's
    // defaults) and the kmsg node only when the rules allow it.
    let probe = [
        "sh",
        "-c",
        "mknod /dev/kmsg2 c 1 11 && echo made; true </dev/kmsg2 && echo opened-kmsg; \
         echo x >/dev/null && echo wrote-null",
    ];
    let with_devices = |rules: &str| {
        spec(&probe, "").replace(
            r#""maskedPaths""#,
            &format!(r#""resources": {{"devices": {rules}}}, "maskedPaths""#),
        )
    };
    let (out, _) = a.run(
        "deny-all",
        &with_devices(r#"[{"allow": false, "access": "rwm"}]"#),
    );
    assert_eq!(out, "made\nwrote-null\n");
    let (out, _) = a.run("no-rules", &spec(&probe, ""));
    assert_eq!(out, "made\nwrote-null\n", "no rules: runc's defaults only");
    let (out, _) = a.run(
        "kmsg-allowed",
        &with_devices(
            r#"[{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "r"}]"#,
        ),
    );
    assert_eq!(out, "made\nopened-kmsg\nwrote-null\n");
    let (out, _) = a.run(
        "privileged",
        &with_devices(r#"[{"allow": true, "access": "rwm"}]"#),
    );
    assert_eq!(out, "made\nopened-kmsg\nwrote-null\n");
    let e = msg(a
        .create(
            "bad-rule",
            &with_devices(r#"[{"allow": true, "access": "rwx"}]"#),
        )
        .unwrap_err());
    assert!(e.contains("linux.resources.devices: access"), "{e}");
}

/// `linux.rootfsPropagation` is the container root's own: shared shows in
/// its mountinfo (a bind below / then shows in a bind of /), unbindable
/// refuses a bind of /, and without it the root is private.
#[test]
fn the_rootfs_propagation_is_the_container_roots() {
    need_root!();
    let a = start_agent();
    let probe = [
        "sh",
        "-c",
        r#"busybox awk '$5 == "/" { print ($0 ~ / shared:/) ? "shared" : "not-shared" }' /proc/self/mountinfo;
           busybox mount --bind / /tmp 2>/dev/null && echo bound || echo refused"#,
    ];
    let with = |p: &str| {
        spec(&probe, "").replace(
            r#""maskedPaths""#,
            &format!(r#""rootfsPropagation": "{p}", "maskedPaths""#),
        )
    };
    assert_eq!(
        a.run("shared", &with("rshared")),
        ("shared\nbound\n".into(), 0)
    );
    assert_eq!(
        a.run("unbindable", &with("unbindable")),
        ("not-shared\nrefused\n".into(), 0)
    );
    assert_eq!(
        a.run("private", &spec(&probe, "")),
        ("not-shared\nbound\n".into(), 0)
    );
    let e = msg(a.create("bad", &with("sideways")).unwrap_err());
    assert!(e.contains("linux.rootfsPropagation \"sideways\""), "{e}");
}

//! End to end: `sandboxvm run` of a busybox bundle, with the real guest
//! kernel, agent initramfs, virtiofsd and KVM (this host if it has hardware
//! virtualization, else the nested CI host).
//! Each test runs sandboxvm through `e2e::run` (a script on the KVM host
//! that records what is left behind).

use std::process::Command;

use e2e::fixtures::{artefacts, bundle, work_dir};
use e2e::run::{
    as_owned_guest, assert_clean, assert_fails, assert_read_only_refused, run, run_during,
    run_with, OWNED_GUEST,
};
use serde_json::json;

#[test]
fn echo_output_arrives_and_the_status_is_0() {
    let r = run(&bundle("echo", &["echo", "hello from the sandbox"], |_| {}));
    assert_eq!(r.stdout, "hello from the sandbox\n", "{r:?}");
    assert_eq!(r.stderr, "");
    assert_eq!(r.code, 0);
    assert_clean(&r);
}

#[test]
fn the_exit_status_is_the_workloads() {
    let r = run(&bundle(
        "exit7",
        &["sh", "-c", "echo to-stderr >&2; exit 7"],
        |_| {},
    ));
    assert_eq!(r.code, 7, "{r:?}");
    assert_eq!(r.stderr, "to-stderr\n");
    assert_clean(&r);
}

#[test]
fn hostname_and_user_come_from_the_spec() {
    let r = run(&bundle(
        "ids",
        &["sh", "-c", "hostname; cat /etc/hostname; id"],
        |s| {
            s["hostname"] = json!("spec-host");
            s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [65534]});
        },
    ));
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "spec-host", "{r:?}");
    assert_eq!(lines[1], "spec-host", "/etc/hostname: {r:?}");
    assert!(
        lines[2].starts_with("uid=1000(user) gid=1000(user) groups="),
        "{r:?}"
    );
    assert!(lines[2].contains("65534(nogroup)"), "{r:?}");
    assert_clean(&r);
}

#[test]
fn stdin_arrives() {
    let b = bundle("stdin", &["sh", "-c", "tr a-z A-Z; echo done"], |_| {});
    let r = run_with(&b, "", "piped in\nsecond line\n", None);
    assert_eq!(r.stdout, "PIPED IN\nSECOND LINE\ndone\n", "{r:?}");
    assert_eq!(r.code, 0);
    assert_clean(&r);
}

#[test]
fn a_terminal_run_works_under_script() {
    let b = bundle(
        "tty",
        &["sh", "-c", "tty; test -t 0 && echo is-a-tty; stty size"],
        |s| {
            s["process"]["terminal"] = json!(true);
        },
    );
    // script gives sandboxvm a terminal of 30x100; its typescript is stdout.
    let r = run_with(
        &b,
        "",
        "",
        Some("script -qfec 'stty rows 30 cols 100; {}' /dev/null"),
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("/dev/pts/"), "{r:?}");
    assert!(r.stdout.contains("is-a-tty"), "{r:?}");
    assert!(r.stdout.contains("30 100"), "{r:?}");
    assert_clean(&r);
}

#[test]
fn the_guest_kernel_is_not_the_hosts() {
    let r = run(&bundle(
        "kernel",
        &["sh", "-c", "uname -r; dmesg | head -n 3"],
        |_| {},
    ));
    assert_eq!(r.code, 0, "{r:?}");
    let kernel = std::fs::canonicalize(&artefacts().kernel).unwrap();
    let release = std::fs::read_to_string(kernel.with_file_name("release")).unwrap_or_default();
    let first = r.stdout.lines().next().unwrap_or_default();
    assert_eq!(first, release.trim(), "{r:?}");
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_ne!(first, host.trim());
    assert!(
        r.stdout.contains("Linux version"),
        "dmesg shows the guest's boot log: {r:?}"
    );
    assert_clean(&r);
}

#[test]
fn files_written_in_the_container_appear_in_the_bundle_rootfs() {
    let b = bundle(
        "write",
        &["sh", "-c", "echo written-inside >/tmp/from-guest"],
        |_| {},
    );
    let r = run(&b);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(b.join("rootfs/tmp/from-guest")).unwrap(),
        "written-inside\n"
    );
    assert_clean(&r);
}

/// The owned guest: a container with every capability, in the guest's pid
/// namespace, takes the guest's own mount of the share (as an owned guest
/// kernel would) and tries to write what the host shared read-only:
/// the share's skeleton (to fill the host's /run or plant symlinks where the
/// host mounts) and a read-only volume. Only its own rootfs is writable.
#[test]
fn an_owned_guest_writes_only_its_own_rootfs_through_the_share() {
    let vol = work_dir().join("ro-volume");
    let _ = std::fs::remove_dir_all(&vol);
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("file"), "keep").unwrap();
    let attack = OWNED_GUEST.to_string()
        + r#"
[ -d $m/rootfs ] && echo reached
v=$(echo $m/mounts/*-ro-volume)
try 'echo x >$m/fill' skeleton-file
try 'mkdir $m/mounts/evil' skeleton-dir
try 'ln -s / $m/mounts/link' skeleton-symlink
try 'mv $m/mounts $m/moved' skeleton-rename
try 'echo owned >$v/file' volume-file
try 'echo new >$v/new' volume-new
try 'echo mine >$m/rootfs/tmp/mine' own-rootfs
"#;
    let b = bundle("attack-share", &["sh", "-c", &attack], |s| {
        as_owned_guest(s);
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "bind",
            "source": vol, "options": ["rbind", "ro"]
        }));
    });
    let r = run(&b);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("reached\n"), "{r:?}");
    assert!(!r.stdout.contains("WROTE skeleton"), "{r:?}");
    assert!(!r.stdout.contains("WROTE volume"), "{r:?}");
    // Refused by the host (the share's view), not missing.
    assert_read_only_refused(
        &r,
        &["skeleton-file", "skeleton-dir", "volume-file", "volume-new"],
    );
    assert!(r.stdout.contains("WROTE own-rootfs"), "{r:?}");
    assert_eq!(std::fs::read_to_string(vol.join("file")).unwrap(), "keep");
    assert!(!vol.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(b.join("rootfs/tmp/mine")).unwrap(),
        "mine\n"
    );
    assert_clean(&r);
}

/// `root.readonly`: read-only for the workload (the agent's remount) and
/// for an owned guest that writes the rootfs through its own mount of the
/// share (the host shares it read-only); the mount point of a volume the
/// image lacks is made by the host, inside the rootfs.
#[test]
fn a_read_only_rootfs_is_read_only_for_an_owned_guest_too() {
    let vol = work_dir().join("rw-volume");
    let _ = std::fs::remove_dir_all(&vol);
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("file"), "keep").unwrap();
    let attack = OWNED_GUEST.to_string()
        + r#"
try 'echo x >$m/rootfs/tmp/mine' through-share
try 'echo x >/tmp/mine' in-container
try 'echo more >>/data/new/vol/file' volume
"#;
    let b = bundle("ro-root", &["sh", "-c", &attack], |s| {
        s["root"]["readonly"] = json!(true);
        as_owned_guest(s);
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data/new/vol", "type": "bind",
            "source": vol, "options": ["rbind", "rw"]
        }));
    });
    assert!(!b.join("rootfs/data").exists());
    let r = run(&b);
    assert_eq!(r.code, 0, "{r:?}");
    assert_read_only_refused(&r, &["through-share", "in-container"]);
    assert!(r.stdout.contains("WROTE volume"), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(vol.join("file")).unwrap(),
        "keepmore\n"
    );
    assert!(!b.join("rootfs/tmp/mine").exists());
    assert!(
        b.join("rootfs/data/new/vol").is_dir(),
        "the host made the mount point"
    );
    assert_clean(&r);
}

#[test]
fn bad_bundles_are_one_line_errors_and_leave_nothing() {
    let b = bundle("noconfig", &["true"], |_| {});
    std::fs::remove_file(b.join("config.json")).unwrap();
    assert_fails(&run(&b), "config.json: no such file");

    let b = bundle("malformed", &["true"], |_| {});
    std::fs::write(b.join("config.json"), "{\"ociVersion\": ").unwrap();
    assert_fails(&run(&b), "malformed config");

    let b = bundle("version", &["true"], |s| s["ociVersion"] = json!("9.9.9"));
    assert_fails(&run(&b), "unsupported ociVersion \"9.9.9\"");

    let b = bundle("noargs", &[], |_| {});
    assert_fails(&run(&b), "process.args must not be empty");

    let b = bundle("norootfs", &["true"], |_| {});
    std::fs::remove_dir_all(b.join("rootfs")).unwrap();
    assert_fails(&run(&b), "rootfs: no such directory");
}

#[test]
fn a_missing_binary_is_a_one_line_error() {
    let r = run(&bundle("nobinary", &["no-such-program"], |_| {}));
    assert_fails(&r, "no-such-program");
}

#[test]
fn a_guest_that_never_comes_up_times_out_cleanly() {
    // An initramfs without the agent: the kernel boots, nobody listens.
    let b = bundle("noagent", &["true"], |_| {});
    let empty = work_dir().join("empty.cpio");
    std::fs::write(&empty, initramfs::Writer::new(Vec::new()).finish().unwrap()).unwrap();
    let r = run_with(
        &b,
        &format!("--boot-timeout 5 --initrd {}", empty.display()),
        "",
        None,
    );
    assert_fails(&r, "");
    assert!(
        r.stderr.contains("did not come up within 5 s") || r.stderr.contains("exited unexpectedly"),
        "{r:?}"
    );
}

/// Waits (in the test script) until the container printed `started`.
const WAIT_STARTED: &str =
    "for i in $(seq 300); do grep -q started stdout 2>/dev/null && break; sleep 0.1; done";

#[test]
fn virtiofsd_dying_ends_the_run_with_a_one_line_error() {
    let b = bundle("vfsdies", &["sh", "-c", "echo started; sleep 60"], |_| {});
    let r = run_during(
        &b,
        "",
        "",
        None,
        &format!("{WAIT_STARTED}; pkill -KILL -x virtiofsd"),
    );
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "started\n", "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("virtiofsd exited unexpectedly"), "{r:?}");
    assert_clean(&r);
}

#[test]
fn a_killed_vmm_ends_the_run_with_a_one_line_error() {
    let b = bundle("vmmdies", &["sh", "-c", "echo started; sleep 60"], |_| {});
    let r = run_during(
        &b,
        "",
        "",
        None,
        &format!("{WAIT_STARTED}; pkill -KILL -f 'sandboxvm.* boot '"),
    );
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "started\n", "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.starts_with("sandboxvm: "), "{r:?}");
    assert!(
        r.stderr
            .contains("the VMM exited unexpectedly (killed by signal 9)"),
        "{r:?}"
    );
    assert_clean(&r);
}

#[test]
fn sigterm_is_forwarded_to_the_workload() {
    let b = bundle(
        "sigterm",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 5' TERM; echo started; while true; do sleep 0.1; done",
        ],
        |_| {},
    );
    let r = run_during(
        &b,
        "",
        "",
        None,
        &format!("{WAIT_STARTED}; kill -TERM $pid"),
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert_eq!(r.stdout, "started\ngot TERM\n", "{r:?}");
    assert_clean(&r);
}

#[test]
fn resource_limits_become_the_containers_cgroup() {
    let b = bundle(
        "limits",
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max; grep -c ^processor /proc/cpuinfo",
        ],
        |s| {
            s["linux"]["resources"] = json!({
                "memory": {"limit": 64 << 20},
                "pids": {"limit": 50},
                "cpu": {"quota": 150000, "period": 100000}
            });
        },
    );
    let r = run(&b);
    assert_eq!(r.code, 0, "{r:?}");
    // Its own cgroup namespace; the limits; 2 vCPUs for a 1.5 CPU quota.
    assert_eq!(r.stdout, "0::/\n67108864\n50\n150000 100000\n2\n", "{r:?}");
    assert_clean(&r);
}

#[test]
fn an_istio_style_init_container_redirects_outbound_tcp_with_iptables_nft_and_legacy() {
    // The host's iptables (Debian's, both back ends) run from a read-only
    // mount of its /usr through its dynamic loader, with
    // NET_ADMIN and NET_RAW as Istio's istio-init container gets them. The
    // rules are istio-iptables' shape: a REDIRECT chain for outbound TCP,
    // an owner match that lets the proxy's uid through, comments and
    // multiport. A connection to 127.0.0.1:80 (nft) or :8080 (legacy) must
    // reach the "proxy" listening on 15001.
    let script = r#"
set -e
ipt() {
  multi=$1; shift
  XTABLES_LIBDIR=/host/usr/lib/x86_64-linux-gnu/xtables XTABLES_LOCKFILE=/tmp/xtables.lock \
    /host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/usr/lib/x86_64-linux-gnu \
    /host/usr/sbin/xtables-$multi-multi iptables "$@"
}
proxy() { nc -l -p 15001 -e echo "redirected by $1" & sleep 0.5; }
for backend in nft:80 legacy:8080; do
  multi=${backend%:*}; port=${backend#*:}
  ipt $multi -t nat -N ISTIO_REDIRECT
  ipt $multi -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
  ipt $multi -t nat -A OUTPUT -p tcp -m owner --uid-owner 1337 -j RETURN
  ipt $multi -t nat -A OUTPUT -p tcp -m multiport --dports $port -m comment --comment istio-style -j ISTIO_REDIRECT
  proxy $multi
  nc -w 5 127.0.0.1 $port </dev/null
  ipt $multi -t nat -S OUTPUT | grep -c istio-style
  ipt $multi -t nat -F; ipt $multi -t nat -X
done
"#;
    let host_ro = |dir: &str| {
        json!({"destination": format!("/host{dir}"), "type": "bind", "source": dir,
               "options": ["rbind", "ro"]})
    };
    let b = bundle("iptables", &["sh", "-c", script], |s| {
        let caps = ["CAP_NET_ADMIN", "CAP_NET_RAW"];
        for set in ["bounding", "effective", "permitted"] {
            let list = s["process"]["capabilities"][set].as_array_mut().unwrap();
            list.extend(caps.iter().map(|c| json!(c)));
        }
        let mounts = s["mounts"].as_array_mut().unwrap();
        mounts.push(host_ro("/usr"));
    });
    let r = run(&b);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout, "redirected by nft\n1\nredirected by legacy\n1\n",
        "{r:?}"
    );
    assert_clean(&r);
}

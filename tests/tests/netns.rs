//! End to end: pod networking. Each test plays the CNI bridge plugin on
//! the KVM host (the nested CI host where this host cannot boot guests):
//! a "host" network namespace with a bridge holding the gateway address,
//! a pod namespace whose `eth0` is a veth to that bridge, with addresses,
//! default routes and MTU 1400, and `/etc/netns/POD/resolv.conf`. Only
//! namespaces the test made get addresses. The spec names the pod
//! namespace; sandboxvm mirrors it into the VM (taps + tc in the pod
//! namespace) and the guest agent configures the guest interface.
//!
//! Every script ends by recording what is left: state dirs, VMM /
//! virtiofsd / monitor processes, mounts, and anything in the pod
//! namespace besides its veth (taps, qdiscs, filters).

use std::collections::HashMap;
use std::path::PathBuf;

use e2e::fixtures::{artefacts, bundle, run_reaped, work_dir};
use e2e::sandboxvm_bin;
use serde_json::json;

/// The test's side of the KVM host, before and after the test's body.
const SCRIPT: &str = r#"cd @DIR@
export SANDBOXVM_KERNEL=@KERNEL@ SANDBOXVM_INITRD=@INITRD@
S="@BIN@ --root @DIR@/state -v --log @DIR@/sandboxvm.log"
P=@POD@ H=@HOST@
pids=
cleanup() {
  kill $pids 2>/dev/null
  ip netns del $P 2>/dev/null
  ip netns del $H 2>/dev/null
  rm -rf /etc/netns/$P
  rmdir /etc/netns 2>/dev/null
}
trap cleanup EXIT
# What the CNI bridge plugin makes: a bridge with the gateway address...
ip netns add $H || exit 1
ip netns add $P || exit 1
ip -n $H link set lo up
ip -n $H link add cni0 type bridge || exit 1
ip -n $H addr add 10.89.0.1/24 dev cni0
ip -n $H -6 addr add fd89::1/64 dev cni0 nodad
ip -n $H link set cni0 up
# ... and a veth: eth0 in the pod, the other end on the bridge.
ip link add eth0 netns $P mtu 1400 type veth peer name veth-pod netns $H mtu 1400 || exit 1
ip -n $H link set veth-pod master cni0 up
ip -n $P link set lo up
ip -n $P addr add 10.89.0.2/24 dev eth0
ip -n $P -6 addr add fd89::2/64 dev eth0 nodad
ip -n $P link set eth0 up
ip -n $P route add default via 10.89.0.1
ip -n $P -6 route add default via fd89::1
mkdir -p /etc/netns/$P
printf 'nameserver 10.89.0.53\nsearch pod.test\n' >/etc/netns/$P/resolv.conf
ip -n $P -o link show eth0 | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2 >pod-mac
mkdir -p www
echo "hello from the host" >www/index.html
ip netns exec $H busybox httpd -f -p 8080 -h www & pids="$pids $!"
# Waits until FILE has the line LINE, at most SECS seconds, and no longer
# than the process PID lives if one is given.
wait_line() {
  for _ in $(seq $(( $3 * 10 ))); do
    grep -qx "$2" "$1" 2>/dev/null && return 0
    [ -z "${4:-}" ] || kill -0 "$4" 2>/dev/null || { grep -qx "$2" "$1" 2>/dev/null; return; }
    sleep 0.1
  done
  return 1
}
# Waits until container $1 is stopped (at most 60 s).
wait_stopped() {
  for _ in $(seq 600); do $S state "$1" 2>/dev/null | grep -q '"stopped"' && return 0; sleep 0.1; done
  return 1
}
# What the pod namespace holds besides lo and its veth: taps, qdiscs, filters.
pod_net() {
  ip -n $P -o link show | awk '{print $2}' | grep -v -x -e lo: -e 'eth0@if[0-9]*:'
  tc -n $P qdisc show | grep -v '^qdisc noqueue 0: dev \(lo\|eth0\) root'
  tc -n $P filter show dev eth0 ingress
}
@BODY@
sleep 0.2
set +x
{
  ls -A state 2>/dev/null
  pgrep -a virtiofsd
  pgrep -af 'sandboxvm .*(boot|_monitor) '
  grep -F -e @DIR@ /proc/self/mountinfo
  pod_net
} >leftovers 2>&1
true
"#;

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
    /// The `sandbox: KEY VALUE` lines of a file, by key.
    fn said(&self, name: &str) -> HashMap<String, String> {
        self.read(name)
            .lines()
            .filter_map(|l| l.strip_prefix("sandbox: "))
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap_or((l, ""));
                (k.to_string(), v.trim().to_string())
            })
            .collect()
    }
    fn log(&self) -> String {
        format!(
            "script log:\n{}\nsandboxvm log:\n{}",
            self.read("script.log"),
            self.read("sandboxvm.log")
        )
    }
    fn assert_clean(&self) {
        assert_eq!(
            self.read("leftovers"),
            "",
            "sandboxvm left things behind; {}",
            self.log()
        );
    }
}

/// The pod namespace's name for test `name`.
fn pod_ns(name: &str) -> String {
    format!("sbxp-{}-{name}", std::process::id())
}

/// A bundle `name` running `sh -c script` in the pod namespace of test
/// `test`, with hostname netns-e2e and the files `/srv/index.html`.
fn pod_bundle(test: &str, name: &str, script: &str) -> PathBuf {
    let netns = format!("/run/netns/{}", pod_ns(test));
    let b = bundle(name, &["sh", "-c", script], |s| {
        s["hostname"] = json!("netns-e2e");
        let list = s["linux"]["namespaces"].as_array_mut().unwrap();
        list.retain(|n| n["type"] != "network");
        list.push(json!({"type": "network", "path": netns}));
    });
    let srv = b.join("rootfs/srv");
    std::fs::create_dir_all(&srv).unwrap();
    std::fs::write(srv.join("index.html"), "hello from the sandbox\n").unwrap();
    b
}

/// Runs `body` after the namespace setup, on the KVM host, under a child
/// subreaper (monitors orphaned by `create` are reaped, as under
/// containerd's shim or conmon).
fn script(name: &str, body: &str) -> Out {
    let a = artefacts();
    let dir = work_dir().join(format!("{name}.out"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = SCRIPT
        .replace("@BODY@", body)
        .replace("@DIR@", dir.to_str().unwrap())
        .replace("@KERNEL@", a.kernel.to_str().unwrap())
        .replace("@INITRD@", a.initrd.to_str().unwrap())
        .replace("@BIN@", sandboxvm_bin().to_str().unwrap())
        .replace("@POD@", &pod_ns(name))
        .replace("@HOST@", &format!("sbxh-{}-{name}", std::process::id()));
    run_reaped(&dir, &text);
    Out { dir }
}

/// The guest side of the main test: reports what it sees, talks to the
/// host's server, serves /srv until the host releases it.
const WORKLOAD: &str = r#"say() { echo "sandbox: $*"; }
say mac $(cat /sys/class/net/eth0/address)
say mtu $(cat /sys/class/net/eth0/mtu)
say addr $(ip -o addr show dev eth0 | tr -s ' ' | tr '\n' ' ')
say route $(ip route show default)
say route6 $(ip -6 route show default)
say hosts $(grep -v localhost /etc/hosts)
say resolv $(cat /etc/resolv.conf)
say page $(wget -q -O - http://10.89.0.1:8080/index.html)
say page6 $(wget -q -O - 'http://[fd89::1]:8080/index.html')
t0=$(date +%s)
say blob $(wget -q -O - http://10.89.0.1:8080/blob | sha256sum | cut -d' ' -f1)
say blob-seconds $(( $(date +%s) - t0 ))
httpd -p 8081 -h /srv
say serving
nc -l -p 7000 >/dev/null
say done
"#;

#[test]
fn the_pod_network_reaches_the_sandbox_and_back() {
    let b = pod_bundle("pod", "pod", WORKLOAD);
    // 16 MiB each way (the host's blob down, the sandbox's /srv/big up):
    // thousands of frames, so both virtqueues wrap many times over; the
    // throughput itself is ci/bench-net's (100 MiB each way took most of
    // this test's six minutes under emulation).
    let o = script(
        "pod",
        &format!(
            r#"
dd if=/dev/urandom of=www/blob bs=1M count=16 2>/dev/null
sha256sum <www/blob | cut -d' ' -f1 >blob.sha
dd if=/dev/urandom of={b}/rootfs/srv/big bs=1M count=16 2>/dev/null
sha256sum <{b}/rootfs/srv/big | cut -d' ' -f1 >big.src.sha
$S run --net host-netns {b} >stdout 2>stderr </dev/null &
spid=$!
if wait_line stdout "sandbox: serving" 600 $spid; then
  pod_net >during
  ip netns exec $H busybox wget -q -O - http://10.89.0.2:8081/index.html >page 2>&1
  t0=$(date +%s)
  ip netns exec $H busybox wget -q -O - http://10.89.0.2:8081/big | sha256sum | cut -d' ' -f1 >big.sha
  echo $(( $(date +%s) - t0 )) >big.seconds
  timeout 30 ip netns exec $H busybox nc 10.89.0.2 7000 </dev/null
fi
wait $spid
echo $? >code
"#,
            b = b.display()
        ),
    );
    let log = o.log();
    assert_eq!(o.code("code"), 0, "{}\n{}", o.read("stderr"), log);
    let said = o.said("stdout");
    let get = |k: &str| said.get(k).cloned().unwrap_or_default();
    assert_eq!(get("mac"), o.read("pod-mac").trim(), "the veth's MAC");
    assert_eq!(get("mtu"), "1400");
    assert!(get("addr").contains("inet 10.89.0.2/24"), "{said:?}");
    assert!(get("addr").contains("inet6 fd89::2/64"), "{said:?}");
    assert!(
        get("route").starts_with("default via 10.89.0.1 dev eth0"),
        "{said:?}"
    );
    assert!(
        get("route6").starts_with("default via fd89::1 dev eth0"),
        "{said:?}"
    );
    assert_eq!(get("hosts"), "10.89.0.2 netns-e2e");
    assert_eq!(get("resolv"), "nameserver 10.89.0.53 search pod.test");
    assert_eq!(get("page"), "hello from the host");
    assert_eq!(get("page6"), "hello from the host");
    assert_eq!(
        get("blob"),
        o.read("blob.sha").trim(),
        "16 MiB host -> sandbox"
    );
    assert_eq!(o.read("page"), "hello from the sandbox\n", "{log}");
    assert_eq!(
        o.read("big.sha").trim(),
        o.read("big.src.sha").trim(),
        "16 MiB sandbox -> host"
    );
    assert_eq!(get("done"), "", "released by the host");
    let during = o.read("during");
    assert!(
        during.contains("tap0_sbx:")
            && during.contains("mirred (Egress Redirect to device tap0_sbx)"),
        "the mirroring while it ran: {during}"
    );
    eprintln!(
        "16 MiB host -> sandbox in {} s, sandbox -> host in {} s",
        get("blob-seconds"),
        o.read("big.seconds").trim()
    );
    o.assert_clean();
}

#[test]
fn create_wires_the_spec_netns_and_delete_cleans_up_after_a_dead_monitor() {
    let b1 = pod_bundle(
        "oci",
        "oci1",
        "ip -o addr show dev eth0; wget -q -O - http://10.89.0.1:8080/index.html; echo ready; exec sleep 1000",
    );
    let b2 = pod_bundle(
        "oci",
        "oci2",
        "wget -q -O - http://10.89.0.1:8080/index.html; exit 3",
    );
    let o = script(
        "oci",
        &format!(
            r#"
$S create --bundle {b1} --pid-file pid1 c1 >c1.out 2>c1.err </dev/null
echo $? >create.rc
$S start c1
wait_line c1.out ready 120
pod_net >during
# The monitor dies; the VMM goes with it (PDEATHSIG), the taps stay.
kill -9 $(cat pid1)
sleep 1
pod_net >after-kill
$S delete --force c1
echo $? >delete.rc
pod_net >after-delete
# A container that ends by itself: its monitor tears down before it
# exits (supervisors wait for that pid).
$S create --bundle {b2} --pid-file pid2 c2 >c2.out 2>&1 </dev/null
$S start c2
wait_stopped c2
for _ in $(seq 300); do kill -0 $(cat pid2) 2>/dev/null || break; sleep 0.1; done
pod_net >after-exit
$S delete c2
"#,
            b1 = b1.display(),
            b2 = b2.display()
        ),
    );
    let log = o.log();
    assert_eq!(o.code("create.rc"), 0, "{}\n{log}", o.read("c1.err"));
    let c1 = o.read("c1.out");
    assert!(c1.contains("inet 10.89.0.2/24"), "{c1}\n{log}");
    assert!(c1.contains("hello from the host"), "{c1}\n{log}");
    for f in ["during", "after-kill"] {
        let t = o.read(f);
        assert!(
            t.contains("tap0_sbx:") && t.contains("qdisc ingress") && t.contains("mirred"),
            "{f}: {t}\n{log}"
        );
    }
    assert_eq!(o.code("delete.rc"), 0, "{log}");
    assert_eq!(o.read("after-delete"), "", "{log}");
    assert!(o.read("c2.out").contains("hello from the host"), "{log}");
    assert_eq!(o.read("after-exit"), "", "{log}");
    o.assert_clean();
}

#[test]
fn net_none_is_loopback_only_and_net_tap_attaches_an_existing_tap() {
    let none = pod_bundle(
        "modes",
        "none",
        "ls /sys/class/net | grep -v sit0 | tr '\\n' ' '; echo; httpd -p 127.0.0.1:8082 -h /srv; wget -q -O - http://127.0.0.1:8082/index.html",
    );
    let tap = pod_bundle(
        "modes",
        "tap",
        "ls /sys/class/net | grep -v sit0 | tr '\\n' ' '; echo; cat /sys/class/net/eth0/address",
    );
    let o = script(
        "modes",
        &format!(
            r#"
$S run --net none {none} >none.out 2>none.err </dev/null
echo $? >none.rc
pod_net >after-none
ip -n $P tuntap add dev sbxtap9 mode tap
ip netns exec $P $S run --net tap=sbxtap9 {tap} >tap.out 2>tap.err </dev/null
echo $? >tap.rc
ip -n $P link del sbxtap9
"#,
            none = none.display(),
            tap = tap.display()
        ),
    );
    let log = o.log();
    assert_eq!(o.code("none.rc"), 0, "{}\n{log}", o.read("none.err"));
    assert_eq!(
        o.read("none.out"),
        "lo \nhello from the sandbox\n",
        "loopback only, and up"
    );
    assert_eq!(o.read("after-none"), "", "--net none touches no namespace");
    assert_eq!(o.code("tap.rc"), 0, "{}\n{log}", o.read("tap.err"));
    let lines: Vec<String> = o.read("tap.out").lines().map(str::to_string).collect();
    assert_eq!(lines.first().map(String::as_str), Some("eth0 lo "), "{log}");
    assert_eq!(lines.get(1).map(String::len), Some(17), "a MAC: {lines:?}");
    o.assert_clean();
}

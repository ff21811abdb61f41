//! Tests of the pod network wiring. The ones that need root (network
//! namespaces, taps, tc) make their own namespaces and skip with a message
//! elsewhere; `ip` and `tc` (iproute2) set up the pod's veth as a CNI
//! plugin would and check what the library made independently.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;

#[test]
fn addresses_parse_and_print() {
    let n: IpNet = "10.88.0.2/16".parse().unwrap();
    assert_eq!(n.to_string(), "10.88.0.2/16");
    assert_eq!("fd00::2/64".parse::<IpNet>().unwrap().prefix, 64);
    for bad in ["10.0.0.1", "10.0.0.1/33", "x/8", "fd00::1/129"] {
        assert!(bad.parse::<IpNet>().is_err(), "{bad}");
    }
}

#[test]
fn resolv_conf_is_read_without_loopback_servers() {
    let dns = Dns::parse(
        "# comment\nnameserver 127.0.0.53\nnameserver 10.96.0.10\nnameserver ::1\n\
         nameserver fd00::53\nsearch a.svc b.local\noptions ndots:5 edns0\n",
    );
    assert_eq!(dns.servers, ["10.96.0.10", "fd00::53"]);
    assert_eq!(dns.search, ["a.svc", "b.local"]);
    assert_eq!(dns.options, ["ndots:5", "edns0"]);
}

#[test]
fn the_specs_netns_path_is_found() {
    let spec = r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
        {"type":"pid"},{"type":"network","path":"/run/netns/cni-1"},{"type":"mount"}]}}"#;
    let parsed: oci_spec::runtime::Spec = serde_json::from_str(spec).unwrap();
    assert_eq!(spec_netns(&parsed), Some(PathBuf::from("/run/netns/cni-1")));
}

#[test]
fn the_guest_config_has_on_link_routes_first() {
    let d = Discovery {
        interfaces: vec![Interface {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1450,
            addresses: vec!["10.1.0.5/32".parse().unwrap()],
        }],
        routes: vec![
            Route {
                dest: None,
                ipv6: false,
                gateway: Some("169.254.1.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                metric: 0,
            },
            Route {
                dest: Some("169.254.1.1/32".parse().unwrap()),
                ipv6: false,
                gateway: None,
                device: "eth0".into(),
                source: None,
                metric: 0,
            },
        ],
    };
    let c = guest_config(
        &d,
        &Dns {
            servers: vec!["10.96.0.10".into()],
            ..Default::default()
        },
    );
    assert_eq!(c.interfaces[0].mac, "02:00:00:00:00:01");
    assert_eq!(c.interfaces[0].addresses, ["10.1.0.5/32"]);
    assert_eq!(c.routes[0].dest, "169.254.1.1/32");
    assert_eq!(c.routes[1].dest, "default");
    assert_eq!(c.routes[1].gateway, "169.254.1.1");
    assert_eq!(c.dns_servers, ["10.96.0.10"]);
}

// ---- As root: real namespaces, veths, taps and tc. ----

fn can_run() -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Path::new("/dev/net/tun").exists()
        && Command::new("ip").arg("-V").output().is_ok()
        && Command::new("tc").arg("-V").output().is_ok()
        && Path::new("/bin/busybox").exists();
    if !ok {
        eprintln!("skipped: needs root, /dev/net/tun, ip, tc and busybox");
    }
    ok
}

/// Runs a command; its stdout, or a panic with its stderr.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod namespace with a veth `pod_if` to a "host" namespace, addresses
/// and routes as the CNI bridge plugin leaves them; removed when dropped.
struct PodNs {
    pod: String,
    host: String,
    state: PathBuf,
}

impl PodNs {
    fn new(pod_if: &str, mtu: u32) -> PodNs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let p = PodNs {
            pod: format!("sbxt-pod-{tag}"),
            host: format!("sbxt-host-{tag}"),
            state: std::env::temp_dir().join(format!("sandboxvm-net-test-{tag}")),
        };
        netns::create(&netns::named(&p.pod)).unwrap();
        netns::create(&netns::named(&p.host)).unwrap();
        let _ = std::fs::remove_dir_all(&p.state);
        std::fs::create_dir_all(&p.state).unwrap();
        let mtu = mtu.to_string();
        let (pod, host) = (p.pod.as_str(), p.host.as_str());
        sh(&[
            "ip", "link", "add", pod_if, "mtu", &mtu, "netns", pod, "type", "veth", "peer", "name",
            "vhost", "mtu", &mtu, "netns", host,
        ]);
        for cmd in [
            vec![
                "ip",
                "-n",
                host,
                "addr",
                "add",
                "10.99.0.1/24",
                "dev",
                "vhost",
            ],
            vec!["ip", "-n", host, "link", "set", "vhost", "up"],
            vec![
                "ip",
                "-n",
                pod,
                "addr",
                "add",
                "10.99.0.2/24",
                "dev",
                pod_if,
            ],
            vec![
                "ip",
                "-n",
                pod,
                "-6",
                "addr",
                "add",
                "fd99::2/64",
                "dev",
                pod_if,
                "nodad",
            ],
            vec!["ip", "-n", pod, "link", "set", pod_if, "up"],
            vec![
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                "10.99.0.1",
            ],
            vec![
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "10.100.0.0/16",
                "via",
                "10.99.0.1",
                "metric",
                "7",
            ],
        ] {
            sh(&cmd);
        }
        p
    }

    fn path(&self) -> PathBuf {
        netns::named(&self.pod)
    }

    fn in_pod(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.pod];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn mac(&self, dev: &str) -> String {
        let out = self.in_pod(&["ip", "-o", "link", "show", "dev", dev]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "link/ether").unwrap();
        words.next().unwrap().to_string()
    }

    /// Link names, qdiscs and filters of the pod namespace, as ip and tc
    /// say.
    fn tc_state(&self, dev: &str) -> String {
        let links: Vec<String> = self
            .in_pod(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        format!(
            "{}\n{}{}",
            links.join(" "),
            self.in_pod(&["tc", "qdisc", "show", "dev", dev]),
            self.in_pod(&["tc", "filter", "show", "dev", dev, "ingress"]),
        )
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        let _ = netns::remove(&netns::named(&self.pod));
        let _ = netns::remove(&netns::named(&self.host));
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[test]
fn a_fresh_namespace_has_nothing_to_mirror_and_goes_away() {
    if !can_run() {
        return;
    }
    let path = netns::named(&format!("sbxt-fresh-{}", std::process::id()));
    netns::create(&path).unwrap();
    assert!(netns::create(&path).is_err(), "the name is taken");
    assert_eq!(discover(&path).unwrap(), Discovery::default());
    let pod = PodNetwork::setup(&path, &std::env::temp_dir()).unwrap();
    assert!(pod.devices().is_empty());
    pod.teardown().unwrap();
    netns::remove(&path).unwrap();
    assert!(!path.exists());
    assert!(matches!(
        discover(&path),
        Err(Error::Netns { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
    ));
}

#[test]
fn discovery_finds_the_veth_its_addresses_and_routes() {
    if !can_run() {
        return;
    }
    let ns = PodNs::new("eth0", 1400);
    let d = discover(&ns.path()).unwrap();
    assert_eq!(d.interfaces.len(), 1, "{d:?}");
    let i = &d.interfaces[0];
    assert_eq!(i.name, "eth0");
    assert_eq!(i.mtu, 1400);
    assert_eq!(format_mac(&i.mac), ns.mac("eth0"));
    let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(
        addrs,
        ["10.99.0.2/24", "fd99::2/64"],
        "no link-local: {d:?}"
    );
    let default = Route {
        dest: None,
        ipv6: false,
        gateway: Some("10.99.0.1".parse().unwrap()),
        device: "eth0".into(),
        source: None,
        metric: 0,
    };
    let other = Route {
        dest: Some("10.100.0.0/16".parse().unwrap()),
        metric: 7,
        ..default.clone()
    };
    assert_eq!(d.routes, [default, other], "kernel routes are left out");
}

#[test]
fn setup_mirrors_veth_and_tap_both_ways_and_teardown_removes_it_all() {
    if !can_run() {
        return;
    }
    let ns = PodNs::new("eth0", 1400);
    let before = ns.tc_state("eth0");
    let pod = PodNetwork::setup(&ns.path(), &ns.state).unwrap();
    assert!(ns.state.join(RECORD_FILE).exists());
    assert_eq!(pod.taps(), ["tap0_sbx"]);
    let mac = ns.mac("eth0");
    assert_eq!(
        pod.devices()[0].to_string(),
        format!("tap=tap0_sbx,mac={mac},mtu=1400")
    );
    assert_ne!(ns.mac("tap0_sbx"), mac, "the tap keeps its own MAC");
    let tap = ns.in_pod(&["ip", "-d", "-o", "link", "show", "dev", "tap0_sbx"]);
    assert!(
        tap.contains("mtu 1400") && tap.contains("tun type tap"),
        "{tap}"
    );
    assert!(tap.contains("persist"), "{tap}");
    assert!(tap.contains("vnet_hdr"), "{tap}");
    for (from, to) in [("eth0", "tap0_sbx"), ("tap0_sbx", "eth0")] {
        let q = ns.in_pod(&["tc", "qdisc", "show", "dev", from, "ingress"]);
        assert!(q.contains("qdisc ingress ffff:"), "{from}: {q}");
        let f = ns.in_pod(&["tc", "filter", "show", "dev", from, "ingress"]);
        assert!(
            f.contains(&format!("pref {FILTER_PRIO} u32"))
                && f.contains(&format!("mirred (Egress Redirect to device {to})")),
            "{from}: {f}"
        );
    }
    let c = pod.guest_config();
    assert_eq!(c.interfaces[0].mac, mac);
    assert_eq!(c.interfaces[0].mtu, 1400);

    // Both ways, with our own file on the tap standing in for the VMM.
    mirrored_ping(&ns, &mac);

    pod.teardown().unwrap();
    assert_eq!(ns.tc_state("eth0"), before, "all gone, the veth as it was");
    assert!(!ns.state.join(RECORD_FILE).exists());
}

/// Pings the pod address from the host namespace and answers as the
/// guest would through the tap: the ARP request comes out of the tap,
/// our ARP reply goes in, then the ICMP echo request comes out.
fn mirrored_ping(ns: &PodNs, pod_mac: &str) {
    let file = nl::in_netns(&ns.path(), |_| tap::open("tap0_sbx")).unwrap();
    let mut ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.host,
            "busybox",
            "ping",
            "-c",
            "30",
            "-i",
            "0.2",
            "10.99.0.2",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mac: Vec<u8> = pod_mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    const HDR: usize = 10; // struct virtio_net_hdr, the tap's default
    let pod_ip = [10, 99, 0, 2];
    let mut tap = &file;
    let mut next = |want: &dyn Fn(&[u8]) -> bool| -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let mut fds = [nix::poll::PollFd::new(
                file.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut fds, 200u16).unwrap() == 0 {
                continue;
            }
            let n = tap.read(&mut buf).unwrap();
            let frame = &buf[HDR..n];
            if want(frame) {
                return frame.to_vec();
            }
        }
        panic!("no such frame came out of the tap");
    };
    let arp = next(&|f: &[u8]| {
        f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == pod_ip
    });
    let mut reply = vec![0u8; HDR];
    reply.extend_from_slice(&arp[6..12]); // to the asker
    reply.extend_from_slice(&mac);
    reply.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&mac);
    reply.extend_from_slice(&pod_ip);
    reply.extend_from_slice(&arp[22..32]); // the asker's MAC and IP
    (&file).write_all(&reply).unwrap();
    let icmp =
        next(&|f: &[u8]| f.len() >= 34 && f[12..14] == [8, 0] && f[23] == 1 && f[30..34] == pod_ip);
    assert_eq!(&icmp[0..6], &mac[..], "sent to the pod's MAC");
    let _ = ping.kill();
    let _ = ping.wait();
}

#[test]
fn a_dead_runtimes_record_is_enough_to_clean_up() {
    if !can_run() {
        return;
    }
    let ns = PodNs::new("net1", 1500);
    let before = ns.tc_state("net1");
    let pod = PodNetwork::setup(&ns.path(), &ns.state).unwrap();
    std::mem::forget(pod); // as if the runtime were SIGKILLed
    assert_ne!(ns.tc_state("net1"), before);
    assert!(teardown_recorded(&ns.state).unwrap());
    assert_eq!(ns.tc_state("net1"), before);
    assert!(!teardown_recorded(&ns.state).unwrap(), "record removed");
}

#[test]
fn a_qdisc_and_filter_that_were_there_stay() {
    if !can_run() {
        return;
    }
    let ns = PodNs::new("eth0", 1500);
    ns.in_pod(&["tc", "qdisc", "add", "dev", "eth0", "ingress"]);
    ns.in_pod(&[
        "tc",
        "filter",
        "add",
        "dev",
        "eth0",
        "ingress",
        "pref",
        "7",
        "protocol",
        "ip",
        "u32",
        "match",
        "ip",
        "dst",
        "10.99.0.200/32",
        "flowid",
        "1:1",
    ]);
    let before = ns.tc_state("eth0");
    let pod = PodNetwork::setup(&ns.path(), &ns.state).unwrap();
    let during = ns.in_pod(&["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(during.contains("pref 7 u32") && during.contains(&format!("pref {FILTER_PRIO} u32")));
    drop(pod);
    assert_eq!(ns.tc_state("eth0"), before);
}

#[test]
fn a_failed_setup_leaves_nothing() {
    if !can_run() {
        return;
    }
    let ns = PodNs::new("sbxfail0", 1500);
    let before = ns.tc_state("sbxfail0");
    let e = PodNetwork::setup(&ns.path(), &ns.state).unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert_eq!(ns.tc_state("sbxfail0"), before);
    assert!(!ns.state.join(RECORD_FILE).exists());
}

#[test]
fn teardown_after_the_namespace_went_is_fine() {
    if !can_run() {
        return;
    }
    let ns = PodNs::new("eth0", 1500);
    let pod = PodNetwork::setup(&ns.path(), &ns.state).unwrap();
    netns::remove(&ns.path()).unwrap();
    pod.teardown().unwrap();
}

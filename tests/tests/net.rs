//! End to end: `sandboxvm boot --net` of the real guest kernel with a
//! virtio-net device on a tap in the KVM host (the nested CI host where
//! this host cannot boot guests). The host side gives the tap addresses and
//! serves a file over HTTP and a TCP sink; the guest (its own initramfs,
//! busybox) reports eth0's MAC, MTU and negotiated features, pings the host
//! over IPv4 and IPv6, downloads the file and uploads one, and prints
//! checksums that the test compares with the host's.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{guest_kernel, on_kvm_host, sandboxvm_bin, BUSYBOX};

const MAC: &str = "52:54:00:12:34:56";
const MTU: u16 = 1400;
/// Size of each transfer, in 64 KiB blocks (8 MiB: several hundred TSO
/// frames each way, quick even under TCG).
const BLOCKS: u32 = 128;

/// The guest's /init.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "net-guest: $*"; }
say "address $(cat /sys/class/net/eth0/address)"
say "mtu $(cat /sys/class/net/eth0/mtu)"
say "features $(cat /sys/class/net/eth0/device/features)"
ip link set lo up
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
ip -6 addr add fd77::2/64 dev eth0
ping -c 2 -W 10 10.77.0.1 >/dev/null && say "ping ok"
ping6 -c 2 -W 10 fd77::1 >/dev/null && say "ping6 ok"
say "download $(timeout 120 wget -q -O - http://10.77.0.1:8077/blob | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/up bs=64k count=@BLOCKS@ 2>/dev/null
say "upload $(md5sum /tmp/up | cut -d' ' -f1)"
timeout 120 nc 10.77.0.1 8078 </tmp/up && say "upload sent"
say "counters $(grep eth0: /proc/net/dev | tr -s ' ' | cut -d: -f2)"
say "tcp $(grep ^Tcp: /proc/net/snmp | tail -n1)"
say "done"
reboot -f
"#;

/// The KVM host's side: tun module, tap, addresses, servers, the VM.
/// Arguments: work dir, kernel, initramfs, sandboxvm binary.
const HOST_SCRIPT: &str = r#"set -u
dir=$1 kernel=$2 initrd=$3 sandboxvm=$4
tap=sbxe2e0
if ! ip tuntap add dev $tap mode tap 2>/dev/null; then
  # The nested CI host loads no tun module: take it from its kernel package.
  deb=$(ls "${SANDBOXVM_CACHE:-$HOME/.cache/sandboxvm}"/nested/linux-image-"$(uname -r)"_*/kernel.deb | head -n1)
  dpkg --fsys-tarfile "$deb" | tar -xO "./lib/modules/$(uname -r)/kernel/drivers/net/tun.ko" >"$dir/tun.ko"
  insmod "$dir/tun.ko"
  ip tuntap add dev $tap mode tap || exit 1
fi
pids=
trap 'kill $pids 2>/dev/null; ip link del $tap 2>/dev/null' EXIT
ip link set $tap mtu @MTU@
ip addr add 10.77.0.1/24 dev $tap
ip -6 addr add fd77::1/64 dev $tap nodad
ip link set $tap up
mkdir -p "$dir/www"
dd if=/dev/urandom of="$dir/www/blob" bs=64k count=@BLOCKS@ 2>/dev/null
echo "net-host: blob $(md5sum <"$dir/www/blob" | cut -d' ' -f1)"
busybox httpd -f -p 10.77.0.1:8077 -h "$dir/www" & pids="$pids $!"
# The sink's stdin: a fifo that stays open (nc ends at stdin's EOF).
mkfifo "$dir/hold"
exec 3<>"$dir/hold"
busybox nc -l -p 8078 >"$dir/up" <"$dir/hold" & nc=$!; pids="$pids $nc"
start=$(date +%s%N)
timeout 400 "$sandboxvm" boot --kernel "$kernel" --initrd "$initrd" --cmdline quiet \
  --net "tap=$tap,mac=@MAC@,mtu=@MTU@" 2>&1 | tee "$dir/boot.log"
echo "net-host: sandboxvm exited ${PIPESTATUS[0]} after $(( ($(date +%s%N) - start) / 1000000 )) ms"
for _ in $(seq 100); do kill -0 $nc 2>/dev/null || break; sleep 0.1; done
echo "net-host: up $(md5sum <"$dir/up" | cut -d' ' -f1) $(stat -c %s "$dir/up") bytes"
echo "net-host: tap $(ip -s -o link show $tap | tr -s ' ')"
"#;

fn fill(template: &str) -> String {
    template
        .replace("@BLOCKS@", &BLOCKS.to_string())
        .replace("@MTU@", &MTU.to_string())
        .replace("@MAC@", MAC)
}

/// A fresh work directory (the host's filesystem is the nested host's).
fn work_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandboxvm-e2e-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_initramfs(out: &Path) {
    let mut cpio = initramfs::Writer::new(Vec::new());
    (|| -> initramfs::Result<()> {
        for dir in ["bin", "dev", "proc", "sys", "tmp"] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.char_device("dev/null", 0o666, 1, 3)?;
        cpio.host_file("bin/busybox", Path::new(BUSYBOX))?;
        cpio.file("init", 0o755, fill(GUEST_INIT).as_bytes())?;
        Ok(())
    })()
    .expect("initramfs (is Debian's busybox-static installed?)");
    std::fs::write(out, cpio.finish().unwrap()).unwrap();
}

/// The value after `prefix` on the line that starts with it.
fn field<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"))
        .trim()
}

/// Whether feature bit `bit` is set in a virtio sysfs `features` string
/// (one character per bit, bit 0 first).
fn has_feature(bits: &str, bit: usize) -> bool {
    bits.as_bytes().get(bit) == Some(&b'1')
}

#[test]
fn the_guest_gets_eth0_with_our_mac_and_mtu_and_traffic_flows_both_ways() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = work_dir();
    let initrd = dir.join("net-guest.cpio");
    write_initramfs(&initrd);
    let script = dir.join("host.sh");
    std::fs::write(&script, fill(HOST_SCRIPT)).unwrap();
    let bin = sandboxvm_bin();
    let args = [
        "bash",
        script.to_str().unwrap(),
        dir.to_str().unwrap(),
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        bin.to_str().unwrap(),
    ];
    let output = on_kvm_host(&args).output().expect("run the host script");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("{out}");
    assert!(output.status.success(), "host script failed:\n{out}");
    assert!(
        field(&out, "net-host: sandboxvm exited ").starts_with("0 "),
        "{out}"
    );
    assert_eq!(field(&out, "net-guest: address "), MAC);
    assert_eq!(field(&out, "net-guest: mtu "), MTU.to_string());
    let features = field(&out, "net-guest: features ");
    // VERSION_1, CSUM, GUEST_CSUM, MTU, MAC, GUEST_TSO4/6, HOST_TSO4/6,
    // MRG_RXBUF, STATUS, INDIRECT_DESC, EVENT_IDX: all taken by Linux.
    for bit in [32, 0, 1, 3, 5, 7, 8, 11, 12, 15, 16, 28, 29] {
        assert!(
            has_feature(features, bit),
            "bit {bit} not negotiated: {features}"
        );
    }
    assert!(out.contains("net-guest: ping ok"), "{out}");
    assert!(out.contains("net-guest: ping6 ok"), "{out}");
    assert_eq!(
        field(&out, "net-guest: download "),
        field(&out, "net-host: blob "),
        "download corrupted"
    );
    let bytes = 64 * 1024 * BLOCKS;
    assert!(out.contains("net-guest: upload sent"), "{out}");
    // The guest's eth0 saw no malformed or dropped frames: rx errs, drop,
    // fifo, frame and tx errs, drop are fields 3-6, 11-12 of /proc/net/dev.
    let counters: Vec<u64> = field(&out, "net-guest: counters ")
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    for i in [2, 3, 4, 5, 10, 11] {
        assert_eq!(counters[i], 0, "eth0 counter {} not 0: {counters:?}", i + 1);
    }
    // No TCP segment arrived with a bad checksum (offloads done right):
    // InErrs and InCsumErrors of /proc/net/snmp's Tcp line.
    let tcp: Vec<&str> = field(&out, "net-guest: tcp Tcp: ")
        .split_whitespace()
        .collect();
    assert_eq!((tcp[12], tcp[14]), ("0", "0"), "TCP errors: {tcp:?}");
    assert_eq!(
        field(&out, "net-host: up "),
        format!("{} {bytes} bytes", field(&out, "net-guest: upload ")),
        "upload corrupted"
    );
}

#[test]
fn bad_net_options_are_one_line_errors() {
    let run = |net: &str| {
        let out = Command::new(sandboxvm_bin())
            .args(["boot", "--kernel", "/nonexistent/vmlinux", "--pvm-guest"])
            .args(["--net", net])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(if net.contains("mtu=10") { 1 } else { 2 })
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("mac=52:54:00:00:00:01");
    assert!(err.contains("tap=NAME is required"), "{err}");
    let err = run("tap=x,mac=52:54:00");
    assert!(err.contains("bad MAC \"52:54:00\""), "{err}");
    // Checked by the device before any tap is touched.
    let err = run("tap=sbxnope0,mtu=10");
    assert_eq!(
        err,
        "sandboxvm: cannot start the VM: virtio-net: MTU 10 is too small (at least 68)\n"
    );
}

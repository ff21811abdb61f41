//! End to end: a guest that its workload owns attacks the VMM's devices.
//!
//! The guest runs the test-only `devmem` kernel variant (`/dev/mem` over all
//! physical memory, MMIO included) and a privileged container plays its
//! kernel with `guest-attack` (tests/src/bin/guest-attack.rs): it floods the
//! virtio-mmio registers and the UART, takes devices from their guest
//! drivers and writes their rings itself. The host side watches the VMM
//! while it happens (its own memory, RssAnon: guest RAM is a shared memfd
//! and not counted; the size of its log and of the console log) and checks
//! that it stayed up or ended with one clear line, that another sandbox did
//! not notice, and that nothing is left behind.

use std::path::{Path, PathBuf};

use e2e::fixtures::{artefacts, bundle, work_dir};
use e2e::run::{as_owned_guest, assert_clean, run_during, Ran};
use e2e::{devmem_kernel, guest_attack_bin, on_kvm_host, sandboxvm_bin, write_busybox_initramfs};

/// Largest VMM RssAnon (KiB), vmm.log and console log (bytes) seen.
#[derive(Debug)]
struct Watched {
    anon_kib: u64,
    vmm_log: u64,
    console_log: u64,
}

/// Shell code that samples a VMM every 0.2 s while the process `$pid` (the
/// run, or the VMM itself) lives, keeping in `watched` the largest RssAnon of
/// the process `vmm_pid` prints and the largest sizes of the `vmm.log` and
/// `console*` files under `state/`.
const WATCH: &str = r#"
anon=0 vlog=0 clog=0
while kill -0 $pid 2>/dev/null; do
  vmm=$(vmm_pid)
  if [ -n "$vmm" ]; then
    a=$(awk '/^RssAnon:/ {print $2}' /proc/$vmm/status 2>/dev/null || true)
    [ "${a:-0}" -gt $anon ] && anon=$a
  fi
  v=$(find state -name vmm.log -printf '%s\n' 2>/dev/null | sort -n | tail -n1)
  [ "${v:-0}" -gt $vlog ] && vlog=$v
  c=$(find state -name 'console*' -printf '%s\n' 2>/dev/null | awk '{n += $1} END {print n + 0}')
  [ "${c:-0}" -gt $clog ] && clog=$c
  sleep 0.2
done
echo "$anon $vlog $clog" >watched
"#;

/// [`WATCH`] for `run_during`: the run's VMM is the one whose console log
/// is under its `state/`.
fn watch_run() -> String {
    format!("vmm_pid() {{ pgrep -f \"boot .*--console-log $PWD/state/\" | head -n1; }}\n{WATCH}")
}

/// The figures a watch loop wrote to `file`: "RssAnon vmm.log console".
fn watched(file: &Path) -> Watched {
    let text = std::fs::read_to_string(file).unwrap();
    let n: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    Watched {
        anon_kib: n[0],
        vmm_log: n[1],
        console_log: n[2],
    }
}

/// A privileged bundle whose rootfs holds guest-attack, running `script`.
fn attack_bundle(name: &str, script: &str) -> PathBuf {
    let attack = guest_attack_bin().expect("guest-attack");
    let b = bundle(name, &["sh", "-c", script], as_owned_guest);
    std::fs::copy(attack, b.join("rootfs/bin/guest-attack")).unwrap();
    b
}

fn kernel_arg() -> String {
    format!(
        "--kernel {}",
        devmem_kernel().expect("devmem kernel").display()
    )
}

/// The VMM's own memory and the logs a guest can write stay small.
fn assert_bounded(w: &Watched, r: &Ran) {
    eprintln!(
        "VMM RssAnon at most {} KiB, vmm.log at most {} bytes, console log at most {} bytes",
        w.anon_kib, w.vmm_log, w.console_log
    );
    assert!(w.anon_kib > 0, "the VMM was never seen: {r:?}");
    assert!(w.anon_kib < 64 * 1024, "VMM memory: {w:?} {r:?}");
    assert!(w.vmm_log < 64 * 1024, "vmm.log: {w:?} {r:?}");
    assert!(w.console_log <= 4 << 20, "console log: {w:?} {r:?}");
}

/// MMIO reads and bad register writes on every device, a UART flood, then
/// bad chains on the net device's queues (descriptor loops, zero-length,
/// outside guest memory, oversized, indirect tables pointing at
/// themselves, device-writable buffers to transmit, heads and indices out
/// of range, a queue outside memory, re-activation without a reset): the
/// VMM stays up, its memory and logs bounded, the agent keeps answering,
/// and after a reset the device sends a good frame and its driver takes it
/// back.
#[test]
fn an_owned_guest_floods_registers_and_feeds_the_net_device_garbage() {
    let b = attack_bundle(
        "attack-devices",
        "guest-attack mmio-flood 8 && guest-attack console-flood 4 && guest-attack net",
    );
    let tap = "sbxatk0";
    let r = run_during(
        &b,
        &format!("{} --net tap={tap}", kernel_arg()),
        "",
        Some(&format!(
            "(ip tuntap add dev {tap} mode tap && ip link set {tap} up && {{}}; \
             s=$?; ip link del {tap}; exit $s)"
        )),
        &watch_run(),
    );
    let w = watched(&b.with_extension("out").join("watched"));
    eprintln!("guest-attack said:\n{}", r.stdout);
    assert_eq!(r.code, 0, "{r:?}");
    let said = |prefix: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' line: {r:?}"))
            .to_string()
    };
    let flood = said("mmio-flood: ");
    let reads: u64 = flood.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(reads > 1000, "{flood}");
    // The live devices (the agent's vsock among them) were not knocked over.
    for line in r.stdout.lines().filter(|l| l.contains(" status 0x")) {
        if line.starts_with("mmio-flood: device") {
            assert!(line.ends_with("status 0xf"), "{line}");
        }
    }
    assert!(said("console-flood: ").contains("bytes written"));
    for attack in [
        "descriptor-loop",
        "zero-length",
        "outside-memory",
        "oversized",
        "indirect-self",
        "write-only-tx",
        "head-out-of-range",
        "index-far-ahead",
        "reactivate",
    ] {
        said(&format!("net {attack}: status"));
    }
    assert!(
        said("net queue-outside-memory: ").ends_with("needs-reset true"),
        "{r:?}"
    );
    assert!(said("net good-frame: ").ends_with("used 1"), "{r:?}");
    assert_eq!(
        said("net: driver bound again"),
        "net: driver bound again, eth0 back true"
    );
    assert_bounded(&w, &r);
    assert_clean(&r);
}

/// The guest takes the vsock device from its driver, cutting off its own
/// agent: the run ends at once with one line, the VMM bounded meanwhile,
/// another sandbox beside it runs undisturbed, and nothing is left behind.
#[test]
fn an_owned_guest_that_cuts_off_its_agent_ends_its_run_with_one_line() {
    let b = attack_bundle("cut-off", "guest-attack vsock-no-rx 10");
    let other = bundle(
        "bystander",
        &["sh", "-c", "sleep 6; echo still-fine"],
        |_| {},
    );
    let a = artefacts();
    let during = format!(
        "{} run --root $PWD/other-state --kernel {} --initrd {} {} >other.out 2>other.err &\n\
         other=$!\n{}\nwait $other; echo $? >other.code\n",
        sandboxvm_bin().display(),
        a.kernel.display(),
        a.initrd.display(),
        other.display(),
        watch_run()
    );
    let r = run_during(&b, &kernel_arg(), "", None, &during);
    let w = watched(&b.with_extension("out").join("watched"));
    let out = b.with_extension("out");
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r:?}");
    assert!(
        r.stderr.starts_with("sandboxvm: lost the guest agent"),
        "{r:?}"
    );
    assert_bounded(&w, &r);
    assert_eq!(read("other.code").trim(), "0", "{}", read("other.err"));
    assert_eq!(read("other.out"), "still-fine\n");
    assert_clean(&r);
}

/// The guest kernel drives the vsock device itself, with nobody to end the
/// VM early (`sandboxvm boot`, its init is the attacker): no receive buffers
/// posted, connection requests to host ports nobody listens on (each
/// answered by a reset the device cannot deliver) and malformed packets,
/// for 10 s. The VMM's memory and log stay bounded and it ends normally when
/// the guest reboots.
#[test]
fn a_guest_that_posts_no_vsock_receive_buffers_cannot_grow_the_vmm() {
    let dir = work_dir().join("vsock-no-rx");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("attack.cpio");
    let attack = guest_attack_bin().expect("guest-attack");
    write_busybox_initramfs(
        &initrd,
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         /bin/guest-attack vsock-no-rx 10\n\
         echo ATTACK-DONE\n\
         /bin/busybox reboot -f\n",
        &[("bin/guest-attack", &attack)],
    )
    .unwrap();
    let script = format!(
        r#"cd {dir}
mkdir state
{bin} boot --kernel {kernel} --initrd attack.cpio --vsock $PWD/v.sock >state/console 2>state/vmm.log &
pid=$!
vmm_pid() {{ echo $pid; }}
{WATCH}
wait $pid
echo $? >code
"#,
        dir = dir.display(),
        bin = sandboxvm_bin().display(),
        kernel = devmem_kernel().expect("devmem kernel").display(),
    );
    std::fs::write(dir.join("script.sh"), script).unwrap();
    let out = on_kvm_host(&["bash", dir.join("script.sh").to_str().unwrap()])
        .output()
        .unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.join("state").join(f)).unwrap_or_default();
    let console = read("console");
    eprintln!("console:\n{console}\nvmm.log:\n{}", read("vmm.log"));
    let code = std::fs::read_to_string(dir.join("code")).unwrap_or_default();
    assert_eq!(code.trim(), "0", "{out:?}");
    let said = console
        .lines()
        .find(|l| l.starts_with("vsock: ") && l.contains("packets sent"))
        .unwrap_or_else(|| panic!("no result line: {console}"));
    let sent: u64 = said.split_whitespace().nth(1).unwrap().parse().unwrap();
    // More requests than the muxer keeps resets for (256), and it says it
    // dropped the rest.
    assert!(sent > 300, "{said}");
    assert!(said.contains("rx used 0"), "{said}");
    assert!(
        read("vmm.log").contains("resets wait for rx buffers; dropping more"),
        "the cap on queued resets was not reached"
    );
    assert!(console.contains("ATTACK-DONE"), "{console}");
    let w = watched(&dir.join("watched"));
    eprintln!("{said}: {w:?}");
    assert!(w.anon_kib > 0 && w.anon_kib < 64 * 1024, "{w:?}");
    assert!(w.vmm_log < 64 * 1024, "{w:?}");
}

//! End to end: guests give the memory they free back to the host (free
//! page reporting through virtio-balloon). The container fills 48 MiB of
//! its `/dev/shm` (a tmpfs of the guest's) and removes it again; the host
//! watches the VMM's resident memory, which holds the guest's RAM: the
//! pages of its memfd for a cold boot, its private copies of the
//! template's pages for a restored VM (what `run` makes by default).

use e2e::fixtures::{bundle, work_dir};
use e2e::run::{assert_clean, run_during};

/// The container: fill, wait for the host's word, free, wait again.
const FILL_AND_FREE: &str = "dd if=/dev/zero of=/dev/shm/fill bs=1M count=48 2>/dev/null; \
     echo >/filled; while [ ! -e /free ]; do sleep 0.1; done; \
     rm /dev/shm/fill; echo >/freed; while [ ! -e /go ]; do sleep 0.1; done; echo done";

/// The host side, run while the sandbox runs: the VMM's resident KiB once
/// filled (`filled.kib`) and the least seen in the `$WAIT` seconds
/// after the container freed it, or once it dropped by 32 MiB
/// (`freed.kib`). (Each process costs tens of ms in the nested CI host:
/// the loops poll once a second.)
const WATCH: &str = r#"
R=$ROOTFS
wait_for() { for _ in $(seq 600); do [ -e "$1" ] && return 0; sleep 0.2; done; echo "no $1" >&2; return 1; }
wait_for $R/filled
vmm=$(cat state/*/vmm.pid | head -1)
kib() { awk '/^VmRSS:/ { print $2 }' /proc/$vmm/status; }
filled=$(kib)
echo $filled >filled.kib
touch $R/free
wait_for $R/freed
least=$(kib)
for _ in $(seq $WAIT); do
  [ $least -le $(( filled - 32 * 1024 )) ] && break
  sleep 1
  now=$(kib); [ $now -lt $least ] && least=$now
done
echo $least >freed.kib
touch $R/go
"#;

/// Runs the fill-and-free container with the configuration `config`,
/// watching for up to `wait` seconds; returns MiB allocated when filled and
/// after freeing.
fn fill_and_free(name: &str, config: &str, wait: u32) -> (u64, u64) {
    let b = bundle(name, &["sh", "-c", FILL_AND_FREE], |_| {});
    let conf = work_dir().join(format!("{name}.toml"));
    std::fs::write(&conf, config).unwrap();
    let wrap = format!("env SANDBOXVM_CONFIG={} {{}}", conf.display());
    let during = format!("ROOTFS={} WAIT={wait}\n{WATCH}", b.join("rootfs").display());
    let r = run_during(&b, "", "", Some(&wrap), &during);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.trim(), "done", "{r:?}");
    assert_clean(&r);
    let out = b.with_extension("out");
    let mib = |f: &str| -> u64 {
        let text = std::fs::read_to_string(out.join(f)).unwrap_or_default();
        text.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{f}: {text:?} {r:?}"))
            / 1024
    };
    (mib("filled.kib"), mib("freed.kib"))
}

#[test]
fn memory_a_guest_frees_goes_back_to_the_host_unless_reporting_is_off() {
    let (filled, freed) = fill_and_free("fpr-on", "", 60);
    assert!(filled >= 48, "the fill is in guest RAM: {filled} MiB");
    // Most of the 48 MiB: Linux reports free blocks of 2 MiB and more
    // (40 of the 48 MiB in the nested CI host).
    assert!(
        freed + 32 <= filled,
        "freed memory went back: {filled} MiB filled, {freed} MiB after"
    );
    // The same with free page reporting off: the memory stays with the VM.
    let (filled, freed) = fill_and_free("fpr-off", "[vmm]\nfree_page_reporting = false\n", 15);
    assert!(filled >= 48, "{filled} MiB");
    assert!(
        freed + 8 > filled,
        "without reporting the memory stays: {filled} MiB filled, {freed} MiB after"
    );
}

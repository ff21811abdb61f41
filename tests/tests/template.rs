//! End to end: sandboxes restored from templates. `sandboxvm run` restores
//! its VM from the template of its kind of VM (built on first use, kept
//! under the cache directory) instead of booting the guest kernel; each
//! test has a cache directory of its own (`SANDBOXVM_CACHE`), so its first
//! run builds.

use e2e::fixtures::{bundle, engine_script, EngineRun};

/// What each run's container prints: a line, the guest's boot id, 32 bytes
/// of its random pool, and exits 3.
const PROBE: &str = "echo out; cat /proc/sys/kernel/random/boot_id; \
                     head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; exit 3";

/// Runs `body` with `$B` a probe bundle, `$CACHE` the test's own cache and
/// `run NAME [ARGS]`: `sandboxvm -v run ARGS $B` with its stdout, stderr and
/// status in NAME.out, NAME.err, NAME.code.
fn script(name: &str, body: &str) -> EngineRun {
    let b = bundle(&format!("{name}-probe"), &["sh", "-c", PROBE], |_| {});
    engine_script(
        name,
        &format!(
            r#"export SANDBOXVM_CACHE=$PWD/cache
CACHE=$SANDBOXVM_CACHE
B={b}
run() {{ local n=$1; shift; $BIN -v run --root $PWD/state "$@" $B $n >$n.out 2>$n.err; echo $? >$n.code; }}
{body}
$BIN template list >list
ls -A $CACHE/templates >files 2>&1
"#,
            b = b.display()
        ),
    )
}

/// Asserts that run `n` printed the probe's output and exited 3, and
/// returns its boot id and random bytes.
fn probe(r: &EngineRun, n: &str) -> (String, String) {
    assert_eq!(r.code(&format!("{n}.code")), 3, "{n}: {}", r.log);
    let out = r.read(&format!("{n}.out"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{n}: {out:?}\n{}", r.log);
    assert_eq!(lines[0], "out");
    assert_eq!(lines[1].len(), 36, "a boot id: {out:?}");
    assert_eq!(lines[2].len(), 64, "32 random bytes: {out:?}");
    (lines[1].to_string(), lines[2].to_string())
}

/// The templates `template list` showed (its lines but the header).
fn templates(r: &EngineRun) -> Vec<String> {
    r.read("list").lines().skip(1).map(str::to_string).collect()
}

#[test]
fn a_restored_sandbox_runs_as_a_cold_one_and_no_two_share_a_random_pool_or_boot_id() {
    let r = script(
        "tpl-restore",
        "umask 0\nrun cold --no-template\nrun first\nrun second\nrun third\n\
         stat -c '%a %n' $CACHE/templates $CACHE/templates/* $CACHE/templates/*/* >perms",
    );
    let all: Vec<(String, String)> = ["cold", "first", "second", "third"]
        .iter()
        .map(|n| probe(&r, n))
        .collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a.0, b.0, "two sandboxes with one boot id\n{}", r.log);
            assert_ne!(a.1, b.1, "two sandboxes drew the same random bytes");
        }
    }
    let err = |n: &str| r.read(&format!("{n}.err"));
    assert!(!err("cold").contains("template"), "{}", err("cold"));
    assert!(err("first").contains(" built in "), "{}", err("first"));
    for n in ["first", "second", "third"] {
        assert!(
            err(n).contains("restoring the VM from template"),
            "{n}: {}",
            err(n)
        );
    }
    for n in ["second", "third"] {
        assert!(!err(n).contains(" built in "), "built again: {}", err(n));
    }
    // Private whatever the umask: directories 0700, files 0600.
    let perms = r.read("perms");
    assert!(perms.lines().count() >= 5, "{perms}");
    for line in perms.lines() {
        let mode = line.split(' ').next().unwrap();
        assert!(mode == "700" || mode == "600", "{line}\n{perms}");
    }
    // A VM that cannot restore removes its template: it is still there.
    assert_eq!(templates(&r).len(), 1, "{}", r.read("list"));
    r.assert_clean();
}

#[test]
fn a_changed_kernel_makes_a_new_template_and_the_old_one_goes() {
    let r = script(
        "tpl-kernel",
        r#"cp $SANDBOXVM_KERNEL $PWD/vmlinux
run first --kernel $PWD/vmlinux
$BIN template list >list.before
# The same file rewritten with the same bytes: another kernel for all anyone knows.
cp $SANDBOXVM_KERNEL $PWD/vmlinux.new && mv $PWD/vmlinux.new $PWD/vmlinux
run second --kernel $PWD/vmlinux
run third --kernel $PWD/vmlinux"#,
    );
    for n in ["first", "second", "third"] {
        probe(&r, n);
    }
    let built = |n: &str| r.read(&format!("{n}.err")).contains(" built in ");
    assert!(
        built("first") && built("second") && !built("third"),
        "{}",
        r.log
    );
    let before: Vec<String> = r
        .read("list.before")
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    let after = templates(&r);
    assert_eq!((before.len(), after.len()), (1, 1), "{}", r.log);
    assert_ne!(
        before[0].split_whitespace().next(),
        after[0].split_whitespace().next(),
        "a new key"
    );
    r.assert_clean();
}

#[test]
fn a_corrupt_template_is_never_restored_and_is_built_again() {
    let r = script(
        "tpl-corrupt",
        r#"run first
key=$(ls $CACHE/templates | grep -v lock)
# Four bytes changed in the guest's memory: the checksum must catch it.
printf '\xde\xad\xbe\xef' | dd of=$CACHE/templates/$key/memory bs=1 seek=$((1 << 20)) conv=notrunc
run second
ls $CACHE/templates >after-memory
run third
# A truncated manifest.
head -c 100 $CACHE/templates/$key/template.json >t && mv t $CACHE/templates/$key/template.json
run fourth
run fifth"#,
    );
    for n in ["first", "second", "third", "fourth", "fifth"] {
        probe(&r, n);
    }
    let err = |n: &str| r.read(&format!("{n}.err"));
    // The VMM checked, refused, removed and booted cold: the output is the
    // same; the next run builds the template again.
    assert_eq!(
        r.read("after-memory")
            .lines()
            .filter(|l| !l.ends_with(".lock"))
            .count(),
        0,
        "{}",
        r.log
    );
    assert!(err("third").contains(" built in "), "{}", err("third"));
    assert!(err("fifth").contains(" built in "), "{}", err("fifth"));
    assert!(!err("second").contains(" built in "), "{}", err("second"));
    assert_eq!(templates(&r).len(), 1);
    r.assert_clean();
}

#[test]
fn concurrent_first_use_builds_one_template() {
    let r = script("tpl-concurrent", r#"run one & run two & run three & wait"#);
    for n in ["one", "two", "three"] {
        probe(&r, n);
    }
    let builds = ["one", "two", "three"]
        .iter()
        .filter(|n| r.read(&format!("{n}.err")).contains(" built in "))
        .count();
    assert_eq!(builds, 1, "{}", r.log);
    assert_eq!(templates(&r).len(), 1);
    // No half-built template left.
    assert!(!r.read("files").contains(".tmp."), "{}", r.read("files"));
    r.assert_clean();
}

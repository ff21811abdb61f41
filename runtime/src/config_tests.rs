use super::*;
use std::collections::HashMap;

fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(text: &str) -> Result<Config, String> {
    let c = Config::parse(text)?;
    c.validate()?;
    Ok(c)
}

const FULL: &str = r#"
[guest]
kernel = "/opt/sbx/vmlinux"
initrd = "/opt/sbx/initramfs.cpio"
kernel_params = "loglevel=4"
default_vcpus = 2
max_vcpus = 4
default_memory_mib = 512
max_memory_mib = 4096

[virtiofsd]
path = "/usr/libexec/virtiofsd"
cache = "never"
thread_pool_size = 4

[vmm]
confine = false

[timeouts]
boot_secs = 120
agent_secs = 45
scale = 2

[log]
level = "info"

[annotations]
allowed = ["vcpus", "memory_mib", "kernel_params"]
"#;

#[test]
fn no_file_means_todays_behaviour() {
    let c = Config::default();
    assert_eq!(c.guest.default_vcpus, 1);
    assert_eq!(c.guest.default_memory_mib, vmm::config::DEFAULT_MEMORY_MIB);
    assert_eq!(c.virtiofsd.cache, CacheMode::Auto);
    assert_eq!(c.virtiofsd.thread_pool_size, 1);
    assert!(c.vmm.confine);
    assert!(c.annotations.allowed.is_empty());
    c.validate().unwrap();
    // An empty file is the same.
    assert_eq!(parse("").unwrap(), c);
}

#[test]
fn every_key_parses_and_prints_back_the_same() {
    let c = parse(FULL).unwrap();
    assert_eq!(
        c.guest.kernel.as_deref(),
        Some(Path::new("/opt/sbx/vmlinux"))
    );
    assert_eq!(c.guest.max_memory_mib, Some(4096));
    assert_eq!(c.virtiofsd.cache, CacheMode::Never);
    assert_eq!(c.timeouts.scale, Some(2.0));
    assert_eq!(c.log.level, Some(LogLevel::Info));
    assert_eq!(c.annotations.allowed.len(), 3);
    assert!(!c.vmm.confine);
    assert_eq!(parse(&c.to_toml()).unwrap(), c);
    let d = Config::default();
    assert_eq!(parse(&d.to_toml()).unwrap(), d);
}

#[test]
fn mistakes_are_one_line_naming_the_key() {
    for (text, key) in [
        ("[guest]\nkernal = \"/x\"\n", "kernal"),
        ("[gust]\n", "gust"),
        ("[guest]\ndefault_vcpus = \"two\"\n", "default_vcpus"),
        ("[guest]\ndefault_vcpus = 0\n", "guest.default_vcpus"),
        (
            "[guest]\ndefault_vcpus = 4\nmax_vcpus = 2\n",
            "guest.default_vcpus",
        ),
        ("[guest]\nmax_vcpus = 300\n", "max_vcpus"),
        (
            "[guest]\ndefault_memory_mib = 64\n",
            "guest.default_memory_mib",
        ),
        (
            "[guest]\ndefault_memory_mib = 512\nmax_memory_mib = 256\n",
            "guest.default_memory_mib",
        ),
        (
            "[guest]\nmax_memory_mib = 99999999\n",
            "guest.max_memory_mib = 99999999: at most 1048576",
        ),
        ("[guest]\nkernel = \"vmlinux\"\n", "guest.kernel"),
        (
            "[guest]\nkernel_params = \"a\\nb\"\n",
            "guest.kernel_params",
        ),
        ("[virtiofsd]\ncache = \"sometimes\"\n", "sometimes"),
        (
            "[virtiofsd]\nthread_pool_size = 1000\n",
            "virtiofsd.thread_pool_size",
        ),
        ("[timeouts]\nboot_secs = -1\n", "timeouts.boot_secs"),
        ("[timeouts]\nscale = 1000\n", "timeouts.scale"),
        ("[log]\nlevel = \"loud\"\n", "loud"),
        ("[annotations]\nallowed = [\"kernel\"]\n", "kernel"),
        ("guest = 3\n", "guest"),
        ("[guest\n", "guest"),
    ] {
        let e = parse(text).unwrap_err();
        assert!(!e.contains('\n'), "{text:?}: {e:?}");
        assert!(e.contains(key), "{text:?}: {e:?} does not name {key}");
    }
}

#[test]
fn loading_names_the_file_and_a_missing_default_is_no_error() {
    let dir = std::env::temp_dir().join(format!("sandboxvm-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let absent = dir.join("absent.toml");
    let l = Loaded::load_from(None, &absent).unwrap();
    assert_eq!(l.path, None);
    assert_eq!(l.config, Config::default());
    // A file named explicitly must be there.
    let e = Loaded::load_from(Some(&absent), &absent)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("config {}: ", absent.display())),
        "{e}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[guest]\nmax_vcpus = 0\n").unwrap();
    let e = Loaded::load_from(None, &bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("config {}: guest.max_vcpus", bad.display())),
        "{e}"
    );
    let good = dir.join("good.toml");
    std::fs::write(&good, FULL).unwrap();
    let l = Loaded::load_from(Some(&good), &bad).unwrap();
    assert_eq!(l.path.as_deref(), Some(good.as_path()));
    assert_eq!(l.config.guest.default_vcpus, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sized(
    c: &Config,
    vcpus: Option<u8>,
    mem: Option<u64>,
    a: &[(&str, &str)],
) -> Result<Size, String> {
    c.size(vcpus, mem, &ann(a))
}

#[test]
fn a_vm_gets_what_its_container_asks_between_the_default_and_the_maximum() {
    let c = parse(FULL).unwrap();
    let s = sized(&c, None, None, &[]).unwrap();
    assert_eq!((s.vcpus, s.memory_mib), (2, 512));
    assert_eq!(s.kernel_params, "loglevel=4");
    let s = sized(&c, Some(3), Some(1088), &[]).unwrap();
    assert_eq!((s.vcpus, s.memory_mib), (3, 1088));
    // More vCPUs than the maximum: cut, the container is only throttled less.
    assert_eq!(sized(&c, Some(16), None, &[]).unwrap().vcpus, 4);
    // More memory than the maximum: refused, a smaller guest would OOM-kill it.
    let e = sized(&c, None, Some(8192), &[]).unwrap_err();
    assert!(e.contains("8192 MiB") && e.contains("4096 MiB"), "{e}");
}

#[test]
fn pod_annotations_need_the_allowlist() {
    let c = Config::default();
    // Other annotations are not ours.
    assert!(sized(&c, None, None, &[("io.kubernetes.cri.sandbox-memory", "1")]).is_ok());
    let e = sized(&c, None, None, &[("io.sandboxvm.memory_mib", "1024")]).unwrap_err();
    assert!(
        e.contains("not allowed") && e.contains("annotations.allowed"),
        "{e}"
    );
    let e = sized(&c, None, None, &[("io.sandboxvm.kernel", "/x")]).unwrap_err();
    assert!(e.contains("unknown annotation"), "{e}");
    let e = sized(&c, None, None, &[("io.sandboxvm.\u{1b}[2J", "x")]).unwrap_err();
    assert!(!e.contains('\u{1b}'), "{e}");
}

#[test]
fn allowed_annotations_choose_within_the_maximum() {
    let c = parse(FULL).unwrap();
    let s = sized(
        &c,
        Some(1),
        Some(300),
        &[
            ("io.sandboxvm.vcpus", "3"),
            ("io.sandboxvm.memory_mib", "2048"),
            ("io.sandboxvm.kernel_params", "quiet debug"),
        ],
    )
    .unwrap();
    assert_eq!((s.vcpus, s.memory_mib), (3, 2048));
    assert_eq!(s.kernel_params, "loglevel=4 quiet debug");
    for (k, v, says) in [
        (
            "io.sandboxvm.vcpus",
            "5",
            "above the configured maximum of 4",
        ),
        ("io.sandboxvm.vcpus", "0", "not a number"),
        (
            "io.sandboxvm.memory_mib",
            "5000",
            "above the configured maximum of 4096",
        ),
        ("io.sandboxvm.memory_mib", "lots", "not a size"),
        ("io.sandboxvm.kernel_params", "a\nb", "printable"),
    ] {
        let e = sized(&c, None, None, &[(k, v)]).unwrap_err();
        assert!(e.contains(says), "{k}={v:?}: {e}");
        assert!(!e.contains('\n'), "{e:?}");
    }
}

#[test]
fn the_example_file_is_the_defaults() {
    let text = include_str!("../../resources/config.toml");
    assert_eq!(parse(text).unwrap(), Config::default());
}

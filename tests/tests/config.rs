//! End to end: the configuration file (`--config`, /etc/sandboxvm/config.toml)
//! with `sandboxvm run` on the KVM host: what it sets reaches the VM, what
//! it refuses is one line and leaves nothing behind.

use e2e::fixtures::bundle;
use e2e::run::{assert_clean, assert_fails, assert_guest_memory, run_during, run_with};
use serde_json::json;

fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = e2e::fixtures::work_dir().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_configuration_sizes_the_vm_passes_kernel_parameters_and_sets_virtiofsd() {
    let config = config_file(
        "sized",
        r#"
[guest]
kernel_params = "sbx_config_test=1"
default_vcpus = 2
max_vcpus = 2
default_memory_mib = 384

[virtiofsd]
cache = "never"
thread_pool_size = 2

[log]
level = "info"
"#,
    );
    let b = bundle(
        "config-sized",
        &[
            "sh",
            "-c",
            "cat /proc/cmdline; nproc; grep MemTotal /proc/meminfo; sleep 1",
        ],
        |_| {},
    );
    // virtiofsd's command line, taken while it serves this run.
    let during = r#"for _ in $(seq 900); do
  p=$(pgrep -a virtiofsd | grep -F "$PWD") && break
  sleep 0.1
done
echo "$p" >virtiofsd"#;
    let r = run_during(
        &b,
        &format!("--config {}", config.display()),
        "",
        None,
        during,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[0].split(' ').any(|p| p == "sbx_config_test=1"),
        "{r:?}"
    );
    assert_eq!(lines[1], "2", "vCPUs: {r:?}");
    assert_guest_memory(lines[2], 384);
    // [log] level = "info": the phases are logged without -v.
    assert!(
        r.stderr
            .contains("VMM started (2 vCPU of 2, 384 MiB of 384)"),
        "{r:?}"
    );
    let vfs = std::fs::read_to_string(b.with_extension("out").join("virtiofsd")).unwrap();
    assert!(
        vfs.contains("--cache=never") && vfs.contains("--thread-pool-size=2"),
        "virtiofsd: {vfs:?}"
    );
    assert_clean(&r);
}

#[test]
fn what_the_configuration_refuses_is_one_line_and_leaves_nothing() {
    // A container whose limit needs more than the maximum: a smaller
    // guest would OOM-kill it.
    let config = config_file("ceiling", "[guest]\nmax_memory_mib = 300\n");
    let b = bundle("config-ceiling", &["true"], |s| {
        s["linux"]["resources"]["memory"]["limit"] = json!(512u64 << 20);
        s["annotations"] = json!({"io.sandboxvm.vcpus": "2"});
    });
    let extra = format!("--config {}", config.display());
    // The pod's annotation comes first: it is not allowed by default.
    assert_fails(
        &run_with(&b, &extra, "", None),
        "annotation io.sandboxvm.vcpus is not allowed",
    );
    let b = bundle("config-ceiling2", &["true"], |s| {
        s["linux"]["resources"]["memory"]["limit"] = json!(512u64 << 20);
    });
    assert_fails(
        &run_with(&b, &extra, "", None),
        "needs a 576 MiB VM, which is above the configured maximum of 300 MiB",
    );
    let typo = config_file("typo", "[guest]\ndefault_cpus = 2\n");
    assert_fails(
        &run_with(&b, &format!("--config {}", typo.display()), "", None),
        "line 2 (default_cpus = 2): unknown field `default_cpus`",
    );
}

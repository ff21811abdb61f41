//! `sandboxvm features`: what this runtime implements, as the runtime-spec's
//! features document (`runc features`; containerd, nerdctl and Docker read
//! it to decide what they may put in a spec).

use clap::Args;
use serde_json::json;

use protocol::guest_features as guest;

/// Prints the features JSON.
#[derive(Debug, Args)]
pub struct Features {}

/// The hooks run: prestart, createRuntime, createContainer and poststart
/// and poststop on the host, startContainer in the guest.
const HOOKS: &[&str] = &[
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// The document.
pub fn features() -> serde_json::Value {
    let caps: Vec<String> = {
        let mut v: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
        v.sort();
        v
    };
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": sandboxvm::bundle::OCI_VERSION_MAX,
        "hooks": HOOKS,
        "mountOptions": protocol::mount_options::FLAG_NAMES,
        "linux": {
            "namespaces": guest::NAMESPACES,
            "capabilities": caps,
            "cgroup": {
                "v1": false,
                "v2": true,
                "systemd": false,
                "systemdUser": false,
                "rdma": false,
            },
            "seccomp": {
                "enabled": true,
                "actions": guest::SECCOMP_ACTIONS,
                "operators": guest::SECCOMP_OPERATORS,
                "archs": guest::SECCOMP_ARCHS,
                "knownFlags": guest::SECCOMP_FLAGS,
                "supportedFlags": guest::SECCOMP_FLAGS,
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}},
        },
        "annotations": {
            "org.opencontainers.runc.checkpoint.enabled": "false",
            "io.sandboxvm.vm": "true",
        },
    })
}

impl Features {
    pub fn run(self) -> anyhow::Result<i32> {
        println!("{}", serde_json::to_string_pretty(&features())?);
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_parses_as_the_runtime_specs_features() {
        let f: oci_spec::runtime::Features =
            serde_json::from_value(super::features()).expect("a features document");
        assert_eq!(f.oci_version_min(), "1.0.0");
        let linux = f.linux().as_ref().unwrap();
        assert!(linux
            .capabilities()
            .as_ref()
            .unwrap()
            .contains(&"CAP_SYS_ADMIN".to_string()));
        let seccomp = linux.seccomp().as_ref().unwrap();
        assert_eq!(seccomp.enabled(), &Some(true));
    }
}

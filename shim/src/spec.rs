//! What the CRI's annotations say about a container: which pod it belongs
//! to and whether it is the pod's sandbox (pause) container. The guest's
//! version of its spec is [`sandboxvm::guest_spec`]'s.

use serde_json::Value;

/// The CRI annotation naming a container's role.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI annotation naming the pod (sandbox) a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The pod a container belongs to: the CRI sandbox id for a pod's
/// (non-sandbox) container, else the container itself.
pub fn pod_id(spec: &Value, container_id: &str) -> String {
    let ann = &spec["annotations"];
    match (ann[CONTAINER_TYPE].as_str(), ann[SANDBOX_ID].as_str()) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => sandbox.to_string(),
        _ => container_id.to_string(),
    }
}

/// Whether the spec says this is a pod's sandbox (pause) container or a
/// stand-alone one.
pub fn is_sandbox(spec: &Value) -> bool {
    spec["annotations"][CONTAINER_TYPE].as_str() != Some("container")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pods_container_groups_with_its_sandbox() {
        let s = json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}});
        assert_eq!(pod_id(&s, "c1"), "pod1");
        assert!(!is_sandbox(&s));
        let plain = json!({"process": {}});
        assert_eq!(pod_id(&plain, "c2"), "c2");
        assert!(is_sandbox(&plain));
        let sandbox = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}});
        assert_eq!(pod_id(&sandbox, "pod1"), "pod1");
        assert!(is_sandbox(&sandbox));
    }
}

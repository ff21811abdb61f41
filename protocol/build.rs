//! Generates the Rust protobuf messages and the sync ttrpc service from
//! `proto/agent.proto` into `OUT_DIR`.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize};

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: false,
            ..Default::default()
        })
        .run()
        .expect("ttrpc code generation from proto/agent.proto");
    // The generated files start with inner attributes (`#![allow(..)]`) and inner doc comments,
    // which `include!` does not accept: drop them (lib.rs allows lints).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("generated file");
        let kept: String = text
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !l.starts_with("#![") && !l.starts_with("//!")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).expect("rewrite generated file");
    }
    use_own_client(&out.join("agent_ttrpc.rs"));
}

/// Makes `AgentClient` use `crate::client::Client` (ours, which does not
/// poll) instead of ttrpc's sync client: `client_request!` only calls
/// `self.client.request(req)`. Fails if the generated code changed shape.
fn use_own_client(path: &std::path::Path) {
    const THEIRS: &str = "::ttrpc::Client";
    let text = std::fs::read_to_string(path).expect("generated agent_ttrpc.rs");
    let mut parts = text.split(THEIRS);
    let mut out = parts.next().unwrap_or_default().to_string();
    let mut replaced = 0;
    for part in parts {
        if part.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
            panic!(
                "agent_ttrpc.rs names {THEIRS}{}: not the client type",
                &part[..20.min(part.len())]
            );
        }
        out.push_str("crate::client::Client");
        out.push_str(part);
        replaced += 1;
    }
    // The field and the argument of `AgentClient::new`.
    if replaced != 2 || out.contains("ttrpc::Client") || out.contains("sync::Client") {
        panic!("agent_ttrpc.rs: expected {THEIRS} twice (AgentClient's field and new()), replaced {replaced}: update protocol/build.rs");
    }
    std::fs::write(path, out).expect("rewrite agent_ttrpc.rs");
}

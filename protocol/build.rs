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
}

//! The shim's entry point: containerd's `start`, `delete` and serve
//! actions, driving the [`containerd_shim::Shim`] implementation.
//!
//! `containerd_shim::run` is not used: it answers `start` with the JSON of
//! task API v3 and serves only `containerd.task.v3.Task`, which only
//! containerd 2 speaks. Here `start` prints the plain address, which every
//! containerd since 1.5 accepts (as task API v2), and the task service is
//! served under both the v2 and the v3 names (same messages).

use std::io::Write;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim_ttrpc::create_task;
use containerd_shim::protos::ttrpc::{self, Server};
use containerd_shim::protos::types::introspection::RuntimeInfo;
use containerd_shim::{Config, Flags, Shim as _, StartOpts};
use nix::sys::signal::{SigSet, Signal};

use crate::events::Publisher;
use crate::shim::{Shim, RUNTIME_ID};

/// Runs the action containerd asked for; the process's exit status.
pub fn main() -> i32 {
    let args: Vec<_> = std::env::args_os().collect();
    match run(&args[1..]) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            1
        }
    }
}

fn run(args: &[std::ffi::OsString]) -> Result<(), String> {
    let flags = containerd_shim::parse(args).map_err(|e| e.to_string())?;
    if flags.version {
        println!("containerd-shim-sandboxvm-v2 {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if flags.info {
        let info = RuntimeInfo {
            name: RUNTIME_ID.to_string(),
            ..Default::default()
        };
        let bytes = info.write_to_bytes().map_err(|e| e.to_string())?;
        return std::io::stdout()
            .write_all(&bytes)
            .map_err(|e| e.to_string());
    }
    if flags.namespace.is_empty() {
        return Err("shim namespace cannot be empty".into());
    }
    let mut config = Config::default();
    let mut shim = Shim::new(RUNTIME_ID, &flags, &mut config);
    match flags.action.as_str() {
        "start" => {
            let opts = StartOpts {
                id: flags.id.clone(),
                publish_binary: flags.publish_binary.clone(),
                address: flags.address.clone(),
                ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
                namespace: flags.namespace.clone(),
                debug: flags.debug,
                ..Default::default()
            };
            let address = shim.start_shim(opts).map_err(|e| e.to_string())?;
            let mut out = std::io::stdout();
            out.write_all(address.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| e.to_string())
        }
        "delete" => {
            let r = shim.delete_shim().map_err(|e| e.to_string())?;
            r.write_to_writer(&mut std::io::stdout())
                .map_err(|e| e.to_string())
        }
        _ => serve(shim, &flags),
    }
}

/// Unix socket path of a `unix://` address.
fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Lets the `start` process go: it reads our stdout until EOF.
fn release_starter() {
    // SAFETY: dup2 on the process's own standard descriptors; stdout then
    // points where stderr does and the pipe to the starter is closed.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

fn serve(mut shim: Shim, flags: &Flags) -> Result<(), String> {
    if flags.socket.is_empty() {
        return Err("shim socket cannot be empty".into());
    }
    // SIGTERM and SIGINT go to a thread that shuts the pod down.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| e.to_string())?;

    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
        .map_err(|e| e.to_string())?;
    let path = socket_path(&flags.socket).to_string();
    if let Some(dir) = Path::new(&path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // The pod's shim runs already (the starter reuses its address)
            // if it answers; else a dead shim's socket is in the way.
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                release_starter();
                return Ok(());
            }
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path).map_err(|e| format!("listen on {path}: {e}"))?
        }
        Err(e) => return Err(format!("listen on {path}: {e}")),
    };
    sandboxvm::private::restrict_socket(Path::new(&path))
        .map_err(|e| format!("chmod {path}: {e}"))?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").map_err(|_| "TTRPC_ADDRESS is not set")?;
    let publisher = Publisher::connect(&ttrpc_address)?;
    let service = Arc::new(shim.task_service(publisher));
    let task: Arc<dyn containerd_shim::Task + Send + Sync> = service.clone();
    let v2: std::collections::HashMap<_, _> = create_task(task.clone())
        .into_iter()
        .map(|(k, v)| (k.replace("/containerd.task.v3.", "/containerd.task.v2."), v))
        .collect();
    let mut server = Server::new()
        .add_listener(listener.into_raw_fd())
        .map_err(|e| e.to_string())?
        .register_service(create_task(task))
        .register_service(v2);
    server.start().map_err(|e: ttrpc::Error| e.to_string())?;
    release_starter();
    log::info!("shim serving on {path}");

    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            log::info!("{sig}: stopping the pod");
            service.shutdown_now();
        }
    });
    shim.wait();
    server.shutdown();
    log::info!("shim exiting");
    Ok(())
}

//! `sandboxvm-agent`: PID 1 of the guest (serves ttrpc on vsock port 1024),
//! or `sandboxvm-agent --listen unix:///path.sock` on a host for tests.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use guest_agent::container::Manager;
use guest_agent::{init, reaper, server, template};

const USAGE: &str = "usage: sandboxvm-agent [--listen ADDR] [--cgroup-root DIR] [-v]\n  \
ADDR: vsock://-1:1024 (default) or unix:///path.sock";

struct Args {
    listen: Option<String>,
    cgroup_root: PathBuf,
    verbose: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        listen: None,
        cgroup_root: PathBuf::from("/sys/fs/cgroup/sandboxvm"),
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => a.listen = Some(it.next().context("--listen needs an address")?),
            "--cgroup-root" => {
                a.cgroup_root = it.next().context("--cgroup-root needs a directory")?.into()
            }
            "-v" | "--verbose" => a.verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // The kernel passes unknown command-line words to init.
            _ if std::process::id() == 1 => {}
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn main() {
    let pid1 = std::process::id() == 1;
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sandboxvm-agent: {e:#}");
            std::process::exit(2);
        }
    };
    if pid1 {
        // Mount /dev before logging to /dev/kmsg.
        let errors = init::setup_system();
        init::init_logging(true, log::LevelFilter::Info);
        for e in errors {
            log::warn!("{e}");
        }
    } else {
        let level = if args.verbose {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        };
        init::init_logging(false, level);
    }
    if pid1 && template::is_template() {
        if let Err(e) = template::await_restore() {
            init::power_off(&format!("sandboxvm-agent: {e:#}"));
        }
    }
    if let Err(e) = run(pid1, args) {
        let msg = format!("sandboxvm-agent: {e:#}");
        eprintln!("{msg}");
        if pid1 {
            init::power_off(&msg);
        }
        std::process::exit(1);
    }
}

fn run(pid1: bool, args: Args) -> Result<()> {
    if !pid1 {
        // Container processes are double-forked: become their reaper.
        // SAFETY: PR_SET_CHILD_SUBREAPER takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            bail!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let _ = reaper::reaper();
    let addr = match args.listen {
        Some(a) => a,
        None if pid1 => format!("vsock://-1:{}", protocol::AGENT_PORT),
        None => bail!("not PID 1: give --listen unix:///path.sock\n{USAGE}"),
    };
    if let Some(path) = addr.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
    }
    let service = server::Service {
        manager: Arc::new(Manager::new(args.cgroup_root)),
        pid1,
    };
    let _server =
        server::serve(&addr, service).with_context(|| format!("cannot serve ttrpc on {addr}"))?;
    log::info!("agent {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    loop {
        std::thread::park();
    }
}

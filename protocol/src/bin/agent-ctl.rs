//! Debug client for the sandboxvm guest agent.
//!
//! ```text
//! agent-ctl (--bridge VMM_VSOCK_SOCKET [--port N] | --unix SOCKET) COMMAND [ARGS]
//!   guest-details
//!   create ID CONFIG_JSON SHARE_TAG [SUBPATH]
//!   start ID | state ID | stats ID | remove ID
//!   wait ID [EXEC_ID] | kill ID SIGNAL [EXEC_ID]
//!   exec ID EXEC_ID PROCESS_JSON
//!   output ID [EXEC_ID]        (prints stdout until EOF)
//!   shutdown
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use protocol::agent::*;
use protocol::agent_ttrpc::AgentClient;

const USAGE: &str = "usage: agent-ctl (--bridge SOCKET [--port N] | --unix SOCKET) \
guest-details | create ID CONFIG_JSON SHARE_TAG [SUBPATH] | start ID | state ID | stats ID | \
remove ID | wait ID [EXEC_ID] | kill ID SIGNAL [EXEC_ID] | exec ID EXEC_ID PROCESS_JSON | \
output ID [EXEC_ID] | shutdown";

fn main() {
    if let Err(e) = run() {
        eprintln!("agent-ctl: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut bridge = None;
    let mut unix = None;
    let mut port = protocol::AGENT_PORT;
    while let Some(a) = args.first().cloned() {
        match a.as_str() {
            "--bridge" | "--unix" | "--port" if args.len() >= 2 => {
                let v = args.remove(1);
                args.remove(0);
                match a.as_str() {
                    "--bridge" => bridge = Some(PathBuf::from(v)),
                    "--unix" => unix = Some(PathBuf::from(v)),
                    _ => port = v.parse().context("--port")?,
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => break,
        }
    }
    let stream = match (bridge, unix) {
        (Some(b), None) => protocol::connect_vsock_bridge_retry(&b, port, Duration::from_secs(10))?,
        (None, Some(u)) => std::os::unix::net::UnixStream::connect(&u)
            .with_context(|| format!("connect {}", u.display()))?,
        _ => bail!("{USAGE}"),
    };
    let c: AgentClient = protocol::agent_client(stream)?;
    let t = || protocol::ctx(Duration::from_secs(30));
    let arg =
        |i: usize| -> Result<String> { args.get(i).cloned().with_context(|| USAGE.to_string()) };
    let opt = |i: usize| args.get(i).cloned().unwrap_or_default();
    let cmd = arg(0)?;
    match cmd.as_str() {
        "guest-details" => {
            let r = c.guest_details(t(), &Empty::new())?;
            println!("kernel {} agent {}", r.kernel_release, r.agent_version);
        }
        "create" => {
            let spec = std::fs::read_to_string(arg(2)?).context("read config.json")?;
            let req = CreateContainerRequest {
                container_id: arg(1)?,
                oci_spec_json: spec,
                share_tag: arg(3)?,
                rootfs_subpath: opt(4),
                ..Default::default()
            };
            c.create_container(t(), &req)?;
        }
        "start" | "state" | "stats" | "remove" => {
            let req = ContainerRequest {
                container_id: arg(1)?,
                ..Default::default()
            };
            match cmd.as_str() {
                "start" => drop(c.start_container(t(), &req)?),
                "remove" => drop(c.remove_container(t(), &req)?),
                "state" => {
                    let r = c.state_container(t(), &req)?;
                    println!("{} pid {} exit {}", r.status, r.pid, r.exit_status);
                }
                _ => {
                    let r = c.stats_container(t(), &req)?;
                    println!(
                        "cpu_usage_usec {} memory_usage_bytes {} pids {}",
                        r.cpu_usage_usec, r.memory_usage_bytes, r.pids
                    );
                }
            }
        }
        "wait" => {
            let req = ProcessRequest {
                container_id: arg(1)?,
                exec_id: opt(2),
                ..Default::default()
            };
            let r = c.wait_process(protocol::ctx(Duration::ZERO), &req)?;
            println!("{}", r.status);
        }
        "kill" => {
            let req = SignalProcessRequest {
                container_id: arg(1)?,
                signal: arg(2)?.parse().context("signal number")?,
                exec_id: opt(3),
                ..Default::default()
            };
            c.signal_process(t(), &req)?;
        }
        "exec" => {
            let req = ExecProcessRequest {
                container_id: arg(1)?,
                exec_id: arg(2)?,
                process_json: std::fs::read_to_string(arg(3)?).context("read process json")?,
                ..Default::default()
            };
            c.exec_process(t(), &req)?;
        }
        "output" => {
            let mut out = std::io::stdout();
            loop {
                let req = ReadStreamRequest {
                    container_id: arg(1)?,
                    exec_id: opt(2),
                    len: 65536,
                    ..Default::default()
                };
                let r = c.read_stdout(protocol::ctx(Duration::ZERO), &req)?;
                if r.data.is_empty() {
                    break;
                }
                out.write_all(&r.data)?;
                out.flush()?;
            }
        }
        "shutdown" => drop(c.shutdown(t(), &Empty::new())?),
        _ => bail!("unknown command {cmd:?}\n{USAGE}"),
    }
    Ok(())
}

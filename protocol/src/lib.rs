//! The ttrpc protocol between the sandboxvm host runtime and the guest agent.
//!
//! - [`agent`]: the protobuf messages of `proto/agent.proto`
//!   (package `sandboxvm.agent.v1`).
//! - [`agent_ttrpc`]: the sync ttrpc service: `AgentClient` for the host (on
//!   [`client::Client`]) and the `Agent` trait + `create_agent` for the guest.
//! - [`connect_vsock_bridge`] + [`agent_client`]: how the host reaches
//!   the agent through the VMM's vsock Unix-socket bridge, with [`client`]'s
//!   ttrpc client (ttrpc's own polls its socket every 10 ms).
//!
//! ```no_run
//! use std::time::Duration;
//! let stream = protocol::connect_vsock_bridge(
//!     std::path::Path::new("/run/vm/vsock.sock"),
//!     protocol::AGENT_PORT,
//!     Duration::from_secs(5),
//! )
//! .unwrap();
//! let client = protocol::agent_client(stream).unwrap();
//! let details = client
//!     .guest_details(protocol::ctx(Duration::from_secs(5)), &protocol::agent::Empty::new())
//!     .unwrap();
//! println!("{}", details.kernel_release);
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Code generated from `proto/agent.proto` (lints off: not ours to style).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_imports,
    unused_mut,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_results,
    unused_qualifications,
    trivial_casts
)]
mod generated {
    /// The protobuf messages.
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }

    /// The sync ttrpc client and server glue.
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

pub use generated::{agent, agent_ttrpc};

pub mod client;
pub mod guest_features;
pub mod mount_options;
pub mod template;

pub use ttrpc;

/// The vsock port the guest agent listens on (`VMADDR_CID_ANY:1024`).
pub const AGENT_PORT: u32 = 1024;

/// The most output one ReadStdout/ReadStderr call carries, bytes: what the
/// host asks for, what the agent reads at most, and the size of a process's
/// stdout and stderr pipes in the guest. With 64 KiB pipes a writer stalled
/// after each 64 KiB until the host's next call had crossed vsock: a
/// container's output ran at 4.4 MiB/s in the nested CI host, 11.1 with
/// 1 MiB (ci/bench-vsock). Pipe pages are allocated as data arrives.
pub const OUTPUT_CHUNK: u32 = 1 << 20;

/// The kernel parameter by which the VMM tells the guest where the memory
/// it may add lies: `sandboxvm.hotplug=ADDR:LEN` (hexadecimal bytes); the
/// agent's `ResizeVm` adds it block by block.
pub const HOTPLUG_PARAM: &str = "sandboxvm.hotplug";

/// Connects to a guest vsock port through the VMM's Unix-socket bridge:
/// connects to `uds`, writes `CONNECT <port>\n` and expects `OK <n>\n`.
/// On success the stream is a byte pipe to the guest listener.
pub fn connect_vsock_bridge(uds: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    // The socket's directory may belong to the VMM's user: connect to a
    // socket there, never through a symlink to another service's.
    if std::fs::symlink_metadata(uds).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(io::Error::other(format!(
            "the VMM vsock socket {} is a symlink",
            uds.display()
        )));
    }
    let stream = UnixStream::connect(uds).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot connect to the VMM vsock socket {}: {e}",
                uds.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    (&stream).write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply byte by byte: anything after the newline belongs to
    // the guest stream and must stay in the socket.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("vsock bridge {}: no reply to CONNECT {port}", uds.display()),
            ));
        }
        match (&stream).read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "vsock bridge {}: connection closed after CONNECT {port} (is the guest listening?)",
                        uds.display()
                    ),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 256 => line.push(byte[0]),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "vsock bridge: reply line too long",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("vsock bridge {}: no reply to CONNECT {port}", uds.display()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    let reply = String::from_utf8_lossy(&line);
    let reply = reply.trim_end_matches('\r');
    if reply.split_whitespace().next() != Some("OK") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "vsock bridge {}: CONNECT {port} refused: {reply:?}",
                uds.display()
            ),
        ));
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Connects with retries until `timeout`: the guest agent may not be
/// listening yet right after boot.
pub fn connect_vsock_bridge_retry(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connect_vsock_bridge(uds, port, left.min(Duration::from_secs(1))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Makes an [`agent_ttrpc::AgentClient`] on a connected stream (bridge or
/// Unix socket), which it owns from now on.
pub fn agent_client(stream: UnixStream) -> ttrpc::Result<agent_ttrpc::AgentClient> {
    Ok(agent_ttrpc::AgentClient::new(client::Client::new(stream)?))
}

/// A request context with a timeout (`Duration::ZERO` = no timeout, for
/// the blocking calls `WaitProcess`, `ReadStdout` and `ReadStderr`).
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

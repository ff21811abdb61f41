//! The runtime's side of the guest agent API (ttrpc over the vsock bridge).

use std::os::unix::net::UnixStream;
use std::time::Duration;

use protocol::agent::{
    ContainerRequest, CreateContainerRequest, Empty, ExecProcessRequest, ProcessRequest,
    ReadStreamRequest, SignalProcessRequest, TtyWinResizeRequest, WriteStdinRequest,
};
use protocol::agent_ttrpc::AgentClient;

/// Errors from the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ttrpc connection could not be set up.
    #[error("cannot talk to the guest agent: {0}")]
    Connect(String),
    /// A call failed; the agent's message says why.
    #[error("{0}")]
    Call(String),
}

/// A container's state in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// "created", "running" or "stopped".
    pub status: String,
    /// The init process's pid in the guest.
    pub guest_pid: u32,
    /// Exit status once stopped (exit code, or 128 + signal).
    pub exit_status: i32,
}

/// Resource usage of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// CPU time used, microseconds.
    pub cpu_usage_usec: u64,
    /// Memory in use, bytes.
    pub memory_usage_bytes: u64,
    /// Number of processes.
    pub pids: u64,
}

/// How long ordinary (non-blocking) calls may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much output one read call returns at most.
const READ_CHUNK: u32 = 64 * 1024;

/// A connected agent client; clones share the connection.
#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
}

fn call_err(e: protocol::ttrpc::Error) -> Error {
    match e {
        protocol::ttrpc::Error::RpcStatus(s) => Error::Call(s.message().to_string()),
        other => Error::Call(format!("the guest agent: {other}")),
    }
}

impl Agent {
    /// A client on a stream connected to the agent's port.
    pub fn new(stream: UnixStream) -> Result<Agent, Error> {
        let client = protocol::agent_client(stream).map_err(|e| Error::Connect(e.to_string()))?;
        Ok(Agent { client })
    }

    fn ctx() -> protocol::ttrpc::context::Context {
        protocol::ctx(CALL_TIMEOUT)
    }

    /// The guest kernel's release.
    pub fn kernel_release(&self) -> Result<String, Error> {
        let r = self
            .client
            .guest_details(Self::ctx(), &Empty::new())
            .map_err(call_err)?;
        Ok(r.kernel_release)
    }

    /// Creates the container from `spec_json`, its rootfs being the share
    /// `tag`.
    pub fn create(&self, id: &str, spec_json: &str, tag: &str) -> Result<(), Error> {
        self.create_in(id, spec_json, tag, "")
    }

    /// Creates the container from `spec_json`, its rootfs being `subpath`
    /// inside the share `tag` (several containers of a pod share one).
    pub fn create_in(
        &self,
        id: &str,
        spec_json: &str,
        tag: &str,
        subpath: &str,
    ) -> Result<(), Error> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec_json.into(),
            share_tag: tag.into(),
            rootfs_subpath: subpath.into(),
            ..Default::default()
        };
        self.client
            .create_container(Self::ctx(), &req)
            .map_err(call_err)?;
        Ok(())
    }

    /// Starts the container's process.
    pub fn start(&self, id: &str) -> Result<(), Error> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client
            .start_container(Self::ctx(), &req)
            .map_err(call_err)?;
        Ok(())
    }

    fn process(id: &str, exec_id: &str) -> ProcessRequest {
        ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        }
    }

    /// Waits for a process; its exit code or 128 + signal.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<i32, Error> {
        let r = self
            .client
            .wait_process(protocol::ctx(Duration::ZERO), &Self::process(id, exec_id))
            .map_err(call_err)?;
        Ok(r.status)
    }

    /// Sends `signal` to a process.
    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), Error> {
        self.signal_all(id, exec_id, signal, false)
    }

    /// Sends `signal` to a process, or with `all` to every process of the
    /// container.
    pub fn signal_all(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<(), Error> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.client
            .signal_process(Self::ctx(), &req)
            .map_err(call_err)?;
        Ok(())
    }

    /// Writes all of `data` to a process's stdin.
    pub fn write_stdin(&self, id: &str, exec_id: &str, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let req = WriteStdinRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                data: data.to_vec(),
                ..Default::default()
            };
            let r = self
                .client
                .write_stdin(protocol::ctx(Duration::ZERO), &req)
                .map_err(call_err)?;
            let n = (r.len as usize).min(data.len());
            if n == 0 {
                return Err(Error::Call("the container's stdin is closed".into()));
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes a process's stdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Error> {
        self.client
            .close_stdin(Self::ctx(), &Self::process(id, exec_id))
            .map_err(call_err)?;
        Ok(())
    }

    /// The next chunk of a process's stdout (or stderr); empty at EOF.
    pub fn read_output(&self, id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, Error> {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            len: READ_CHUNK,
            ..Default::default()
        };
        let ctx = protocol::ctx(Duration::ZERO);
        let r = if stderr {
            self.client.read_stderr(ctx, &req)
        } else {
            self.client.read_stdout(ctx, &req)
        }
        .map_err(call_err)?;
        Ok(r.data)
    }

    /// Sets a process's terminal size.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), Error> {
        let req = TtyWinResizeRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.client
            .tty_win_resize(Self::ctx(), &req)
            .map_err(call_err)?;
        Ok(())
    }

    /// Starts another process (an OCI `Process`, as JSON) in a running
    /// container.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &str) -> Result<(), Error> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: process_json.into(),
            ..Default::default()
        };
        self.client
            .exec_process(Self::ctx(), &req)
            .map_err(call_err)?;
        Ok(())
    }

    /// The container's state as the agent sees it.
    pub fn state(&self, id: &str) -> Result<ContainerState, Error> {
        let r = self
            .client
            .state_container(Self::ctx(), &Self::container(id))
            .map_err(call_err)?;
        Ok(ContainerState {
            status: r.status,
            guest_pid: r.pid,
            exit_status: r.exit_status,
        })
    }

    /// CPU, memory and pids of the container's cgroup in the guest.
    pub fn stats(&self, id: &str) -> Result<Stats, Error> {
        let r = self
            .client
            .stats_container(Self::ctx(), &Self::container(id))
            .map_err(call_err)?;
        Ok(Stats {
            cpu_usage_usec: r.cpu_usage_usec,
            memory_usage_bytes: r.memory_usage_bytes,
            pids: r.pids,
        })
    }

    /// The container's processes: (guest pid, guest ppid, command line).
    pub fn processes(&self, id: &str) -> Result<Vec<(u32, u32, String)>, Error> {
        let r = self
            .client
            .list_processes(Self::ctx(), &Self::container(id))
            .map_err(call_err)?;
        Ok(r.processes
            .into_iter()
            .map(|p| (p.pid, p.ppid, p.cmd))
            .collect())
    }

    /// Kills what is left of a container and forgets it.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        self.client
            .remove_container(Self::ctx(), &Self::container(id))
            .map_err(call_err)?;
        Ok(())
    }

    fn container(id: &str) -> ContainerRequest {
        ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        }
    }

    /// Configures the guest's network: interfaces (found by MAC),
    /// addresses, routes, and the DNS settings for containers' resolv.conf
    /// (see [`crate::net::PodNetwork::guest_config`]).
    pub fn configure_network(&self, config: &protocol::agent::NetworkConfig) -> Result<(), Error> {
        self.client
            .configure_network(Self::ctx(), config)
            .map_err(call_err)?;
        Ok(())
    }

    /// Asks the guest to shut down (the VM then ends).
    pub fn shutdown(&self) -> Result<(), Error> {
        self.client
            .shutdown(protocol::ctx(Duration::from_secs(5)), &Empty::new())
            .map_err(call_err)?;
        Ok(())
    }
}

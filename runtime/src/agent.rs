//! The runtime's side of the guest agent API (ttrpc over the vsock bridge).

use std::os::unix::net::UnixStream;
use std::time::Duration;

use protocol::agent::{
    ContainerRequest, CreateContainerRequest, Empty, ExecProcessRequest, ProcessRequest,
    ReadStreamRequest, SignalProcessRequest, TtyWinResizeRequest, WriteStdinRequest,
};
use protocol::agent_ttrpc::AgentClient;

use crate::guest_console::Witnesses;

/// Errors from the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ttrpc connection could not be set up.
    #[error("cannot talk to the guest agent: {0}")]
    Connect(String),
    /// A call failed; the agent's message says why.
    #[error("{0}")]
    Call(String),
    /// A call was not answered in time.
    #[error("the guest agent did not answer {call} within {limit:?}{diagnosis}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// Its limit.
        limit: Duration,
        /// What the guest console and the VMM's threads show, as "; ..." or "".
        diagnosis: String,
    },
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

/// How long the guest may take to acknowledge a shutdown (the VMM is killed
/// after that).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected agent client; clones share the connection.
#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    /// The limit of ordinary (non-blocking) calls.
    call_timeout: Duration,
    /// Where to look to explain a call that timed out.
    witnesses: Witnesses,
}

/// Text the guest chose (an error message, its kernel's name), as it may
/// reach a host terminal, log or Kubernetes event: control characters
/// escaped, at most 1000 characters.
fn guest_text(text: &str) -> String {
    crate::guest_console::escape_within(text, 1000)
}

/// How a process in the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    /// Its exit code, or 128 + the signal that killed it.
    pub status: i32,
    /// A container's init only: the guest's OOM killer killed a process of
    /// the container during its life.
    pub oom_killed: bool,
}

/// An exit status the guest reported, as the host may pass it on: a
/// process's status is 0 to 255; anything else (which `exit(2)` would
/// truncate, 256 into success) is a lying or broken guest, and a failure.
fn exit_status(status: i32) -> i32 {
    if (0..=255).contains(&status) {
        status
    } else {
        log::warn!("the guest reported exit status {status}: taken as 255");
        255
    }
}

/// Whether a ttrpc error is a call's deadline passing.
fn is_timeout(e: &protocol::ttrpc::Error) -> bool {
    match e {
        protocol::ttrpc::Error::RpcStatus(s) => {
            s.code() == protocol::ttrpc::Code::DEADLINE_EXCEEDED
        }
        e => protocol::client::is_timeout(e),
    }
}

impl Agent {
    /// A client on a stream connected to the agent's port, with the default
    /// call limit and no console to explain time-outs.
    pub fn new(stream: UnixStream) -> Result<Agent, Error> {
        let client = protocol::agent_client(stream).map_err(|e| Error::Connect(e.to_string()))?;
        Ok(Agent {
            client,
            call_timeout: crate::timeouts::DEFAULT_CALL,
            witnesses: Witnesses::default(),
        })
    }

    /// The same client with ordinary calls limited to `timeout`, and a
    /// call that times out explained by `witnesses` (the guest console, the
    /// VMM's threads).
    pub fn with_limits(mut self, timeout: Duration, witnesses: Witnesses) -> Agent {
        self.call_timeout = timeout;
        self.witnesses = witnesses;
        self
    }

    fn ctx(&self) -> protocol::ttrpc::context::Context {
        protocol::ctx(self.call_timeout)
    }

    /// Turns a failed `call` into an [`Error`]; a time-out says what the
    /// guest console shows (a stall report, its last line).
    fn call_err(&self, call: &'static str) -> impl Fn(protocol::ttrpc::Error) -> Error + '_ {
        self.call_err_within(call, self.call_timeout)
    }

    /// As [`Agent::call_err`] for a call limited to `limit`.
    fn call_err_within(
        &self,
        call: &'static str,
        limit: Duration,
    ) -> impl Fn(protocol::ttrpc::Error) -> Error + '_ {
        move |e| {
            if is_timeout(&e) {
                let diagnosis = self.witnesses.explain();
                return Error::Timeout {
                    call,
                    limit,
                    diagnosis,
                };
            }
            match e {
                protocol::ttrpc::Error::RpcStatus(s) => Error::Call(guest_text(s.message())),
                other => Error::Call(format!(
                    "the guest agent: {}",
                    guest_text(&other.to_string())
                )),
            }
        }
    }

    /// The guest kernel's release.
    pub fn kernel_release(&self) -> Result<String, Error> {
        let r = self
            .client
            .guest_details(self.ctx(), &Empty::new())
            .map_err(self.call_err("GuestDetails"))?;
        Ok(guest_text(&r.kernel_release))
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
            .create_container(self.ctx(), &req)
            .map_err(self.call_err("CreateContainer"))?;
        Ok(())
    }

    /// Starts the container's process.
    pub fn start(&self, id: &str) -> Result<(), Error> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client
            .start_container(self.ctx(), &req)
            .map_err(self.call_err("StartContainer"))?;
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
        self.wait_exit(id, exec_id).map(|e| e.status)
    }

    /// Waits for a process: how it ended.
    pub fn wait_exit(&self, id: &str, exec_id: &str) -> Result<Exited, Error> {
        let r = self
            .client
            .wait_process(protocol::ctx(Duration::ZERO), &Self::process(id, exec_id))
            .map_err(self.call_err("WaitProcess"))?;
        Ok(Exited {
            status: exit_status(r.status),
            oom_killed: r.oom_killed,
        })
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
            .signal_process(self.ctx(), &req)
            .map_err(self.call_err("SignalProcess"))?;
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
                .map_err(self.call_err("WriteStdin"))?;
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
            .close_stdin(self.ctx(), &Self::process(id, exec_id))
            .map_err(self.call_err("CloseStdin"))?;
        Ok(())
    }

    /// The next chunk of a process's stdout (or stderr); empty at EOF.
    pub fn read_output(&self, id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, Error> {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            len: protocol::OUTPUT_CHUNK,
            ..Default::default()
        };
        let ctx = protocol::ctx(Duration::ZERO);
        let r = if stderr {
            self.client.read_stderr(ctx, &req)
        } else {
            self.client.read_stdout(ctx, &req)
        }
        .map_err(self.call_err(if stderr { "ReadStderr" } else { "ReadStdout" }))?;
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
            .tty_win_resize(self.ctx(), &req)
            .map_err(self.call_err("TtyWinResize"))?;
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
            .exec_process(self.ctx(), &req)
            .map_err(self.call_err("ExecProcess"))?;
        Ok(())
    }

    /// The container's state as the agent sees it.
    pub fn state(&self, id: &str) -> Result<ContainerState, Error> {
        let r = self
            .client
            .state_container(self.ctx(), &Self::container(id))
            .map_err(self.call_err("StateContainer"))?;
        Ok(ContainerState {
            status: r.status,
            guest_pid: r.pid,
            exit_status: exit_status(r.exit_status),
        })
    }

    /// CPU, memory and pids of the container's cgroup in the guest.
    pub fn stats(&self, id: &str) -> Result<Stats, Error> {
        let r = self
            .client
            .stats_container(self.ctx(), &Self::container(id))
            .map_err(self.call_err("StatsContainer"))?;
        Ok(Stats {
            cpu_usage_usec: r.cpu_usage_usec,
            memory_usage_bytes: r.memory_usage_bytes,
            pids: r.pids,
        })
    }

    /// New limits (an OCI `LinuxResources`, JSON) for the container's
    /// cgroup in the guest.
    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), Error> {
        let req = protocol::agent::UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json: resources_json.to_string(),
            ..Default::default()
        };
        self.client
            .update_container(self.ctx(), &req)
            .map_err(self.call_err("UpdateContainer"))?;
        Ok(())
    }

    /// The container's processes: (guest pid, guest ppid, command line).
    pub fn processes(&self, id: &str) -> Result<Vec<(u32, u32, String)>, Error> {
        let r = self
            .client
            .list_processes(self.ctx(), &Self::container(id))
            .map_err(self.call_err("ListProcesses"))?;
        Ok(r.processes
            .into_iter()
            .map(|p| (p.pid, p.ppid, p.cmd))
            .collect())
    }

    /// Kills what is left of a container and forgets it.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        self.client
            .remove_container(self.ctx(), &Self::container(id))
            .map_err(self.call_err("RemoveContainer"))?;
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
            .configure_network(self.ctx(), config)
            .map_err(self.call_err("ConfigureNetwork"))?;
        Ok(())
    }

    /// Grows the VM (see [`crate::vm_size`]): vCPUs online up to `vcpus`,
    /// memory added until `added_mib` MiB are; returns what the guest has
    /// then (vCPUs online, MiB added).
    pub fn resize_vm(&self, vcpus: u8, added_mib: u64) -> Result<(u32, u64), Error> {
        let r = self
            .client
            .resize_vm(
                self.ctx(),
                &protocol::agent::ResizeVmRequest {
                    vcpus: vcpus.into(),
                    hotplug_mib: added_mib,
                    ..Default::default()
                },
            )
            .map_err(self.call_err("ResizeVm"))?;
        Ok((r.vcpus, r.hotplug_mib))
    }

    /// Asks the guest to shut down (the VM then ends).
    pub fn shutdown(&self) -> Result<(), Error> {
        self.client
            .shutdown(protocol::ctx(SHUTDOWN_TIMEOUT), &Empty::new())
            .map_err(self.call_err_within("Shutdown", SHUTDOWN_TIMEOUT))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_status_out_of_range_is_a_failure_never_success() {
        for (reported, host) in [(0, 0), (3, 3), (137, 137), (255, 255)] {
            assert_eq!(exit_status(reported), host);
        }
        for lie in [256, 512, -1, i32::MIN, i32::MAX] {
            assert_eq!(exit_status(lie), 255, "{lie}");
        }
    }

    #[test]
    fn what_the_guest_says_reaches_the_host_escaped_and_bounded() {
        // A hostile agent's error: terminal escapes, a forged second line,
        // and far too much of it.
        let evil = format!(
            "\x1b]0;owned\x07fine\nsandboxvm: forged{}",
            "x".repeat(100_000)
        );
        let text = guest_text(&evil);
        assert!(
            text.starts_with("\\x1b]0;owned\\x07fine\\x0asandboxvm: forged"),
            "{text}"
        );
        assert!(!text.chars().any(char::is_control));
        // 1000 characters kept (an escape shows one as four), then "…".
        assert!(text.ends_with('…') && text.len() < 1100, "{}", text.len());
    }

    #[test]
    fn a_call_the_guest_never_answers_times_out_with_the_console_quoted() {
        // The "guest" end reads nothing and answers nothing.
        let (host, _guest) = UnixStream::pair().unwrap();
        let console = std::env::temp_dir().join(format!(
            "sandboxvm-agent-test-console-{}",
            std::process::id()
        ));
        std::fs::write(
            &console,
            "booting\nrcu: INFO: rcu_sched self-detected stall on CPU\nstill here\n",
        )
        .unwrap();
        let agent = Agent::new(host).unwrap().with_limits(
            Duration::from_millis(200),
            Witnesses {
                console: Some(console.clone()),
                vmm_pid: None,
            },
        );
        let t = std::time::Instant::now();
        let e = agent.state("c1").unwrap_err();
        let _ = std::fs::remove_file(&console);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                Error::Timeout {
                    call: "StateContainer",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.starts_with("the guest agent did not answer StateContainer within 200ms; guest console reports: rcu: INFO"),
            "{msg}"
        );
        assert!(msg.ends_with("and ends: still here"), "{msg}");
    }
}

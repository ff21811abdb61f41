//! The ttrpc `Agent` service.

use std::sync::Arc;

use protocol::agent::*;
use protocol::agent_ttrpc::{create_agent, Agent};
use ttrpc::{Code, TtrpcContext};

use crate::container::{Error, Manager, Stream};

/// The service: container manager + what Shutdown does.
pub struct Service {
    pub manager: Arc<Manager>,
    /// PID 1: Shutdown powers the VM off; test mode: it exits the process.
    pub pid1: bool,
}

fn status(e: Error) -> ttrpc::Error {
    let code = match &e {
        Error::NotFound(_) | Error::ExecNotFound(..) => Code::NOT_FOUND,
        Error::Exists(_) => Code::ALREADY_EXISTS,
        Error::InvalidSpec(_) => Code::INVALID_ARGUMENT,
        Error::State(_) => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    };
    let msg = e.to_string().replace('\n', " ");
    log::warn!("request failed: {msg}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

type R<T> = ttrpc::Result<T>;

impl Agent for Service {
    fn create_container(&self, _: &TtrpcContext, r: CreateContainerRequest) -> R<Empty> {
        self.manager
            .create(
                &r.container_id,
                &r.oci_spec_json,
                &r.share_tag,
                &r.rootfs_subpath,
            )
            .map_err(status)?;
        Ok(Empty::new())
    }
    fn start_container(&self, _: &TtrpcContext, r: ContainerRequest) -> R<Empty> {
        self.manager.start(&r.container_id).map_err(status)?;
        Ok(Empty::new())
    }
    fn exec_process(&self, _: &TtrpcContext, r: ExecProcessRequest) -> R<Empty> {
        self.manager
            .exec(&r.container_id, &r.exec_id, &r.process_json)
            .map_err(status)?;
        Ok(Empty::new())
    }
    fn wait_process(&self, _: &TtrpcContext, r: ProcessRequest) -> R<WaitProcessResponse> {
        let (s, oom_killed) = self
            .manager
            .wait(&r.container_id, &r.exec_id)
            .map_err(status)?;
        Ok(WaitProcessResponse {
            status: s,
            oom_killed,
            ..Default::default()
        })
    }
    fn signal_process(&self, _: &TtrpcContext, r: SignalProcessRequest) -> R<Empty> {
        self.manager
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)
            .map_err(status)?;
        Ok(Empty::new())
    }
    fn write_stdin(&self, _: &TtrpcContext, r: WriteStdinRequest) -> R<WriteStdinResponse> {
        let n = self
            .manager
            .write_stdin(&r.container_id, &r.exec_id, &r.data)
            .map_err(status)?;
        Ok(WriteStdinResponse {
            len: n as u32,
            ..Default::default()
        })
    }
    fn close_stdin(&self, _: &TtrpcContext, r: ProcessRequest) -> R<Empty> {
        self.manager
            .close_stdin(&r.container_id, &r.exec_id)
            .map_err(status)?;
        Ok(Empty::new())
    }
    fn read_stdout(&self, _: &TtrpcContext, r: ReadStreamRequest) -> R<ReadStreamResponse> {
        let data = self
            .manager
            .read(&r.container_id, &r.exec_id, Stream::Stdout, r.len)
            .map_err(status)?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }
    fn read_stderr(&self, _: &TtrpcContext, r: ReadStreamRequest) -> R<ReadStreamResponse> {
        let data = self
            .manager
            .read(&r.container_id, &r.exec_id, Stream::Stderr, r.len)
            .map_err(status)?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }
    fn tty_win_resize(&self, _: &TtrpcContext, r: TtyWinResizeRequest) -> R<Empty> {
        self.manager
            .resize(&r.container_id, &r.exec_id, r.rows, r.cols)
            .map_err(status)?;
        Ok(Empty::new())
    }
    fn state_container(&self, _: &TtrpcContext, r: ContainerRequest) -> R<StateContainerResponse> {
        let (s, pid, exit) = self.manager.state(&r.container_id).map_err(status)?;
        Ok(StateContainerResponse {
            status: s.to_string(),
            pid,
            exit_status: exit,
            ..Default::default()
        })
    }
    fn remove_container(&self, _: &TtrpcContext, r: ContainerRequest) -> R<Empty> {
        self.manager.remove(&r.container_id).map_err(status)?;
        Ok(Empty::new())
    }
    fn update_container(&self, _: &TtrpcContext, r: UpdateContainerRequest) -> R<Empty> {
        self.manager
            .update(&r.container_id, &r.resources_json)
            .map_err(status)?;
        Ok(Empty::new())
    }
    fn stats_container(&self, _: &TtrpcContext, r: ContainerRequest) -> R<StatsContainerResponse> {
        let (cpu, mem, pids) = self.manager.stats(&r.container_id).map_err(status)?;
        Ok(StatsContainerResponse {
            cpu_usage_usec: cpu,
            memory_usage_bytes: mem,
            pids,
            ..Default::default()
        })
    }
    fn list_processes(&self, _: &TtrpcContext, r: ContainerRequest) -> R<ListProcessesResponse> {
        let procs = self.manager.processes(&r.container_id).map_err(status)?;
        Ok(ListProcessesResponse {
            processes: procs
                .into_iter()
                .map(|(pid, ppid, cmd)| ProcessInfo {
                    pid,
                    ppid,
                    cmd,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }
    fn guest_details(&self, _: &TtrpcContext, _: Empty) -> R<GuestDetailsResponse> {
        // SAFETY: utsname is plain old data, filled in by uname(2).
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is a valid, writable utsname.
        let release = if unsafe { libc::uname(&mut u) } == 0 {
            // SAFETY: the kernel NUL-terminates the release field.
            unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        };
        Ok(GuestDetailsResponse {
            kernel_release: release,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }
    fn resize_vm(&self, _: &TtrpcContext, r: ResizeVmRequest) -> R<ResizeVmResponse> {
        use crate::resize;
        let fail = |e: resize::Error| {
            let code = match &e {
                resize::Error::Invalid(_) => Code::FAILED_PRECONDITION,
                resize::Error::Sys { .. } => Code::INTERNAL,
            };
            let msg = format!("resize the VM: {e}");
            log::warn!("request failed: {msg}");
            ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
        };
        // One resize at a time: two would race to add the same blocks.
        static RESIZING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = RESIZING.lock().unwrap_or_else(|e| e.into_inner());
        let sys = resize::SysFs::default();
        let vcpus = resize::online_cpus(&sys, r.vcpus).map_err(fail)?;
        let region = resize::hotplug_region(&resize::cmdline()).map_err(fail)?;
        let want = r.hotplug_mib.saturating_mul(1 << 20);
        let added = resize::add_memory(&sys, region, want).map_err(fail)?;
        log::info!(
            "VM resized: {vcpus} vCPUs online, {} MiB added",
            added >> 20
        );
        Ok(ResizeVmResponse {
            vcpus,
            hotplug_mib: added >> 20,
            ..Default::default()
        })
    }
    fn configure_network(&self, _: &TtrpcContext, r: NetworkConfig) -> R<Empty> {
        crate::network::configure(&r).map_err(|e| {
            let code = match &e {
                crate::network::Error::Invalid(_) => Code::INVALID_ARGUMENT,
                crate::network::Error::NoInterface(_) => Code::NOT_FOUND,
                _ => Code::INTERNAL,
            };
            let msg = format!("configure the network: {e}");
            log::warn!("request failed: {msg}");
            ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
        })?;
        Ok(Empty::new())
    }
    fn shutdown(&self, _: &TtrpcContext, _: Empty) -> R<Empty> {
        let manager = self.manager.clone();
        let pid1 = self.pid1;
        // Answer first, then go down.
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            for id in manager.ids() {
                let _ = manager.remove(&id);
            }
            if pid1 {
                crate::init::power_off("shutdown requested");
            } else {
                log::info!("shutdown requested: exiting");
                std::process::exit(0);
            }
        });
        Ok(Empty::new())
    }
}

/// Binds `addr` (`vsock://-1:1024`, `unix:///path`) and starts serving.
pub fn serve(addr: &str, service: Service) -> ttrpc::Result<ttrpc::Server> {
    let methods = create_agent(Arc::new(service));
    // WaitProcess, ReadStdout, ReadStderr and WriteStdin block for as long
    // as a process runs, per process: ttrpc's default of at most 5 handler
    // threads lets a few of them starve every other call.
    let mut server = ttrpc::Server::new()
        .set_thread_count_default(8)
        .set_thread_count_max(64)
        .bind(addr)?
        .register_service(methods);
    server.start()?;
    Ok(server)
}

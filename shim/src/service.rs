//! The task service containerd calls: one per shim, i.e. per pod. The
//! first container boots the pod's VM; the last one's delete stops it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::events::task::TaskIO;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use sandboxvm::bundle::Bundle;
use sandboxvm::oci::ContainerId;

use crate::container::{Container, Rootfs};
use crate::error::{Error, Result};
use crate::events::{timestamp, Events, Publish};
use crate::pod::Pod;
use crate::process::{Process, State, KILLED};
use crate::spec;
use crate::stdio::Paths;

/// The shim's task service.
pub struct Service {
    namespace: String,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    /// Serializes create and delete (VM boot and teardown among them).
    lifecycle: Mutex<()>,
    pod: Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    /// A service publishing through `publisher`, ending the shim through
    /// `exit`.
    pub fn new(namespace: &str, publisher: impl Publish, exit: Arc<ExitSignal>) -> Service {
        Service {
            namespace: namespace.to_string(),
            events: Arc::new(Events::new(publisher, namespace.to_string())),
            exit,
            lifecycle: Mutex::new(()),
            pod: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn pod(&self) -> Result<Arc<Pod>> {
        lock(&self.pod)
            .clone()
            .ok_or_else(|| Error::State("the pod's VM is not running".into()))
    }

    fn running_pod(&self) -> Result<Arc<Pod>> {
        let pod = self.pod()?;
        if pod.is_paused() {
            return Err(Error::State("the pod's VM is paused".into()));
        }
        Ok(pod)
    }

    fn pid(&self) -> u32 {
        lock(&self.pod).as_ref().map_or(0, |p| p.vmm_pid())
    }

    /// The pod for a container of pod `pod_id`, booted if this is the
    /// first container; true if it was booted now.
    fn pod_for(
        &self,
        pod_id: &str,
        bundle: &Bundle,
        options: &containerd_shim::protos::protobuf::well_known_types::any::Any,
    ) -> Result<(Arc<Pod>, bool)> {
        let mut pod = lock(&self.pod);
        if let Some(p) = pod.as_ref() {
            if p.id != pod_id {
                return Err(Error::Invalid(format!(
                    "this shim runs pod {}, not {pod_id}",
                    p.id
                )));
            }
            return Ok((p.clone(), false));
        }
        // The runtime handler's configuration file (its ConfigPath option),
        // else $SANDBOXVM_CONFIG or the default file.
        let path = crate::options::config_path(options).map_err(Error::Invalid)?;
        let config = sandboxvm::config::Loaded::load(path.as_deref())
            .map_err(|e| Error::Invalid(e.to_string()))?;
        log::info!("pod {pod_id}: configuration from {}", config.name());
        let p = Arc::new(Pod::boot(&self.namespace, pod_id, bundle, &config.config)?);
        *pod = Some(p.clone());
        Ok((p, true))
    }

    fn stop_pod(&self) {
        if let Some(p) = lock(&self.pod).take() {
            p.teardown();
        }
    }

    fn do_create(&self, req: &CreateTaskRequest) -> Result<u32> {
        let _l = lock(&self.lifecycle);
        ContainerId::new(&req.id)?;
        if lock(&self.containers).contains_key(&req.id) {
            return Err(Error::Exists(format!("container {}", req.id)));
        }
        let bundle_dir = Path::new(&req.bundle);
        let rootfs = Rootfs::mount(bundle_dir, &req.rootfs)?;
        let bundle = Bundle::load(bundle_dir)?;
        let spec_json: serde_json::Value =
            serde_json::from_str(&bundle.config_json).unwrap_or_default();
        let pod_id = spec::pod_id(&spec_json, &req.id);
        let (pod, booted) = self.pod_for(&pod_id, &bundle, &req.options)?;
        let sandbox_pid = if spec::is_sandbox(&spec_json) {
            None
        } else {
            pod.agent.state(&pod_id).ok().map(|s| s.guest_pid)
        };
        let c = match Container::create(&pod, req, &bundle, rootfs, sandbox_pid) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                log::warn!("create {}: {e}", req.id);
                for line in pod.console_tail(30) {
                    log::warn!("guest console: {line}");
                }
                if booted || lock(&self.containers).is_empty() {
                    self.stop_pod();
                }
                return Err(e);
            }
        };
        c.init.start_io(&pod);
        c.init.spawn_waiter(&pod, &self.events);
        lock(&self.containers).insert(req.id.clone(), c);
        let io = TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        };
        self.events.create(&req.id, &req.bundle, io, pod.vmm_pid());
        log::info!("created {} in pod {pod_id}", req.id);
        Ok(pod.vmm_pid())
    }

    fn do_start(&self, req: &StartRequest) -> Result<u32> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.state() != State::Created {
            return Err(Error::State(format!(
                "{} was already started",
                p.event_id()
            )));
        }
        let pod = self.running_pod()?;
        let pid = pod.vmm_pid();
        if req.exec_id.is_empty() {
            pod.agent.start(&req.id)?;
            p.set_running();
            self.events.start(&req.id, pid);
        } else {
            if c.init.state() != State::Running {
                return Err(Error::State(format!("container {} is not running", req.id)));
            }
            pod.agent.exec(&req.id, &req.exec_id, &p.spec_json)?;
            p.set_running();
            p.start_io(&pod);
            self.events.exec_started(&req.id, &req.exec_id, pid);
            p.spawn_waiter(&pod, &self.events);
        }
        Ok(pid)
    }

    fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        let _l = lock(&self.lifecycle);
        let c = self.container(&req.id)?;
        let pid = self.pid();
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.state() == State::Running {
                return Err(Error::State(format!("exec {} is running", req.exec_id)));
            }
            p.close_io();
            lock(&c.execs).remove(&req.exec_id);
            let (status, at) = p
                .wait_timeout(Duration::ZERO)
                .unwrap_or((0, SystemTime::now()));
            return Ok(DeleteResponse {
                pid,
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            });
        }
        let pod = self.pod().ok();
        let vm_alive = pod.as_ref().is_some_and(|p| p.check_alive().is_ok());
        if c.init.state() == State::Running && vm_alive {
            return Err(Error::State(format!(
                "cannot delete the running task {}",
                req.id
            )));
        }
        if let Some(pod) = pod.as_ref().filter(|_| vm_alive) {
            if pod.is_paused() {
                let _ = pod.resume();
            }
            if let Err(e) = pod.agent.remove(&req.id) {
                log::warn!("{}: remove: {e}", req.id);
            }
        }
        // A created task killed now, or a VM gone: the waiters end.
        let (status, at) = c
            .init
            .wait_timeout(Duration::from_secs(5))
            .unwrap_or_else(|| {
                c.init.set_exited(KILLED, &self.events, pid);
                c.init.wait()
            });
        for p in c.processes() {
            if p.wait_timeout(Duration::from_secs(1)).is_none() {
                p.set_exited(KILLED, &self.events, pid);
            }
            p.close_io();
        }
        lock(&self.containers).remove(&req.id);
        drop(c);
        self.events.delete(&req.id, pid, status, at);
        if lock(&self.containers).is_empty() {
            self.stop_pod();
        }
        log::info!("deleted {}", req.id);
        Ok(DeleteResponse {
            pid,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn do_exec(&self, req: &ExecProcessRequest) -> Result<()> {
        ContainerId::new(&req.exec_id)?;
        let c = self.container(&req.id)?;
        if c.init.state() != State::Running {
            return Err(Error::State(format!("container {} is not running", req.id)));
        }
        let spec_json = String::from_utf8(req.spec.value.clone())
            .map_err(|_| Error::Invalid("the exec's process spec is not UTF-8 JSON".into()))?;
        let stdio = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(Error::Exists(format!("exec {}", req.exec_id)));
            }
            let p = Process::new(&req.id, &req.exec_id, stdio, spec_json);
            execs.insert(req.exec_id.clone(), p);
        }
        self.events.exec_added(&req.id, &req.exec_id);
        Ok(())
    }

    fn do_kill(&self, req: &KillRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if let State::Stopped(..) = p.state() {
            return Err(Error::NotFound(format!(
                "process {}: process already finished",
                p.event_id()
            )));
        }
        let pod = self.pod()?;
        pod.agent
            .signal_all(&req.id, &req.exec_id, req.signal as i32, req.all)?;
        Ok(())
    }

    fn do_state(&self, req: &StateRequest) -> Result<StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let paused = lock(&self.pod).as_ref().is_some_and(|p| p.is_paused());
        let mut r = StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: self.pid(),
            status: p.status(paused).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        if let State::Stopped(status, at) = p.state() {
            r.exit_status = status;
            r.exited_at = Some(timestamp(at)).into();
        }
        Ok(r)
    }

    /// New limits for a container's cgroup in the guest (the CRI's
    /// UpdateContainerResources): `resources` is an OCI LinuxResources,
    /// JSON in an Any as containerd marshals it. The pod's VM grows first
    /// if they need more than it has ([`sandboxvm::vm_size`]); beyond its
    /// ceiling they are refused.
    fn do_update(&self, req: &UpdateTaskRequest) -> Result<()> {
        self.container(&req.id)?;
        let json = std::str::from_utf8(&req.resources.value)
            .map_err(|_| Error::Invalid("update: the resources are not JSON".into()))?;
        let parsed: oci_spec::runtime::LinuxResources = serde_json::from_str(json)
            .map_err(|e| Error::Invalid(format!("update: resources: {e}")))?;
        let pod = self.running_pod()?;
        lock(&pod.size)
            .grow_for(&pod.agent, &parsed, pod.vmm_pid())
            .map_err(|e| Error::Invalid(format!("container {}: {e}", req.id)))?;
        pod.agent.update(&req.id, json)?;
        log::info!("updated the resources of {}", req.id);
        Ok(())
    }

    fn do_stats(&self, req: &StatsRequest) -> Result<StatsResponse> {
        self.container(&req.id)?;
        let s = self.running_pod()?.agent.stats(&req.id)?;
        let metrics = Metrics {
            cpu: Some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStat {
                usage: s.memory_usage_bytes,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStat {
                current: s.pids,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| Error::Invalid(format!("encode metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        self.container(&req.id)?;
        let procs = self.running_pod()?.agent.processes(&req.id)?;
        Ok(PidsResponse {
            processes: procs
                .into_iter()
                .map(|(pid, _, _)| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.container(id)?;
        if c.init.state() != State::Running {
            return Err(Error::State(format!("container {id} is not running")));
        }
        let pod = self.pod()?;
        if pause {
            pod.pause()?;
            self.events.paused(id);
        } else {
            pod.resume()?;
            self.events.resumed(id);
        }
        Ok(())
    }

    /// Stops everything and lets the shim exit (on SIGTERM).
    pub fn shutdown_now(&self) {
        self.do_shutdown(true);
    }

    fn do_shutdown(&self, now: bool) {
        let _l = lock(&self.lifecycle);
        if !now && !lock(&self.containers).is_empty() {
            return;
        }
        lock(&self.containers).clear();
        self.stop_pod();
        self.events.flush(Duration::from_secs(5));
        self.exit.signal();
    }
}

impl containerd_shim::Task for Service {
    fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.do_create(&req)?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.do_start(&req)?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(self.do_delete(&req)?)
    }

    fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.do_exec(&req)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.container(&req.id)?;
        self.running_pod()?
            .agent
            .resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(Error::from)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let c = self.container(&req.id)?;
        c.process(&req.exec_id)?;
        if req.stdin {
            if let Err(e) = self.pod()?.agent.close_stdin(&req.id, &req.exec_id) {
                log::debug!("{} {}: close stdin: {e}", req.id, req.exec_id);
            }
        }
        Ok(Empty::new())
    }

    fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.do_state(&req)?)
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.do_kill(&req)?;
        Ok(Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        drop(c);
        let (status, at) = p.wait();
        Ok(WaitResponse {
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        Ok(self.do_pids(&req)?)
    }

    fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.do_update(&req)?;
        Ok(Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(self.do_stats(&req)?)
    }

    fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.do_pause(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.do_pause(&req.id, false)?;
        Ok(Empty::new())
    }

    fn connect(&self, _: &TtrpcContext, _req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.do_shutdown(req.now);
        Ok(Empty::new())
    }
}

//! A task process (a container's init or an exec): its state as containerd
//! sees it, its stdio relay, and the thread that waits for its exit in the
//! guest and publishes it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api::Status;

use crate::events::Events;
use crate::pod::Pod;
use crate::stdio::{Paths, Relay};

/// Exit status of a process that never ran or whose VM is gone: as if
/// SIGKILLed.
pub const KILLED: u32 = 128 + 9;

/// What is known of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Created, not started.
    Created,
    /// Started.
    Running,
    /// Exited with this status at this time.
    Stopped(u32, SystemTime),
}

/// One process of a task.
pub struct Process {
    /// The container.
    pub cid: String,
    /// "" for the container's init.
    pub exec_id: String,
    /// Its stdio.
    pub stdio: Paths,
    /// An exec's OCI process, as JSON.
    pub spec_json: String,
    state: Mutex<State>,
    exited: Condvar,
    relay: Mutex<Option<Relay>>,
}

impl Process {
    /// A process in state Created.
    pub fn new(cid: &str, exec_id: &str, stdio: Paths, spec_json: String) -> Arc<Process> {
        Arc::new(Process {
            cid: cid.into(),
            exec_id: exec_id.into(),
            stdio,
            spec_json,
            state: Mutex::new(State::Created),
            exited: Condvar::new(),
            relay: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.lock()
    }

    /// The id containerd uses in exit events: the container's for init.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.cid
        } else {
            &self.exec_id
        }
    }

    /// Created -> Running.
    pub fn set_running(&self) {
        let mut s = self.lock();
        if *s == State::Created {
            *s = State::Running;
        }
    }

    /// Records the exit (once) and publishes TaskExit while holding the
    /// state, so that whoever sees Stopped knows the event is queued.
    pub fn set_exited(&self, status: u32, events: &Events, pid: u32) {
        let mut s = self.lock();
        if matches!(*s, State::Stopped(..)) {
            return;
        }
        let at = SystemTime::now();
        *s = State::Stopped(status, at);
        events.exit(&self.cid, self.event_id(), pid, status, at);
        drop(s);
        self.exited.notify_all();
    }

    /// Blocks until the process has exited; its status and time.
    pub fn wait(&self) -> (u32, SystemTime) {
        let mut s = self.lock();
        loop {
            if let State::Stopped(code, at) = *s {
                return (code, at);
            }
            s = self.exited.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// As [`Process::wait`], giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<(u32, SystemTime)> {
        let s = self.lock();
        let (s, _) = self
            .exited
            .wait_timeout_while(s, timeout, |s| !matches!(s, State::Stopped(..)))
            .unwrap_or_else(|e| e.into_inner());
        match *s {
            State::Stopped(code, at) => Some((code, at)),
            _ => None,
        }
    }

    /// The state as containerd's task status.
    pub fn status(&self, paused: bool) -> Status {
        match self.state() {
            State::Created => Status::CREATED,
            State::Running if paused => Status::PAUSED,
            State::Running => Status::RUNNING,
            State::Stopped(..) => Status::STOPPED,
        }
    }

    /// Starts relaying stdio (once the agent has the process's pipes).
    pub fn start_io(&self, pod: &Pod) {
        let relay = Relay::start(&pod.agent, &self.cid, &self.exec_id, &self.stdio);
        *self.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay);
    }

    /// Frees the stdio relay: closes the host side of its streams and
    /// releases a stdin thread still waiting for a writer.
    pub fn close_io(&self) {
        if let Some(mut r) = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            r.release_stdin();
            r.finish(Duration::ZERO);
        }
    }

    /// Starts the thread that waits for the process in the guest: the
    /// output drains (up to a moment), then the exit is recorded and
    /// published. A lost agent (dead VM) counts as a kill.
    pub fn spawn_waiter(self: &Arc<Self>, pod: &Arc<Pod>, events: &Arc<Events>) {
        let (p, pod, events) = (self.clone(), pod.clone(), events.clone());
        std::thread::spawn(move || {
            let status = match pod.agent.wait_exit(&p.cid, &p.exec_id) {
                Ok(e) => {
                    if e.oom_killed {
                        // Before the exit, so the CRI has the reason
                        // (OOMKilled) when it sees the container exited.
                        log::info!("{}: the guest's OOM killer killed a process", p.cid);
                        events.oom(&p.cid);
                    }
                    u32::try_from(e.status).unwrap_or(KILLED)
                }
                Err(e) => {
                    let why = pod.check_alive().err().map(|e| e.to_string());
                    log::warn!(
                        "{} {}: lost the process: {}",
                        p.cid,
                        p.exec_id,
                        why.unwrap_or_else(|| e.to_string())
                    );
                    KILLED
                }
            };
            let relay = p.relay.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut r) = relay {
                r.finish(Duration::from_secs(2));
                *p.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            }
            log::info!("{} {}: exited with status {status}", p.cid, p.exec_id);
            p.set_exited(status, &events, pod.vmm_pid());
        });
    }
}

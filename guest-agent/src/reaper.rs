//! The agent's own `waitpid` loop.
//!
//! The agent is PID 1 in the guest (or a child subreaper on the host in test
//! mode), so it inherits orphans and must reap everything. One thread owns
//! `waitpid(-1)`; nothing else in the agent waits for children (no
//! `std::process::Child::wait`), so exit statuses cannot be stolen.
//!
//! Race-free registration: a process is spawned while holding the reaper
//! lock ([`Reaper::lock`]) and registered before the lock is released, so the
//! reaper thread (which needs the lock to record an exit) cannot record the
//! exit of a pid before it is known. Exits of unknown pids (orphans, the
//! intermediate processes of double forks) are reaped and dropped.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Exit statuses of the processes the agent started.
#[derive(Default)]
pub struct Table {
    /// pid -> None while running, Some(status) once reaped.
    procs: HashMap<i32, Option<i32>>,
}

impl Table {
    /// Registers a process the agent just started.
    pub fn register(&mut self, pid: i32) {
        self.procs.insert(pid, None);
    }

    /// Forgets a process (after its container is removed).
    pub fn forget(&mut self, pid: i32) {
        self.procs.remove(&pid);
    }

    /// The exit status if the process was reaped.
    pub fn status(&self, pid: i32) -> Option<i32> {
        self.procs.get(&pid).copied().flatten()
    }
}

/// The process table plus the condition variable signalled on each exit.
pub struct Reaper {
    table: Mutex<Table>,
    exited: Condvar,
    spawned: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// The global reaper; starts its thread on first use.
pub fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(|| reaper().run())
            .expect("spawn the reaper thread");
        Reaper {
            table: Mutex::new(Table::default()),
            exited: Condvar::new(),
            spawned: Condvar::new(),
        }
    })
}

/// `status` as an exit code or 128 + signal.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

impl Reaper {
    /// Locks the table: hold the guard across fork + register.
    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the reaper thread after a spawn (it sleeps when there are no
    /// children).
    pub fn notify_spawned(&self) {
        self.spawned.notify_all();
    }

    /// Blocks until `pid` exits; returns its status.
    pub fn wait(&self, pid: i32) -> i32 {
        let mut t = self.lock();
        loop {
            match t.procs.get(&pid) {
                Some(Some(status)) => return *status,
                // Unknown pids never get a status: report it as a failure
                // rather than blocking forever.
                None => return 255,
                Some(None) => {}
            }
            t = self.exited.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`Reaper::wait`] but gives up after `timeout`.
    pub fn wait_timeout(&self, pid: i32, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        let mut t = self.lock();
        loop {
            match t.procs.get(&pid) {
                Some(Some(status)) => return Some(*status),
                None => return None,
                Some(None) => {}
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            t = self
                .exited
                .wait_timeout(t, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn run(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
                Ok(ws) => {
                    let mut t = self.lock();
                    self.record(&mut t, ws);
                }
                Err(Errno::EINTR) => {}
                Err(_) => {
                    // ECHILD: no children right now. Re-check under the lock
                    // (spawns hold it), then sleep until a spawn notifies us
                    // (or a second passes, for orphans reparented to us).
                    let mut t = self.lock();
                    match waitpid(
                        Pid::from_raw(-1),
                        Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
                    ) {
                        Err(Errno::ECHILD) => {
                            let _ = self.spawned.wait_timeout(t, Duration::from_secs(1));
                        }
                        Ok(ws) => self.record(&mut t, ws),
                        Err(_) => {}
                    }
                }
            }
        }
    }

    fn record(&self, t: &mut Table, ws: WaitStatus) {
        let (Some(pid), Some(code)) = (ws.pid(), exit_code(ws)) else {
            return;
        };
        if let Some(slot) = t.procs.get_mut(&pid.as_raw()) {
            log::debug!("process {pid} exited with status {code}");
            *slot = Some(code);
            self.exited.notify_all();
        }
    }
}

//! A device worker thread: an epoll loop over the fds a device's queue
//! handling waits on (queue notify eventfds, back-end sockets), plus a kill
//! eventfd that ends it.
//!
//! ```ignore
//! let handle = worker::spawn("vsock", handler)?; // handler: impl EventHandler
//! // ...
//! handle.stop(); // or drop it: signals the kill eventfd and joins
//! ```

use std::io;
use std::os::unix::io::RawFd;
use std::thread::JoinHandle;

use log::error;
pub use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The token of the kill eventfd; handlers must not use it.
pub const KILL_TOKEN: u64 = u64::MAX;

/// Adds, changes and removes the fds the worker waits on.
pub struct EpollCtl<'a> {
    epoll: &'a Epoll,
}

impl EpollCtl<'_> {
    /// Waits for `events` on `fd`; [`EventHandler::handle`] gets `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes the events (and token) of an fd already added.
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops waiting on `fd` (closing it also does).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a worker thread runs.
pub trait EventHandler: Send + 'static {
    /// Called once on the worker thread before the loop: add the fds to
    /// wait on. An error ends the worker.
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()>;
    /// The fd added with `token` has `events`.
    fn handle(&mut self, ctl: &EpollCtl, token: u64, events: EventSet);
}

/// A running worker thread. Dropping it (or [`WorkerHandle::stop`]) ends
/// the thread and waits for it.
pub struct WorkerHandle {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Ends the worker thread and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Whether the thread has ended (by itself, after an error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.kill.write(1) {
                error!("worker: kill eventfd: {e}");
            }
            if thread.join().is_err() {
                error!("worker: the thread panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What every worker thread runs first (the VMM installs its seccomp
/// filter there); a failure ends the thread before it touches guest data.
static THREAD_START: std::sync::OnceLock<fn() -> io::Result<()>> = std::sync::OnceLock::new();

/// Sets what every worker thread runs first (once per process).
pub fn set_thread_start(f: fn() -> io::Result<()>) {
    let _ = THREAD_START.set(f);
}

/// Runs `handler` on a new thread called `name`.
pub fn spawn<H: EventHandler>(name: &str, mut handler: H) -> io::Result<WorkerHandle> {
    let kill = EventFd::new(EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        std::os::unix::io::AsRawFd::as_raw_fd(&kill),
        EpollEvent::new(EventSet::IN, KILL_TOKEN),
    )?;
    let thread_kill = kill.try_clone()?;
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _kill = thread_kill; // keeps the fd open while we wait on it
            if let Some(start) = THREAD_START.get() {
                if let Err(e) = start() {
                    error!("worker: {e}");
                    return;
                }
            }
            let ctl = EpollCtl { epoll: &epoll };
            if let Err(e) = handler.init(&ctl) {
                error!("worker: setting up: {e}");
                return;
            }
            let mut events = vec![EpollEvent::default(); 64];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!("worker: epoll_wait: {e}");
                        return;
                    }
                };
                for ev in &events[..n] {
                    if ev.data() == KILL_TOKEN {
                        return;
                    }
                }
                for ev in &events[..n] {
                    handler.handle(&ctl, ev.data(), ev.event_set());
                }
            }
        })?;
    Ok(WorkerHandle {
        kill,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::AsRawFd;
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;

    use super::*;

    struct Echo {
        evts: Vec<EventFd>,
        seen: Sender<u64>,
    }

    impl EventHandler for Echo {
        fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
            for (i, e) in self.evts.iter().enumerate() {
                ctl.add(e.as_raw_fd(), i as u64, EventSet::IN)?;
            }
            Ok(())
        }
        fn handle(&mut self, ctl: &EpollCtl, token: u64, events: EventSet) {
            assert!(events.contains(EventSet::IN));
            let evt = &self.evts[token as usize];
            evt.read().unwrap();
            if token == 1 {
                // One-shot: stop watching the second eventfd.
                ctl.remove(evt.as_raw_fd()).unwrap();
            }
            self.seen.send(token).unwrap();
        }
    }

    #[test]
    fn dispatches_by_token_and_stops() {
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let clones: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let (tx, rx) = channel();
        let handle = spawn("test-worker", Echo { evts, seen: tx }).unwrap();
        let t = Duration::from_secs(5);
        clones[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(t).unwrap(), 0);
        clones[1].write(1).unwrap();
        assert_eq!(rx.recv_timeout(t).unwrap(), 1);
        clones[1].write(1).unwrap(); // removed: not seen
        clones[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(t).unwrap(), 0);
        assert!(!handle.is_finished());
        handle.stop();
        // The handler (and its sender) went away with the thread.
        assert!(rx.recv_timeout(t).is_err());
    }

    struct FailInit;
    impl EventHandler for FailInit {
        fn init(&mut self, _ctl: &EpollCtl) -> io::Result<()> {
            Err(io::Error::other("no"))
        }
        fn handle(&mut self, _: &EpollCtl, _: u64, _: EventSet) {}
    }

    #[test]
    fn dropping_the_handle_joins_even_after_a_failed_init() {
        let handle = spawn("test-fail", FailInit).unwrap();
        for _ in 0..500 {
            if handle.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(handle.is_finished());
        drop(handle);
    }
}

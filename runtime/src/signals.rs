//! Signals the runtime forwards to the container (SIGINT, SIGTERM, SIGHUP,
//! SIGQUIT, SIGUSR1/2) or acts on (SIGWINCH), collected on a thread; and
//! SIGCHLD, which only wakes a waiter (a child, the VMM or virtiofsd, may
//! have died).

use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::Signals;

type Wake = Arc<Mutex<Option<Box<dyn Fn() + Send>>>>;

/// Collects the signals; [`Forwarder::pending`] takes them.
pub struct Forwarder {
    pending: Arc<Mutex<Vec<i32>>>,
    wake: Wake,
    handle: signal_hook::iterator::Handle,
}

/// While it lives, each signal calls the function given to
/// [`Forwarder::wake_with`].
pub struct Waking<'a>(&'a Forwarder);

impl Drop for Waking<'_> {
    fn drop(&mut self) {
        *self.0.wake.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Forwarder {
    /// Installs the handlers (replacing the default actions, so SIGINT no
    /// longer kills the runtime before it has cleaned up).
    pub fn install() -> std::io::Result<Forwarder> {
        let mut signals = Signals::new([
            SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCHLD,
        ])?;
        let handle = signals.handle();
        let pending = Arc::new(Mutex::new(Vec::new()));
        let wake = Wake::default();
        let (sink, waker) = (pending.clone(), wake.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig != SIGCHLD {
                        sink.lock().unwrap_or_else(|e| e.into_inner()).push(sig);
                    }
                    if let Some(wake) = &*waker.lock().unwrap_or_else(|e| e.into_inner()) {
                        wake();
                    }
                }
            })?;
        Ok(Forwarder {
            pending,
            wake,
            handle,
        })
    }

    /// The signals received since the last call, in order (never SIGCHLD).
    pub fn pending(&self) -> Vec<i32> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Calls `wake` on the signal thread after each signal from now on
    /// (one for [`Forwarder::pending`], or SIGCHLD), until the guard drops:
    /// a waiter blocks until then instead of polling.
    pub fn wake_with(&self, wake: impl Fn() + Send + 'static) -> Waking<'_> {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(wake));
        Waking(self)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}

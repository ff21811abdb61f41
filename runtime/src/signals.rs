//! Signals the runtime forwards to the container (SIGINT, SIGTERM, SIGHUP,
//! SIGQUIT, SIGUSR1/2) or acts on (SIGWINCH), collected on a thread.

use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::Signals;

/// Collects the signals; [`Forwarder::pending`] takes them.
pub struct Forwarder {
    pending: Arc<Mutex<Vec<i32>>>,
    handle: signal_hook::iterator::Handle,
}

impl Forwarder {
    /// Installs the handlers (replacing the default actions, so SIGINT no
    /// longer kills the runtime before it has cleaned up).
    pub fn install() -> std::io::Result<Forwarder> {
        let mut signals =
            Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH])?;
        let handle = signals.handle();
        let pending = Arc::new(Mutex::new(Vec::new()));
        let sink = pending.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(sig);
                }
            })?;
        Ok(Forwarder { pending, handle })
    }

    /// The signals received since the last call, in order.
    pub fn pending(&self) -> Vec<i32> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}

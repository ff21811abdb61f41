//! What every virtio device here keeps the same way (as Cloud
//! Hypervisor's `VirtioCommon`): the features it offers and those the
//! driver accepted, its queues' sizes, and the worker thread that serves
//! the queues once the driver is ready, stopped on reset and when the
//! device goes.
//!
//! A device holds one as its first field, so that the worker stops before
//! anything it uses is dropped (fields drop in order).

use crate::virtio::worker::{self, EventHandler, WorkerHandle};
use crate::virtio::{ActivateError, ActiveQueue};

/// Features, queue sizes and the worker of one device.
pub struct DeviceCommon {
    offered: u64,
    acked: u64,
    queue_sizes: Vec<u16>,
    worker: Option<WorkerHandle>,
}

impl DeviceCommon {
    /// A device that offers `features` and has queues of `queue_sizes`.
    pub fn new(features: u64, queue_sizes: Vec<u16>) -> Self {
        DeviceCommon {
            offered: features,
            acked: 0,
            queue_sizes,
            worker: None,
        }
    }

    /// The features offered.
    pub fn features(&self) -> u64 {
        self.offered
    }

    /// The features the driver accepted: what it wrote, of those offered.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Records the driver's features (only the offered ones count).
    pub fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    /// The maximum size of each queue.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// The driver's ready queues, one for each of the device's, or the
    /// error activation returns.
    pub fn queues<const N: usize>(
        &self,
        queues: Vec<ActiveQueue>,
    ) -> Result<[ActiveQueue; N], ActivateError> {
        let (want, got) = (self.queue_sizes.len(), queues.len());
        debug_assert_eq!(N, want, "the device's own queue count");
        queues
            .try_into()
            .map_err(|_| ActivateError::Queues { want, got })
    }

    /// Serves the queues with `handler` on a worker thread called `name`
    /// (after stopping the one a previous activation started).
    pub fn start_worker<H: EventHandler>(
        &mut self,
        name: &str,
        handler: H,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        let worker = worker::spawn(name, handler)
            .map_err(|e| ActivateError::Backend(format!("{name} worker: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Stops the worker thread, if one runs, and waits for it.
    pub fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    /// Whether the worker thread is running.
    pub fn is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// The driver reset the device: the worker stops and the features are
    /// forgotten.
    pub fn reset(&mut self) {
        self.stop_worker();
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::worker::{EpollCtl, EventSet};

    struct Idle;
    impl EventHandler for Idle {
        fn init(&mut self, _: &EpollCtl) -> io::Result<()> {
            Ok(())
        }
        fn handle(&mut self, _: &EpollCtl, _: u64, _: EventSet) {}
    }

    fn queue() -> ActiveQueue {
        ActiveQueue {
            queue: <virtio_queue::Queue as virtio_queue::QueueT>::new(16).unwrap(),
            notify: EventFd::new(0).unwrap(),
        }
    }

    #[test]
    fn acks_only_offered_features_and_checks_the_queue_count() {
        let mut c = DeviceCommon::new(0b1010, vec![16, 16]);
        c.ack_features(0b1111);
        assert_eq!(c.acked_features(), 0b1010);
        assert!(matches!(
            c.queues::<2>(vec![queue()]),
            Err(ActivateError::Queues { want: 2, got: 1 })
        ));
        assert!(c.queues::<2>(vec![queue(), queue()]).is_ok());
        c.reset();
        assert_eq!(c.acked_features(), 0);
    }

    #[test]
    fn the_worker_runs_until_reset_and_a_new_start_replaces_it() {
        let mut c = DeviceCommon::new(0, vec![16]);
        assert!(!c.is_running());
        c.start_worker("test-a", Idle).unwrap();
        assert!(c.is_running());
        c.start_worker("test-b", Idle).unwrap();
        assert!(c.is_running());
        c.reset();
        assert!(!c.is_running());
    }
}

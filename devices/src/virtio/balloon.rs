//! virtio-balloon for free page reporting (`VIRTIO_BALLOON_F_REPORTING`):
//! the guest tells the device which blocks of its memory are free (Linux
//! reports free blocks of 2 MiB and more, a few seconds after they are
//! freed) and the device gives the host pages behind them back. Guest RAM
//! is a shared memfd, so that is `MADV_REMOVE`: a hole in the file, gone
//! from virtiofsd's mapping too; the guest reads zeros there when it uses
//! the memory again. An idle guest thus costs the host what it uses, not
//! what it once touched (the initramfs it unpacked, a build that ended).
//!
//! The device never asks the guest to inflate (`num_pages` stays 0). The
//! inflate and deflate queues, which a driver always sets up, get their
//! buffers back unread.
//!
//! Everything on the queues comes from the guest: a reported range must
//! be page-aligned and lie inside one region of guest memory, or it is
//! skipped (with a rate-limited warning) and its buffer returned. Giving
//! back the pages of a range the guest still uses only hurts that guest.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::virtio::common::DeviceCommon;
use crate::virtio::worker::{EpollCtl, EventHandler, EventSet};
use crate::virtio::{
    device_type, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::warn_limited as warn;

/// `VIRTIO_BALLOON_F_REPORTING` (free page reporting).
pub const F_REPORTING: u64 = 1 << 5;
/// Queue size: Linux reports at most 32 ranges per request, one request at
/// a time.
pub const QUEUE_SIZE: u16 = 64;
/// The queues with only [`F_REPORTING`] offered: inflate, deflate,
/// reporting (a driver numbers only the queues of features it took).
const QUEUES: usize = 3;
const REPORTING: usize = 2;
/// The granule of guest pages.
const PAGE: u64 = 4096;

/// The virtio-balloon device.
pub struct Balloon {
    common: DeviceCommon,
    /// `actual`: the pages the driver says it gave up (config space).
    actual: u32,
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl Balloon {
    /// A device that offers free page reporting.
    pub fn new() -> Self {
        Balloon {
            common: DeviceCommon::new(VIRTIO_F_VERSION_1 | F_REPORTING, vec![QUEUE_SIZE; QUEUES]),
            actual: 0,
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn common(&self) -> &DeviceCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }

    /// `num_pages` (always 0) then `actual`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.common.acked_features() & F_REPORTING == 0 {
            // A driver without reporting sets up two queues and never
            // reports: nothing to serve.
            return Ok(());
        }
        let queues = self.common.queues::<QUEUES>(queues)?;
        let handler = Handler {
            mem,
            interrupt,
            queues,
        };
        self.common.start_worker("balloon", handler)
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        self.actual = 0;
        true
    }
}

/// The worker's queues.
struct Handler {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: [ActiveQueue; QUEUES],
}

impl EventHandler for Handler {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        for (token, q) in self.queues.iter().enumerate() {
            ctl.add(q.notify.as_raw_fd(), token as u64, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle(&mut self, _ctl: &EpollCtl, token: u64, _events: EventSet) {
        let Some(q) = usize::try_from(token)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            return;
        };
        let _ = q.notify.read();
        let discard = token == REPORTING as u64;
        if serve(&self.mem, &mut q.queue, discard) {
            if let Err(e) = self.interrupt.signal_used() {
                warn!("balloon: interrupt: {e}");
            }
        }
    }
}

/// Returns every available buffer of `queue`, first giving back the host
/// pages behind each of its ranges if `discard` (the reporting queue);
/// whether the driver wants an interrupt for them.
pub fn serve(mem: &GuestMemoryMmap, queue: &mut Queue, discard: bool) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        if discard {
            for desc in chain {
                if let Err(e) = give_back(mem, desc.addr(), u64::from(desc.len())) {
                    warn!("balloon: reported range skipped: {e}");
                }
            }
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            warn!("balloon: add_used: {e}");
        }
        used = true;
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

/// Gives the host pages behind guest range `addr`+`len` back: a hole in a
/// shared mapping's file (`MADV_REMOVE`), or for private memory (a
/// template's copy-on-write mapping, unit tests' anonymous mappings)
/// dropped pages (`MADV_DONTNEED`: the guest's own copies go, and the range
/// reads as the template again, which a freed page may).
pub fn give_back(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> io::Result<()> {
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len:#x} bytes at {:#x}: {why}", addr.0),
        )
    };
    if len == 0 || !addr.0.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(bad("not whole pages"));
    }
    let len_usize = usize::try_from(len).map_err(|_| bad("too long"))?;
    let slice = mem
        .get_slice(addr, len_usize)
        .map_err(|_| bad("not inside one region of guest memory"))?;
    let host = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `host`..+`len` is inside one mapping of guest memory (checked
    // by `get_slice`) and page-aligned (regions are, and `addr`'s offset is
    // a multiple of the page size). Dropping its pages changes only what
    // the guest reads there (zeros), never this process's own memory.
    let rc = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_REMOVE) };
    if rc == 0 {
        return Ok(());
    }
    // A private mapping (EINVAL), of a read-only file (EACCES: a template's
    // memory, mapped copy-on-write): its pages are dropped instead.
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EACCES)) {
        return Err(e);
    }
    // SAFETY: as above.
    if unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[path = "balloon_tests.rs"]
mod tests;

//! The glue between the guest's virtqueues and the [`Muxer`]: a
//! [`GuestQueues`] over real split virtqueues, and the worker's
//! [`EventHandler`] that runs the muxer whenever a queue is notified or a
//! host socket is ready.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::{error_limited as error, warn_limited as warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::connection::MAX_PKT_DATA;
use super::muxer::{GuestQueues, Muxer};
use super::packet::{Header, Payload};
use crate::virtio::worker::{EpollCtl, EventHandler, EventSet};
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Errors handling the queues.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A descriptor chain did not hold a vsock packet.
    #[error("malformed vsock packet: {0}")]
    Packet(virtio_vsock::packet::Error),
    /// Guest memory could not be accessed.
    #[error("vsock guest memory access: {0}")]
    Memory(String),
}

/// The guest's rx and tx split virtqueues.
pub struct VirtqQueues<'a> {
    mem: &'a GuestMemoryMmap,
    rx: &'a mut Queue,
    tx: &'a mut Queue,
    interrupt: Option<&'a VirtioInterrupt>,
    rx_used: bool,
    tx_used: bool,
}

impl<'a> VirtqQueues<'a> {
    /// Wraps the queues; `interrupt` is raised by [`GuestQueues::notify`].
    pub fn new(
        mem: &'a GuestMemoryMmap,
        rx: &'a mut Queue,
        tx: &'a mut Queue,
        interrupt: Option<&'a VirtioInterrupt>,
    ) -> Self {
        VirtqQueues {
            mem,
            rx,
            tx,
            interrupt,
            rx_used: false,
            tx_used: false,
        }
    }

    /// Decodes the guest's next tx packet and hands it to `f` (its payload
    /// in guest memory); the chain goes back to the guest afterwards,
    /// whether it held a packet or garbage.
    fn read_tx(
        &mut self,
        f: &mut dyn FnMut(&Header, Option<&Payload<'_>>),
    ) -> Option<Result<(), Error>> {
        let mut chain = self.tx.pop_descriptor_chain(self.mem)?;
        let head = chain.head_index();
        let result = VsockPacket::from_tx_virtq_chain(self.mem, &mut chain, MAX_PKT_DATA as u32)
            .map_err(Error::Packet)
            .and_then(|pkt| {
                let hdr = Header {
                    src_cid: pkt.src_cid(),
                    dst_cid: pkt.dst_cid(),
                    src_port: pkt.src_port(),
                    dst_port: pkt.dst_port(),
                    len: pkt.len(),
                    type_: pkt.type_(),
                    op: pkt.op(),
                    flags: pkt.flags(),
                    buf_alloc: pkt.buf_alloc(),
                    fwd_cnt: pkt.fwd_cnt(),
                };
                let data = match (pkt.data_slice(), hdr.len) {
                    (_, 0) => None,
                    (Some(slice), len) => Some(
                        slice
                            .subslice(0, len as usize)
                            .map_err(|e| Error::Memory(e.to_string()))?,
                    ),
                    (None, _) => return Err(Error::Memory("payload without a buffer".into())),
                };
                f(&hdr, data.as_ref());
                Ok(())
            });
        if let Err(e) = self.tx.add_used(self.mem, head, 0) {
            error!("vsock: tx add_used: {e}");
        }
        self.tx_used = true;
        Some(result)
    }

    /// Offers the next usable rx chain's payload room to `f` and writes the
    /// header it returns; the chain is used only then. Unusable chains are
    /// given back empty on the way.
    fn write_rx(
        &mut self,
        f: &mut dyn FnMut(&Payload<'_>) -> Option<Header>,
    ) -> Option<Result<bool, Error>> {
        loop {
            let mut chain = self.rx.pop_descriptor_chain(self.mem)?;
            let head = chain.head_index();
            let mut v = match VsockPacket::from_rx_virtq_chain(self.mem, &mut chain, u32::MAX) {
                Ok(v) => v,
                Err(e) => {
                    warn!("vsock: unusable rx buffer: {e}");
                    self.used_rx(head, 0);
                    continue;
                }
            };
            let mut none = [0u8; 0];
            let empty = Payload::from(&mut none[..]);
            let room = v.data_slice().copied().unwrap_or(empty);
            let Some(h) = f(&room) else {
                self.rx.go_to_previous_position();
                return Some(Ok(false));
            };
            let mem_err = |e: vm_memory::VolatileMemoryError| Error::Memory(e.to_string());
            let result = v
                .header_slice()
                .write_slice(&[0u8; PKT_HEADER_SIZE], 0)
                .map_err(mem_err)
                .map(|()| {
                    v.set_src_cid(h.src_cid)
                        .set_dst_cid(h.dst_cid)
                        .set_src_port(h.src_port)
                        .set_dst_port(h.dst_port)
                        .set_type(h.type_)
                        .set_op(h.op)
                        .set_flags(h.flags)
                        .set_buf_alloc(h.buf_alloc)
                        .set_fwd_cnt(h.fwd_cnt)
                        .set_len(h.len);
                });
            let len = match result {
                Ok(()) => PKT_HEADER_SIZE as u32 + h.len,
                Err(_) => 0,
            };
            self.used_rx(head, len);
            return Some(result.map(|()| true));
        }
    }

    fn used_rx(&mut self, head: u16, len: u32) {
        if let Err(e) = self.rx.add_used(self.mem, head, len) {
            error!("vsock: rx add_used: {e}");
        }
        self.rx_used = true;
    }
}

impl GuestQueues for VirtqQueues<'_> {
    fn pop_tx(&mut self, f: &mut dyn FnMut(&Header, Option<&Payload<'_>>)) -> bool {
        loop {
            match self.read_tx(f) {
                None => return false,
                Some(Ok(())) => return true,
                Some(Err(e)) => warn!("vsock: tx: {e}"),
            }
        }
    }

    fn push_rx(&mut self, f: &mut dyn FnMut(&Payload<'_>) -> Option<Header>) -> Option<bool> {
        match self.write_rx(f)? {
            Ok(filled) => Some(filled),
            Err(e) => {
                warn!("vsock: rx: {e}");
                Some(true)
            }
        }
    }

    fn notify(&mut self) {
        let mut signal = false;
        for (used, q) in [(self.rx_used, &mut *self.rx), (self.tx_used, &mut *self.tx)] {
            if used {
                signal |= q.needs_notification(self.mem).unwrap_or(true);
            }
        }
        self.rx_used = false;
        self.tx_used = false;
        if signal {
            if let Some(irq) = self.interrupt {
                if let Err(e) = irq.signal_used() {
                    error!("vsock: interrupt: {e}");
                }
            }
        }
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_MUXER: u64 = 3;

/// The vsock worker: waits on the three queue notifications and the
/// muxer's epoll fd.
pub struct QueueHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    rx: ActiveQueue,
    tx: ActiveQueue,
    event: ActiveQueue,
    muxer: Arc<Mutex<Muxer>>,
}

impl QueueHandler {
    /// `queues` are rx, tx and event, in that order.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: [ActiveQueue; 3],
        muxer: Arc<Mutex<Muxer>>,
    ) -> Self {
        let [rx, tx, event] = queues;
        QueueHandler {
            mem,
            interrupt,
            rx,
            tx,
            event,
            muxer,
        }
    }
}

impl EventHandler for QueueHandler {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        ctl.add(self.rx.notify.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        ctl.add(self.tx.notify.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        ctl.add(self.event.notify.as_raw_fd(), TOKEN_EVENT, EventSet::IN)?;
        let muxer_fd = self.muxer.lock().expect("vsock muxer").epoll_fd();
        ctl.add(muxer_fd, TOKEN_MUXER, EventSet::IN)?;
        // Packets the guest queued before we started.
        self.handle(ctl, TOKEN_MUXER, EventSet::IN);
        Ok(())
    }

    fn handle(&mut self, _ctl: &EpollCtl, token: u64, _events: EventSet) {
        match token {
            TOKEN_RX => drop(self.rx.notify.read()),
            TOKEN_TX => drop(self.tx.notify.read()),
            // We send no events (transport resets are for migration).
            TOKEN_EVENT => return drop(self.event.notify.read()),
            _ => {}
        }
        let mut muxer = self.muxer.lock().expect("vsock muxer");
        let mut queues = VirtqQueues::new(
            &self.mem,
            &mut self.rx.queue,
            &mut self.tx.queue,
            Some(&self.interrupt),
        );
        muxer.process(&mut queues);
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    use super::*;
    use crate::virtio::vsock::packet::Packet;

    fn header_bytes(h: &Header) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(h.src_cid.to_le_bytes());
        b.extend(h.dst_cid.to_le_bytes());
        b.extend(h.src_port.to_le_bytes());
        b.extend(h.dst_port.to_le_bytes());
        b.extend(h.len.to_le_bytes());
        b.extend(h.type_.to_le_bytes());
        b.extend(h.op.to_le_bytes());
        b.extend(h.flags.to_le_bytes());
        b.extend(h.buf_alloc.to_le_bytes());
        b.extend(h.fwd_cnt.to_le_bytes());
        b
    }

    #[test]
    fn packets_through_real_virtqueues() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let txq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 50,
            len: 5,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        };
        mem.write_slice(&header_bytes(&hdr), GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x11_0000)).unwrap();
        txq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x10_0000, 44, 1, 1)),
                RawDescriptor::from(Descriptor::new(0x11_0000, 5, 0, 0)),
            ],
            0,
        )
        .unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        rxq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x12_0000, 44, w | 1, 1)),
                RawDescriptor::from(Descriptor::new(0x13_0000, 4096, w, 0)),
            ],
            0,
        )
        .unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        let mut rx: Queue = rxq.create_queue().unwrap();
        let irq = VirtioInterrupt::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap());
        let mut q = VirtqQueues::new(&mem, &mut rx, &mut tx, Some(&irq));

        let mut got = Vec::new();
        assert!(q.pop_tx(&mut |h, data| {
            let mut bytes = vec![0u8; data.map_or(0, |d| d.len())];
            if let Some(d) = data {
                d.copy_to(&mut bytes[..]);
            }
            got.push(Packet {
                hdr: *h,
                data: bytes,
            });
        }));
        assert_eq!(
            got,
            [Packet {
                hdr,
                data: b"hello".to_vec()
            }]
        );
        assert!(!q.pop_tx(&mut |_, _| panic!("one chain, one packet")));

        // Declining a buffer leaves it to the next call.
        for _ in 0..2 {
            let declined = q.push_rx(&mut |room| {
                assert_eq!(room.len(), 4096);
                None
            });
            assert_eq!(declined, Some(false));
        }
        let out = Packet {
            hdr: Header {
                src_cid: 2,
                dst_cid: 3,
                len: 3,
                op: 5,
                type_: 1,
                ..Header::default()
            },
            data: b"abc".to_vec(),
        };
        let filled = q.push_rx(&mut |room| {
            room.copy_from(&out.data[..]);
            Some(out.hdr)
        });
        assert_eq!(filled, Some(true));
        assert_eq!(q.push_rx(&mut |_| panic!("no buffer left")), None);
        q.notify();
        assert_eq!(irq.status(), crate::virtio::INT_VRING);

        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw, GuestAddress(0x12_0000)).unwrap();
        assert_eq!(raw.to_vec(), header_bytes(&out.hdr));
        let mut data = [0u8; 3];
        mem.read_slice(&mut data, GuestAddress(0x13_0000)).unwrap();
        assert_eq!(&data, b"abc");
        // Used ring: one entry of header + 3 bytes.
        let used_len: u32 = mem
            .read_obj(rxq.used_addr().checked_add(4 + 4).unwrap())
            .unwrap();
        assert_eq!(used_len, 47);
    }
}

//! The worker's glue: waits on the rx and tx queue notifications and on the
//! tap, runs [`Rxtx`], and keeps the tap's epoll interest in line with its
//! back-pressure state: `EPOLLIN` only while guest rx buffers are not
//! exhausted, `EPOLLOUT` only while a frame waits for the tap.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use crate::error_limited as error;
use vm_memory::GuestMemoryMmap;

use super::rxtx::{Rxtx, RxtxFeatures, Stats, TapIo, TxStop};
use crate::virtio::worker::{EpollCtl, EventHandler, EventSet};
use crate::virtio::{ActiveQueue, VirtioInterrupt};

/// Stands in for a tap that failed: nothing to read, every write fails.
struct GoneTap;

impl TapIo for GoneTap {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn write_frame(&mut self, _frame: &[u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::ENODEV))
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;

/// The virtio-net worker: rx queue, tx queue and tap.
pub struct QueueHandler<T> {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    rx: ActiveQueue,
    tx: ActiveQueue,
    tap: T,
    rxtx: Rxtx,
    /// The tap's epoll interest as last set; `None` once the tap failed.
    interest: Option<EventSet>,
}

impl<T: TapIo + AsRawFd + Send + 'static> QueueHandler<T> {
    /// `queues` are rx and tx, in that order.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: [ActiveQueue; 2],
        tap: T,
        features: RxtxFeatures,
    ) -> Self {
        let [rx, tx] = queues;
        QueueHandler {
            mem,
            interrupt,
            rx,
            tx,
            tap,
            rxtx: Rxtx::new(features),
            interest: Some(EventSet::IN),
        }
    }

    /// Frames dropped so far.
    pub fn stats(&self) -> Stats {
        self.rxtx.stats()
    }

    fn rx(&mut self) {
        if self.interest.is_none() {
            return; // buffers stay with us; nothing will come
        }
        self.rxtx.process_rx(
            &self.mem,
            &mut self.rx.queue,
            &mut self.tap,
            self.interrupt.as_ref(),
        );
    }

    fn tx(&mut self) {
        let irq = self.interrupt.as_ref();
        let stop = if self.interest.is_some() {
            self.rxtx
                .process_tx(&self.mem, &mut self.tx.queue, &mut self.tap, irq)
        } else {
            // Without a tap, frames are lost as on an unplugged cable; the
            // guest's tx queue must not stall.
            self.rxtx
                .process_tx(&self.mem, &mut self.tx.queue, &mut GoneTap, irq)
        };
        if stop == TxStop::Budget {
            // More chains wait: come back after the other events.
            if let Err(e) = self.tx.notify.write(1) {
                error!("virtio-net: tx self-notify: {e}");
            }
        }
    }

    /// The tap's interest for the current back-pressure state.
    fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.rxtx.rx_blocked() {
            set |= EventSet::IN;
        }
        if self.rxtx.tx_blocked() {
            set |= EventSet::OUT;
        }
        set
    }

    fn update_interest(&mut self, ctl: &EpollCtl) {
        let Some(current) = self.interest else {
            return;
        };
        let wanted = self.wanted();
        if wanted != current {
            match ctl.modify(self.tap.as_raw_fd(), TOKEN_TAP, wanted) {
                Ok(()) => self.interest = Some(wanted),
                Err(e) => error!("virtio-net: tap epoll: {e}"),
            }
        }
    }
}

impl<T: TapIo + AsRawFd + Send + 'static> EventHandler for QueueHandler<T> {
    fn init(&mut self, ctl: &EpollCtl) -> io::Result<()> {
        ctl.add(self.rx.notify.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        ctl.add(self.tx.notify.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        ctl.add(self.tap.as_raw_fd(), TOKEN_TAP, EventSet::IN)?;
        // Frames the guest queued before we started.
        self.tx();
        self.rx();
        self.update_interest(ctl);
        Ok(())
    }

    fn handle(&mut self, ctl: &EpollCtl, token: u64, events: EventSet) {
        match token {
            TOKEN_RX => {
                drop(self.rx.notify.read());
                self.rx();
            }
            TOKEN_TX => {
                drop(self.tx.notify.read());
                self.tx();
            }
            TOKEN_TAP => {
                if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    // The tap was deleted or detached: the link is gone
                    // for good. Stop watching it (level-triggered, it
                    // would fire forever).
                    error!("virtio-net: the tap failed ({events:?}); no more traffic");
                    if let Err(e) = ctl.remove(self.tap.as_raw_fd()) {
                        error!("virtio-net: tap epoll: {e}");
                    }
                    self.interest = None;
                    return;
                }
                if events.contains(EventSet::OUT) {
                    self.tx();
                }
                if events.contains(EventSet::IN) {
                    self.rx();
                }
            }
            _ => {}
        }
        self.update_interest(ctl);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::FromRawFd;
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::virtio::net::tap::Tap;
    use crate::virtio::net::test_util::{in_new_netns, link_up, Driver, PacketSocket, R, W};
    use crate::virtio::net::VNET_HDR_LEN;
    use crate::virtio::worker;
    use crate::virtio::INT_VRING;

    /// A datagram socketpair end as the tap: frame boundaries are kept,
    /// and a full peer queue gives EAGAIN, then EPOLLOUT.
    impl TapIo for UnixDatagram {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.recv(buf)
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            self.send(frame)
        }
    }

    const BUF: u64 = 0x10_0000;

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    struct Setup {
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
        rx_kick: EventFd,
        tx_kick: EventFd,
    }

    /// Starts a worker on `tap` for rx/tx queues at 0 and 0x1_0000.
    fn start<T: TapIo + AsRawFd + Send + 'static>(
        rxd: &Driver,
        txd: &Driver,
        setup: &Setup,
        tap: T,
    ) -> worker::WorkerHandle {
        let rx_kick = setup.rx_kick.try_clone().unwrap();
        let tx_kick = setup.tx_kick.try_clone().unwrap();
        let queues = [
            ActiveQueue {
                queue: rxd.queue(true),
                notify: rx_kick,
            },
            ActiveQueue {
                queue: txd.queue(true),
                notify: tx_kick,
            },
        ];
        let features = RxtxFeatures {
            mrg_rxbuf: true,
            guest_csum: false,
        };
        let handler =
            QueueHandler::new(setup.mem.clone(), setup.irq.clone(), queues, tap, features);
        worker::spawn("net-test", handler).unwrap()
    }

    fn setup() -> Setup {
        Setup {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap(),
            irq: Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            rx_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            tx_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    fn eth_frame(i: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f.extend_from_slice(&0x88b5u16.to_be_bytes());
        f.extend((0..len).map(|j| i.wrapping_add(j as u8)));
        f
    }

    #[test]
    fn back_pressure_both_ways_loses_and_reorders_nothing() {
        let s = setup();
        let mut rxd = Driver::new(&s.mem, 0, 64);
        // Two descriptors per frame: room for all 40.
        let mut txd = Driver::new(&s.mem, 0x1_0000, 128);
        let (tap, host) = UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        // The smallest send buffer: a few frames fill it.
        let one: libc::c_int = 1;
        // SAFETY: SO_SNDBUF reads an int of the length passed.
        let ret = unsafe {
            libc::setsockopt(
                tap.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(ret, 0);
        let worker = start(&rxd, &txd, &s, tap);

        // tx: 40 frames while the host reads nothing; the socket takes a
        // few, the rest wait in the ring.
        let frames: Vec<Vec<u8>> = (0..40)
            .map(|i| eth_frame(i, 1000 + usize::from(i)))
            .collect();
        for (i, f) in frames.iter().enumerate() {
            txd.add_tx_frame(
                BUF + i as u64 * 0x1000,
                f,
                &[VNET_HDR_LEN, f.len() - VNET_HDR_LEN],
            );
        }
        s.tx_kick.write(1).unwrap();
        wait_until("the host side to fill", || txd.used_idx() > 0);
        std::thread::sleep(Duration::from_millis(50));
        let stuck = txd.used_idx();
        assert!(stuck < 40, "the socket took everything ({stuck})");
        // The host reads slowly: every frame, in order (EPOLLOUT resumes tx).
        let mut buf = vec![0u8; 4096];
        for (i, f) in frames.iter().enumerate() {
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let n = host.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &f[..], "tx frame {i}");
        }
        wait_until("all tx chains used", || txd.used_idx() == 40);

        // rx: 30 frames from the host, 4 guest buffers: 4 arrive, the
        // worker stops reading; the rest wait on the host side.
        let incoming: Vec<Vec<u8>> = (0..30).map(|i| eth_frame(100 + i, 300)).collect();
        host.set_nonblocking(true).unwrap();
        let mut sent = 0;
        for f in &incoming {
            if host.send(f).is_err() {
                break;
            }
            sent += 1;
        }
        let rx_buf = |i: usize| 0x100_0000 + i as u64 * 0x1000;
        for i in 0..4 {
            rxd.add(&[(rx_buf(i), 2048, W)]);
        }
        s.rx_kick.write(1).unwrap();
        wait_until("4 rx frames", || rxd.used_idx() == 4);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rxd.used_idx(), 4);
        // More buffers, a kick: the rest, in order, while the host keeps
        // sending what did not fit in its socket queue.
        for i in 4..30 {
            rxd.add(&[(rx_buf(i), 2048, W)]);
        }
        s.rx_kick.write(1).unwrap();
        while sent < incoming.len() {
            match host.send(&incoming[sent]) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        wait_until("30 rx frames", || rxd.used_idx() == 30);
        for (i, f) in incoming.iter().enumerate() {
            assert_eq!(rxd.used(i as u16).1, f.len() as u32);
            let mut got = rxd.read(rx_buf(i), f.len());
            assert_eq!(got[10], 1, "num_buffers");
            got[10] = 0;
            assert_eq!(got, *f, "rx frame {i}");
        }
        assert_ne!(s.irq.status() & INT_VRING, 0);
        worker.stop();
    }

    #[test]
    fn a_tap_that_goes_away_drops_tx_frames_instead_of_stalling_the_guest() {
        let s = setup();
        let rxd = Driver::new(&s.mem, 0, 64);
        let mut txd = Driver::new(&s.mem, 0x1_0000, 64);
        // A seqpacket pair: the peer's close is EPOLLHUP, like a tap whose
        // interface was deleted (EPOLLERR).
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (tap, host) = unsafe {
            (
                UnixDatagram::from_raw_fd(fds[0]),
                UnixDatagram::from_raw_fd(fds[1]),
            )
        };
        let worker = start(&rxd, &txd, &s, tap);
        let f = eth_frame(1, 100);
        txd.add_tx_frame(BUF, &f, &[f.len()]);
        s.tx_kick.write(1).unwrap();
        let mut buf = [0u8; 256];
        host.set_nonblocking(false).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(host.recv(&mut buf).unwrap(), f.len());
        drop(host);
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..10 {
            txd.add_tx_frame(BUF + 0x1000 * (i + 1), &f, &[f.len()]);
        }
        s.tx_kick.write(1).unwrap();
        wait_until("tx chains used", || txd.used_idx() == 11);
        assert!(!worker.is_finished());
        worker.stop();
    }

    #[test]
    fn frames_cross_a_real_tap_through_the_worker() {
        in_new_netns(|| {
            let s = setup();
            let mut rxd = Driver::new(&s.mem, 0, 64);
            let mut txd = Driver::new(&s.mem, 0x1_0000, 64);
            let tap = Tap::open("sbxq0").unwrap();
            link_up("sbxq0");
            let sock = PacketSocket::bind("sbxq0");
            let worker = start(&rxd, &txd, &s, tap);

            // Host -> guest before the guest has buffers: nothing is lost.
            let sent: Vec<Vec<u8>> = (0..5u8).map(|i| sock.send_to_tap(&[i; 100])).collect();
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(rxd.used_idx(), 0);
            for i in 0..8 {
                rxd.add(&[(0x100_0000 + i * 0x1000, 2048, W)]);
            }
            s.rx_kick.write(1).unwrap();
            wait_until("5 rx frames", || rxd.used_idx() == 5);
            for (i, f) in sent.iter().enumerate() {
                let got = rxd.read(0x100_0000 + i as u64 * 0x1000, VNET_HDR_LEN + f.len());
                assert_eq!(&got[VNET_HDR_LEN..], &f[..], "rx frame {i}");
                assert_eq!(&got[..10], &[0; 10], "no offload metadata");
            }

            // Guest -> host.
            let f = eth_frame(7, 500);
            txd.add(&[(BUF, 0, R)]); // an empty chain first: dropped, counted
            txd.add_tx_frame(BUF + 0x1000, &f, &[f.len()]);
            s.tx_kick.write(1).unwrap();
            assert_eq!(sock.recv(), f[VNET_HDR_LEN..]);
            wait_until("tx used", || txd.used_idx() == 2);
            worker.stop();
        });
    }
}

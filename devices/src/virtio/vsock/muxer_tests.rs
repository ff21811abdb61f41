//! Muxer tests: a fake guest (queues of packets) and real Unix sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::virtio::vsock::connection::CONN_BUF_ALLOC;
use crate::virtio::vsock::packet::{Header, Packet, SHUTDOWN_RCV, SHUTDOWN_SEND};

const CID: u64 = 3;

#[derive(Default)]
struct FakeGuest {
    tx: VecDeque<Packet>,
    rx: Vec<Packet>,
    rx_bufs: usize,
    rx_cap: usize,
    notifies: usize,
}

impl GuestQueues for FakeGuest {
    fn pop_tx(&mut self, f: &mut dyn FnMut(&Header, Option<&Payload<'_>>)) -> bool {
        let Some(mut pkt) = self.tx.pop_front() else {
            return false;
        };
        let data = (!pkt.data.is_empty()).then(|| Payload::from(&mut pkt.data[..]));
        f(&pkt.hdr, data.as_ref());
        true
    }
    fn push_rx(&mut self, f: &mut dyn FnMut(&Payload<'_>) -> Option<Header>) -> Option<bool> {
        if self.rx_bufs == 0 {
            return None;
        }
        // Garbage where the payload goes: only what the muxer writes counts.
        let mut buf = vec![0xee; self.rx_cap];
        let Some(hdr) = f(&Payload::from(&mut buf[..])) else {
            return Some(false);
        };
        assert!(hdr.len as usize <= self.rx_cap);
        buf.truncate(hdr.len as usize);
        self.rx_bufs -= 1;
        self.rx.push(Packet { hdr, data: buf });
        Some(true)
    }
    fn notify(&mut self) {
        self.notifies += 1;
    }
}

impl FakeGuest {
    fn new() -> Self {
        FakeGuest {
            rx_bufs: 1000,
            rx_cap: 4096,
            ..Default::default()
        }
    }

    /// Takes the packets the guest received.
    fn take(&mut self) -> Vec<Packet> {
        std::mem::take(&mut self.rx)
    }

    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
        self.send_credit(op, src_port, dst_port, data, CONN_BUF_ALLOC, 0);
    }

    fn send_credit(&mut self, op: u16, src: u32, dst: u32, data: &[u8], buf: u32, fwd: u32) {
        self.tx.push_back(Packet {
            hdr: Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: src,
                dst_port: dst,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: buf,
                fwd_cnt: fwd,
            },
            data: data.to_vec(),
        });
    }

    fn send_shutdown(&mut self, src: u32, dst: u32, flags: u32) {
        self.send(op::SHUTDOWN, src, dst, &[]);
        self.tx.back_mut().unwrap().hdr.flags = flags;
    }
}

struct Env {
    _dir: TempDir,
    path: PathBuf,
    muxer: Muxer,
    guest: FakeGuest,
}

impl Env {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vsock.sock");
        let muxer = Muxer::new(CID, path.clone()).unwrap();
        Env {
            _dir: dir,
            path,
            muxer,
            guest: FakeGuest::new(),
        }
    }

    /// Runs the muxer until nothing changes (the fds' readiness is
    /// immediate for Unix sockets, but give the kernel a moment).
    fn pump(&mut self) {
        for _ in 0..4 {
            self.muxer.process(&mut self.guest);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A host process connects to guest `port`: the guest gets a REQUEST.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        let rx = self.guest.take();
        assert_eq!(rx.len(), 1, "{rx:?}");
        let req = rx[0].hdr;
        assert_eq!(req.op, op::REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= LOCAL_PORT_BASE);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        (s, req.src_port)
    }

    /// Host-initiated connection, accepted by the guest with `buf_alloc`.
    fn established(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let (s, local) = self.host_connect(port);
        self.guest
            .send_credit(op::RESPONSE, port, local, &[], buf_alloc, 0);
        self.pump();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {local}\n"));
        (s, local)
    }
}

fn data_of(pkts: &[Packet]) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.hdr.op == op::RW)
        .flat_map(|p| p.data.clone())
        .collect()
}

#[test]
fn the_agent_socket_is_its_owners_alone_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    // The test process's umask is whatever the caller had (often 022, in
    // containers 000): the mode must not depend on it.
    let mode = std::fs::metadata(&env.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT x"), None);
    assert_eq!(parse_connect(b"connect 52"), None);
}

#[test]
fn host_connect_sends_request_and_response_gives_ok() {
    let mut env = Env::new();
    let (_s, local) = env.established(52, CONN_BUF_ALLOC);
    assert_eq!(local, LOCAL_PORT_BASE);
    assert_eq!(env.muxer.connection_count(), 1);
    // A second connection gets the next local port.
    let (_s2, local2) = env.host_connect(52);
    assert_eq!(local2, LOCAL_PORT_BASE + 1);
    assert!(env.guest.notifies > 0);
}

#[test]
fn bad_connect_line_closes_the_host_connection() {
    let mut env = Env::new();
    let mut s = UnixStream::connect(&env.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"HELLO\n").unwrap();
    env.pump();
    assert!(env.guest.take().is_empty());
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn data_flows_both_ways() {
    let mut env = Env::new();
    let (mut s, local) = env.established(52, CONN_BUF_ALLOC);
    s.write_all(b"ping").unwrap();
    env.pump();
    let rx = env.guest.take();
    assert_eq!(data_of(&rx), b"ping");
    assert_eq!((rx[0].hdr.src_port, rx[0].hdr.dst_port), (local, 52));

    env.guest.send(op::RW, 52, local, b"pong");
    env.pump();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn the_guest_gets_no_more_than_its_credit() {
    let mut env = Env::new();
    let (mut s, local) = env.established(52, 10);
    s.write_all(&[7u8; 100]).unwrap();
    env.pump();
    assert_eq!(data_of(&env.guest.take()).len(), 10);
    env.pump();
    assert!(env.guest.take().is_empty());
    // The guest consumed 10 bytes.
    env.guest
        .send_credit(op::CREDIT_UPDATE, 52, local, &[], 10, 10);
    env.pump();
    assert_eq!(data_of(&env.guest.take()).len(), 10);
    // More room: the rest comes, in rx-buffer sized packets.
    env.guest.rx_cap = 16;
    env.guest
        .send_credit(op::CREDIT_UPDATE, 52, local, &[], 1000, 20);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(data_of(&rx).len(), 80);
    assert!(rx.iter().all(|p| p.data.len() <= 16));
}

#[test]
fn data_waits_for_rx_buffers() {
    let mut env = Env::new();
    let (mut s, _local) = env.established(52, CONN_BUF_ALLOC);
    env.guest.rx_bufs = 0;
    s.write_all(b"later").unwrap();
    env.pump();
    assert!(env.guest.take().is_empty());
    env.guest.rx_bufs = 10; // the guest refilled the rx queue
    env.pump();
    assert_eq!(data_of(&env.guest.take()), b"later");
}

#[test]
fn credit_request_and_update_after_forwarding() {
    let mut env = Env::new();
    let (mut s, local) = env.established(52, CONN_BUF_ALLOC);
    env.guest.send(op::CREDIT_REQUEST, 52, local, &[]);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::CREDIT_UPDATE);
    assert_eq!(rx[0].hdr.buf_alloc, CONN_BUF_ALLOC);
    // Forwarding a quarter of our buffer to the host triggers an update.
    let chunk = vec![1u8; 4096];
    let n = (CONN_BUF_ALLOC as usize / 4) / chunk.len();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; n * 4096];
        s.read_exact(&mut buf).unwrap();
        s
    });
    for _ in 0..n {
        env.guest.send(op::RW, 52, local, &chunk);
    }
    for _ in 0..50 {
        env.pump();
        if !env.guest.rx.is_empty() {
            break;
        }
    }
    reader.join().unwrap();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1, "{rx:?}");
    assert_eq!(rx[0].hdr.op, op::CREDIT_UPDATE);
    assert_eq!(rx[0].hdr.fwd_cnt, (n * 4096) as u32);
}

/// What the host socket does not take at once from the guest's buffers
/// (a 256 KiB burst, more than a Unix socket holds) is copied and sent
/// later: the host reads every byte, in order.
#[test]
fn a_slow_host_gets_every_byte_in_order() {
    let mut env = Env::new();
    let (mut s, local) = env.established(52, CONN_BUF_ALLOC);
    let data: Vec<u8> = (0..CONN_BUF_ALLOC as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    for chunk in data.chunks(64 * 1024) {
        env.guest.send(op::RW, 52, local, chunk);
    }
    env.pump();
    let len = data.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).unwrap();
        got
    });
    for _ in 0..1000 {
        if reader.is_finished() {
            break;
        }
        env.pump();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(reader.is_finished(), "the host did not get everything");
    assert!(reader.join().unwrap() == data, "bytes lost or reordered");
    assert_eq!(env.muxer.connection_count(), 1);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut env = Env::new();
    let (_s, local) = env.established(52, CONN_BUF_ALLOC);
    // The host never reads: the socket buffer fills, then ours overflows.
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..((CONN_BUF_ALLOC as usize / chunk.len()) + 8) {
        env.guest.send(op::RW, 52, local, &chunk);
    }
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.last().unwrap().hdr.op, op::RST);
    assert_eq!(env.muxer.connection_count(), 0);
}

#[test]
fn guest_connect_reaches_the_port_socket() {
    let mut env = Env::new();
    let listener = UnixListener::bind(format!("{}_1234", env.path.display())).unwrap();
    env.guest.send(op::REQUEST, 5000, 1234, &[]);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    let h = rx[0].hdr;
    assert_eq!(h.op, op::RESPONSE);
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (1234, 5000, CID));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    env.guest.send(op::RW, 5000, 1234, b"hi host");
    env.pump();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi host");
    s.write_all(b"hi guest").unwrap();
    env.pump();
    assert_eq!(data_of(&env.guest.take()), b"hi guest");
}

#[test]
fn guest_connect_to_nobody_is_reset() {
    let mut env = Env::new();
    env.guest.send(op::REQUEST, 5000, 999, &[]);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::RST);
    assert_eq!((rx[0].hdr.src_port, rx[0].hdr.dst_port), (999, 5000));
    assert_eq!(env.muxer.connection_count(), 0);
}

#[test]
fn a_guest_that_posts_no_rx_buffers_cannot_grow_the_reset_queue() {
    let mut env = Env::new();
    env.guest.rx_bufs = 0;
    for i in 0..100_000u32 {
        env.guest.send(op::RW, 5000 + i, 77, b"x");
        if i % 1000 == 0 {
            env.muxer.process(&mut env.guest);
        }
    }
    env.muxer.process(&mut env.guest);
    assert_eq!(env.muxer.orphan_rsts.len(), MAX_ORPHAN_RSTS);
    // Buffers come: the queued resets go out, and the muxer still works.
    env.guest.rx_bufs = 10_000;
    env.pump();
    assert_eq!(env.guest.take().len(), MAX_ORPHAN_RSTS);
    let (_s, _port) = env.host_connect(1024);
}

#[test]
fn guest_connections_are_capped() {
    // Two fds per connection: raise the soft limit (often 1024) to the hard one.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= 3 * MAX_CONNECTIONS as u64,
        "fd limit {}",
        lim.rlim_cur
    );
    let mut env = Env::new();
    env.guest.rx_bufs = usize::MAX;
    // A host service on port 9 that accepts everything.
    let svc = UnixListener::bind(format!("{}_9", env.path.display())).unwrap();
    svc.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for i in 0..(MAX_CONNECTIONS as u32 + 10) {
        env.guest.send(op::REQUEST, 10_000 + i, 9, &[]);
        env.muxer.process(&mut env.guest);
        while let Ok((s, _)) = svc.accept() {
            accepted.push(s);
        }
        env.guest.take();
    }
    assert_eq!(env.muxer.conns.len(), MAX_CONNECTIONS);
    // The next request is refused with a reset.
    env.guest.send(op::REQUEST, 50_000, 9, &[]);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.last().map(|p| p.hdr.op), Some(op::RST));
    assert_eq!(env.muxer.conns.len(), MAX_CONNECTIONS);
}

#[test]
fn packets_for_no_connection_get_an_rst() {
    let mut env = Env::new();
    env.guest.send(op::RW, 5000, 77, b"x");
    env.guest.send(op::RST, 5000, 78, &[]); // an RST is never answered
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::RST);
    assert_eq!(rx[0].hdr.src_port, 77);
}

#[test]
fn guest_rst_closes_the_host_connection() {
    let mut env = Env::new();
    let (mut s, local) = env.established(52, CONN_BUF_ALLOC);
    env.guest.send(op::RST, 52, local, &[]);
    env.pump();
    assert_eq!(env.muxer.connection_count(), 0);
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    assert!(env.guest.take().is_empty());
}

#[test]
fn guest_refusing_a_host_connect_closes_it() {
    let mut env = Env::new();
    let (mut s, local) = env.host_connect(52);
    env.guest.send(op::RST, 52, local, &[]);
    env.pump();
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(env.muxer.connection_count(), 0);
}

#[test]
fn half_close_from_the_guest_then_host_eof() {
    let mut env = Env::new();
    let (mut s, local) = env.established(52, CONN_BUF_ALLOC);
    env.guest.send(op::RW, 52, local, b"last");
    env.guest.send_shutdown(52, local, SHUTDOWN_SEND);
    env.pump();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap(); // EOF after the data
    assert_eq!(got, b"last");
    // The host can still send.
    s.write_all(b"reply").unwrap();
    env.pump();
    assert_eq!(data_of(&env.guest.take()), b"reply");
    // Host EOF: SHUTDOWN to the guest, and with both sides done, RST.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    env.pump();
    let ops: Vec<_> = env.guest.take().iter().map(|p| p.hdr.op).collect();
    assert_eq!(ops, [op::SHUTDOWN, op::RST]);
    assert_eq!(env.muxer.connection_count(), 0);
}

#[test]
fn host_close_then_guest_close() {
    let mut env = Env::new();
    let (s, local) = env.established(52, CONN_BUF_ALLOC);
    drop(s);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::SHUTDOWN);
    assert_eq!(rx[0].hdr.flags, SHUTDOWN_SEND);
    assert_eq!(env.muxer.connection_count(), 1);
    // The guest closes its socket: SHUTDOWN both ways, then waits for RST.
    env.guest
        .send_shutdown(52, local, SHUTDOWN_SEND | SHUTDOWN_RCV);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::RST);
    assert_eq!(env.muxer.connection_count(), 0);
}

#[test]
fn host_hangup_before_the_guest_answers() {
    let mut env = Env::new();
    let (s, _local) = env.host_connect(52);
    drop(s);
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::RST);
    assert_eq!(env.muxer.connection_count(), 0);
}

#[test]
fn two_busy_streams_share_the_rx_queue_fairly() {
    let mut env = Env::new();
    let (mut a, la) = env.established(52, CONN_BUF_ALLOC);
    let (mut b, lb) = env.established(53, CONN_BUF_ALLOC);
    a.write_all(&[b'a'; 64 * 1024]).unwrap();
    b.write_all(&[b'b'; 64 * 1024]).unwrap();
    env.guest.rx_cap = 1024;
    env.guest.rx_bufs = 20;
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 20);
    let from_a = rx.iter().filter(|p| p.hdr.src_port == la).count();
    let from_b = rx.iter().filter(|p| p.hdr.src_port == lb).count();
    assert_eq!((from_a, from_b), (10, 10));
    // Strictly alternating.
    for w in rx.windows(2) {
        assert_ne!(w[0].hdr.src_port, w[1].hdr.src_port);
    }
    // The rest all arrives once the guest has buffers again.
    env.guest.rx_bufs = 1000;
    env.pump();
    let rx = env.guest.take();
    let total: usize = rx.iter().map(|p| p.data.len()).sum();
    assert_eq!(total, 2 * 64 * 1024 - 20 * 1024);
}

#[test]
fn reset_drops_every_connection_and_keeps_the_listener() {
    let mut env = Env::new();
    let (mut s, _) = env.established(52, CONN_BUF_ALLOC);
    env.muxer.reset();
    assert_eq!(env.muxer.connection_count(), 0);
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    env.established(52, CONN_BUF_ALLOC);
}

#[test]
fn wrong_cids_are_dropped() {
    let mut env = Env::new();
    env.guest.send(op::REQUEST, 5000, 1234, &[]);
    env.guest.tx.back_mut().unwrap().hdr.src_cid = 9;
    env.pump();
    assert!(env.guest.take().is_empty());
}

#[test]
fn writing_to_a_host_that_left_resets_without_sigpipe() {
    let mut env = Env::new();
    let (s, local) = env.established(52, CONN_BUF_ALLOC);
    drop(s);
    env.pump();
    assert_eq!(env.guest.take()[0].hdr.op, op::SHUTDOWN);
    env.guest.send(op::RW, 52, local, b"anyone?");
    env.pump();
    let rx = env.guest.take();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op, op::RST);
    assert_eq!(env.muxer.connection_count(), 0);
}

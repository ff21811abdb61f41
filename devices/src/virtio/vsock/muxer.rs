//! The vsock muxer: the host end of every guest stream, Firecracker's
//! "hybrid vsock" protocol over Unix sockets.
//!
//! - Host-initiated: a host process connects to `uds_path` and writes
//!   `CONNECT <port>\n`; the guest gets a REQUEST for `port` from a local
//!   port of ours (from [`LOCAL_PORT_BASE`] up); once it answers RESPONSE
//!   the host process reads `OK <local port>\n` and the stream is bridged.
//! - Guest-initiated: a REQUEST for host (CID 2) port `P` connects to the
//!   Unix socket `<uds_path>_P`; if that fails the guest gets an RST.
//!
//! The muxer has its own epoll set (listener, host sockets), which the
//! device's worker waits on ([`Muxer::epoll_fd`]). [`Muxer::process`] does
//! all the work against a [`GuestQueues`]: it takes the guest's packets,
//! handles host socket events, and fills the rx queue round-robin over the
//! connections that have something to send.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::warn_limited as warn;
use log::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::Connection;
use super::packet::{op, Header, Payload, HOST_CID, TYPE_STREAM};

/// Local ports for host-initiated connections start here.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line we accept.
const MAX_CONNECT_LINE: usize = 32;
/// Most connections at once (guest- and host-initiated, as Firecracker's
/// limit): each holds a socket and up to `CONN_BUF_ALLOC` of buffered data.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_PENDING: usize = 64;
/// Most resets waiting for an rx buffer: a guest that posts none while it
/// sends garbage gets the first ones; the rest are dropped (a reset for a
/// connection that does not exist carries nothing the guest needs).
pub const MAX_ORPHAN_RSTS: usize = 256;

/// Errors setting up the muxer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the host-side Unix socket failed.
    #[error("binding the vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Setting up epoll failed.
    #[error("vsock epoll: {0}")]
    Epoll(io::Error),
}

/// The guest's side: its tx and rx queues. Payloads stay in the guest's
/// buffers: the muxer sends from them and reads into them.
pub trait GuestQueues {
    /// Hands the guest's next packet to `f` (its header, and its payload
    /// in the guest's buffer when it has one), then gives the buffer back
    /// to the guest; `false` when the guest sent nothing more.
    fn pop_tx(&mut self, f: &mut dyn FnMut(&Header, Option<&Payload<'_>>)) -> bool;
    /// Offers the payload room of the guest's next rx buffer to `f`, which
    /// writes a payload at its start and returns the packet's header
    /// (`len`: the bytes it wrote), or `None` to leave the buffer for
    /// later. `None` when the guest has no rx buffer, else whether `f`
    /// filled it.
    fn push_rx(&mut self, f: &mut dyn FnMut(&Payload<'_>) -> Option<Header>) -> Option<bool>;
    /// Interrupts the guest if buffers were used.
    fn notify(&mut self);
}

/// (local port, guest port).
type ConnKey = (u32, u32);

#[derive(Debug, Clone, Copy)]
enum Target {
    Listener,
    Pending,
    Conn(ConnKey),
}

/// A host connection that has not yet said which port it wants.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The host end of all the guest's vsock streams.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    pending: HashMap<u64, PendingHost>,
    targets: HashMap<u64, Target>,
    tokens: HashMap<ConnKey, u64>,
    next_token: u64,
    /// Connections with a packet for the guest, served round-robin.
    rxq: VecDeque<ConnKey>,
    /// RSTs for packets that match no connection.
    orphan_rsts: VecDeque<Header>,
}

impl Muxer {
    /// Binds the host-side listener at `uds_path` for guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, Error> {
        let bind_err = |source| Error::Bind {
            path: uds_path.clone(),
            source,
        };
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let listener = UnixListener::bind(&uds_path).map_err(bind_err)?;
        // The agent's API runs anything as root in the guest: the owner's
        // alone, whatever the umask.
        std::fs::set_permissions(&uds_path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_err)?;
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.clone(),
            listener,
            epoll,
            conns: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_BASE,
            pending: HashMap::new(),
            targets: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
            rxq: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
        };
        // From here on, drop removes the socket file.
        m.listener.set_nonblocking(true).map_err(bind_err)?;
        m.targets.insert(0, Target::Listener);
        m.epoll
            .ctl(
                ControlOperation::Add,
                m.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(Error::Epoll)?;
        Ok(m)
    }

    /// The socket path host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The muxer's epoll fd: readable when a host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset); the listener stays.
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
            }
        }
        for (_, p) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.targets.retain(|_, t| matches!(t, Target::Listener));
        self.tokens.clear();
        self.local_ports.clear();
        self.rxq.clear();
        self.orphan_rsts.clear();
    }

    /// Does all pending work: the guest's packets, host socket events,
    /// then the rx queue; interrupts the guest if buffers were used.
    pub fn process<Q: GuestQueues>(&mut self, queues: &mut Q) {
        while queues.pop_tx(&mut |hdr, data| self.guest_packet(hdr, data)) {}
        self.host_events();
        self.fill_rx(queues);
        queues.notify();
    }

    fn guest_packet(&mut self, hdr: &Header, data: Option<&Payload<'_>>) {
        let hdr = *hdr;
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            warn!(
                "vsock: dropped packet {} -> {} (guest is {})",
                hdr.src_cid, hdr.dst_cid, self.guest_cid
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.queue_rst(&hdr);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.guest_packet(&hdr, data);
            self.update(key);
        } else if hdr.op == op::REQUEST && self.full() {
            warn!("vsock: the guest has {MAX_CONNECTIONS} connections; refusing more");
            self.queue_rst(&hdr);
        } else if hdr.op == op::REQUEST {
            let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(stream) => {
                    debug!("vsock: guest port {} connected to {path}", hdr.src_port);
                    let conn = Connection::new_peer(stream, self.guest_cid, &hdr);
                    self.conns.insert(key, conn);
                    self.update(key);
                }
                Err(e) => {
                    debug!("vsock: guest connect to {path}: {e}");
                    self.queue_rst(&hdr);
                }
            }
        } else if hdr.op != op::RST {
            self.queue_rst(&hdr);
        }
    }

    /// Whether [`MAX_CONNECTIONS`] are open or being opened (guest and host).
    fn full(&self) -> bool {
        self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
    }

    /// Queues a reset answering `hdr`, unless [`MAX_ORPHAN_RSTS`] wait already.
    fn queue_rst(&mut self, hdr: &Header) {
        if self.orphan_rsts.len() < MAX_ORPHAN_RSTS {
            self.orphan_rsts.push_back(Header::reply_to(hdr, op::RST));
        } else {
            warn!("vsock: {MAX_ORPHAN_RSTS} resets wait for rx buffers; dropping more");
        }
    }

    fn host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                warn!("vsock: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            match self.targets.get(&token).copied() {
                Some(Target::Listener) => self.accept(),
                Some(Target::Pending) => self.read_connect_line(token),
                Some(Target::Conn(key)) => {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.host_event(ev.events());
                        self.update(key);
                    }
                }
                None => {}
            }
        }
    }

    fn new_token(&mut self, target: Target) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.targets.insert(token, target);
        token
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING || self.full() {
                        warn!("vsock: too many host connections; refusing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: host connection: {e}");
                        continue;
                    }
                    let token = self.new_token(Target::Pending);
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if let Err(e) = self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                    {
                        warn!("vsock: watching a host connection: {e}");
                        self.targets.remove(&token);
                        continue;
                    }
                    let line = Vec::new();
                    self.pending.insert(token, PendingHost { stream, line });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no payload byte
    /// is consumed with it).
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let p = self.pending.remove(&token).expect("pending connection");
        self.targets.remove(&token);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = port else {
            debug!(
                "vsock: bad CONNECT line {:?}",
                String::from_utf8_lossy(&p.line)
            );
            return; // drops (closes) the stream
        };
        let local = self.alloc_local_port(port);
        let key = (local, port);
        self.local_ports.insert(local);
        let conn = Connection::new_local(p.stream, self.guest_cid, local, port);
        self.conns.insert(key, conn);
        self.update(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(LOCAL_PORT_BASE);
            if !self.local_ports.contains(&port) && !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// After anything happened to a connection: drop it if finished, else
    /// fix its epoll registration and queue it for rx if it has a packet.
    fn update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_finished() {
            let conn = self.conns.remove(&key).expect("connection");
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
            }
            if let Some(token) = self.tokens.remove(&key) {
                self.targets.remove(&token);
            }
            self.local_ports.remove(&conn.local_port());
            return; // dropping conn closes the host socket
        }
        let wanted = conn.wanted_events();
        if wanted != conn.registered {
            let fd = conn.fd();
            let token = match self.tokens.get(&key) {
                Some(&t) => t,
                None => {
                    let t = self.next_token;
                    self.next_token += 1;
                    self.targets.insert(t, Target::Conn(key));
                    self.tokens.insert(key, t);
                    t
                }
            };
            let conn = self.conns.get_mut(&key).expect("connection");
            let res = match (conn.registered, wanted) {
                (None, Some(ev)) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::from_bits_truncate(ev), token),
                ),
                (Some(_), Some(ev)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(EventSet::from_bits_truncate(ev), token),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => conn.registered = wanted,
                Err(e) => {
                    warn!("vsock: epoll_ctl on port {}: {e}", conn.local_port());
                    conn.reset();
                }
            }
        }
        let conn = self.conns.get_mut(&key).expect("connection");
        if conn.has_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    /// Fills rx buffers: pending resets first, then one packet per
    /// connection per turn, until the guest has no buffer or no
    /// connection has anything to send.
    fn fill_rx<Q: GuestQueues>(&mut self, queues: &mut Q) {
        while queues.push_rx(&mut |buf| self.next_rx(buf)) == Some(true) {}
    }

    /// The next packet for the guest, its payload written into `buf`.
    fn next_rx(&mut self, buf: &Payload<'_>) -> Option<Header> {
        if let Some(rst) = self.orphan_rsts.pop_front() {
            return Some(rst);
        }
        // Each queued connection gets one try per call: one with nothing
        // to send after all (a host read that found nothing) goes back in
        // the queue only if `update` finds it has something still.
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let hdr = conn.next_rx(buf);
            self.update(key);
            if hdr.is_some() {
                return hdr;
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// The port of a `CONNECT <port>` line.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;

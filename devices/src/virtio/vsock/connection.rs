//! One vsock stream between a guest port and a host Unix socket.
//!
//! The connection keeps the flow-control state of both directions (virtio
//! 1.x 5.10.6.3): it never sends the guest more than the guest's credit
//! (`buf_alloc - (rx_cnt - fwd_cnt)`), and it advertises a buffer of
//! [`CONN_BUF_ALLOC`] bytes that holds what the guest sent and the host
//! socket has not taken yet. Guest → host data is sent from the guest's
//! buffer and copied only for what the socket does not take at once; host
//! → guest data is read from the (nonblocking) socket straight into the
//! guest's rx buffer, only when a packet can carry it, so nothing is
//! buffered that way.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use log::debug;

use super::packet::{op, Header, Payload, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The receive buffer we advertise per connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// The largest payload we put in one packet.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Send a CREDIT_UPDATE once this much was forwarded since the guest last
/// heard our `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or to send), waiting for the guest.
    LocalInit,
    /// Data flows.
    Established,
    /// Finished; only a pending RST may still go to the guest.
    Closed,
}

/// One stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    // Control packets waiting for an rx buffer.
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_shutdown: bool,
    send_rst: bool,
    // Host -> guest.
    host_readable: bool,
    host_eof: bool,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    // Guest -> host.
    preface: Vec<u8>,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shut: u32,
    host_write_shut: bool,
    /// Bookkeeping for the muxer: queued for rx.
    pub(super) in_rxq: bool,
    /// Bookkeeping for the muxer: the epoll registration.
    pub(super) registered: Option<u32>,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state: State::LocalInit,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: false,
            send_rst: false,
            host_readable: false,
            host_eof: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            preface: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shut: 0,
            host_write_shut: false,
            in_rxq: false,
            registered: None,
        }
    }

    /// A host process asked (`CONNECT <peer_port>`) for guest port
    /// `peer_port`; we send the guest a REQUEST from `local_port`.
    pub fn new_local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port);
        c.send_request = true;
        c
    }

    /// The guest's REQUEST `req` was connected to `stream`; we answer
    /// RESPONSE.
    pub fn new_peer(stream: UnixStream, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(stream, guest_cid, req.dst_port, req.src_port);
        c.state = State::Established;
        c.send_response = true;
        c.update_peer_credit(req);
        c
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Our port (the host side).
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The host socket's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether the muxer can drop the connection (and close the socket).
    pub fn is_finished(&self) -> bool {
        self.state == State::Closed && !self.send_rst
    }

    /// How many more bytes the guest can take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether a packet is waiting for an rx buffer.
    pub fn has_rx(&self) -> bool {
        self.send_rst
            || (self.state != State::Closed
                && (self.send_request
                    || self.send_response
                    || self.send_shutdown
                    || self.send_credit_update
                    || self.can_send_data()))
    }

    /// The epoll events to wait for on the host socket (`None`: none, not
    /// even hang-ups).
    pub fn wanted_events(&self) -> Option<u32> {
        let out = if self.preface.is_empty() && self.tx_buf.is_empty() {
            0
        } else {
            libc::EPOLLOUT as u32
        };
        match self.state {
            State::Closed => None,
            // Only hang-ups (always reported) until the guest answers.
            State::LocalInit => Some(0),
            State::Established => {
                let want_in =
                    !self.host_readable && !self.host_eof && self.peer_shut & SHUTDOWN_RCV == 0;
                let ev = out | if want_in { libc::EPOLLIN as u32 } else { 0 };
                (ev != 0).then_some(ev)
            }
        }
    }

    /// Ends the connection with an RST to the guest.
    pub fn reset(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.send_rst = true;
        }
    }

    /// Ends the connection without telling the guest (it reset it).
    fn close(&mut self) {
        self.state = State::Closed;
        self.send_rst = false;
    }

    /// The host socket has `events` (epoll bits).
    pub fn host_event(&mut self, events: u32) {
        let hangup = events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        match self.state {
            State::Closed => {}
            State::LocalInit => {
                if hangup {
                    debug!(
                        "vsock: host side of {} left before the guest answered",
                        self.local_port
                    );
                    // The guest may already have the REQUEST.
                    if self.send_request {
                        self.close();
                    } else {
                        self.reset();
                    }
                }
            }
            State::Established => {
                if events & libc::EPOLLIN as u32 != 0 || hangup {
                    self.host_readable = true;
                }
                if events & libc::EPOLLOUT as u32 != 0 {
                    self.flush_tx();
                }
            }
        }
    }

    /// A packet from the guest for this connection, its payload (RW) in
    /// the guest's buffer.
    pub fn guest_packet(&mut self, hdr: &Header, data: Option<&Payload<'_>>) {
        let hdr = *hdr;
        if self.state == State::Closed {
            return;
        }
        self.update_peer_credit(&hdr);
        match hdr.op {
            op::RESPONSE if self.state == State::LocalInit && !self.send_request => {
                self.state = State::Established;
                self.preface = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_tx();
            }
            op::RW if self.state == State::Established && self.peer_shut & SHUTDOWN_SEND == 0 => {
                let len = data.map_or(0, |d| d.len());
                if self.tx_buf.len() + len > CONN_BUF_ALLOC as usize {
                    debug!(
                        "vsock: guest overran its credit on port {}",
                        self.local_port
                    );
                    self.reset();
                    return;
                }
                if let Some(data) = data {
                    self.take_guest_data(data);
                }
                self.flush_tx();
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.send_credit_update = true,
            op::SHUTDOWN if self.state == State::Established => {
                self.peer_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush_tx();
                if self.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // The guest closed: it waits for our RST.
                    self.reset();
                }
            }
            op::RST => self.close(),
            _ => {
                debug!("vsock: unexpected op {} in state {:?}", hdr.op, self.state);
                self.reset();
            }
        }
    }

    /// Sends `data` (an RW payload in the guest's buffer) to the host
    /// socket straight from guest memory when nothing is waiting before
    /// it; what the socket does not take now is copied into `tx_buf`.
    fn take_guest_data(&mut self, data: &Payload<'_>) {
        let mut sent = 0;
        if self.preface.is_empty() && self.tx_buf.is_empty() {
            while sent < data.len() {
                let guard = data.ptr_guard();
                // SAFETY: `guard` points at `data.len()` bytes of mapped
                // guest memory that stay mapped while it lives, and `sent`
                // is below that length: the rest is readable for the call.
                // Only the kernel reads it (the guest may change it
                // meanwhile: its own data; no Rust reference is made).
                let r = unsafe {
                    send_raw_nosignal(&self.stream, guard.as_ptr().add(sent), data.len() - sent)
                };
                match r {
                    Ok(n) => {
                        sent += n;
                        self.fwd_cnt += n as u32;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return self.reset(),
                }
            }
        }
        if sent < data.len() {
            let mut rest = vec![0u8; data.len() - sent];
            if let Ok(tail) = data.offset(sent) {
                tail.copy_to(&mut rest[..]);
            }
            self.tx_buf.extend(rest.iter());
        }
    }

    /// Writes what the guest sent to the host socket, as far as it takes it.
    fn flush_tx(&mut self) {
        while !self.preface.is_empty() {
            match send_nosignal(&self.stream, &self.preface) {
                Ok(n) => {
                    self.preface.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.reset(),
            }
        }
        while !self.tx_buf.is_empty() {
            let (chunk, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, chunk) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.reset(),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
        if self.tx_buf.is_empty() && self.peer_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        self.check_both_closed();
    }

    /// Both directions are finished: close with an RST (the guest waits for
    /// one after its last SHUTDOWN).
    fn check_both_closed(&mut self) {
        if self.state == State::Established
            && self.host_eof
            && !self.send_shutdown
            && self.host_write_shut
        {
            self.reset();
        }
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, whose rx buffer has `buf` for its
    /// payload (written there); `None` if there is nothing to send.
    pub fn next_rx(&mut self, buf: &Payload<'_>) -> Option<Header> {
        if self.send_rst {
            self.send_rst = false;
            return Some(self.header(op::RST));
        }
        if self.state == State::Closed {
            return None;
        }
        if self.send_request {
            self.send_request = false;
            return Some(self.header(op::REQUEST));
        }
        if self.send_response {
            self.send_response = false;
            return Some(self.header(op::RESPONSE));
        }
        if self.can_send_data() {
            let n = buf.len().min(self.peer_credit() as usize).min(MAX_PKT_DATA);
            if n > 0 {
                if let Some(hdr) = self.read_host(buf, n) {
                    return Some(hdr);
                }
            }
        }
        if self.state == State::Closed {
            return self.next_rx(buf); // a read error queued an RST
        }
        if self.send_shutdown {
            self.send_shutdown = false;
            let mut hdr = self.header(op::SHUTDOWN);
            hdr.flags = SHUTDOWN_SEND;
            self.check_both_closed();
            return Some(hdr);
        }
        if self.send_credit_update {
            self.send_credit_update = false;
            return Some(self.header(op::CREDIT_UPDATE));
        }
        None
    }

    /// Reads up to `n` bytes (at most `buf.len()`) from the host socket
    /// straight into `buf`; the RW header for them.
    fn read_host(&mut self, buf: &Payload<'_>, n: usize) -> Option<Header> {
        let n = n.min(buf.len());
        loop {
            let guard = buf.ptr_guard_mut();
            // SAFETY: `guard` points at `buf.len()` bytes of mapped guest
            // memory (at least `n`) that stay mapped while it lives; the
            // kernel writes at most `n` of them, and the fd is owned by
            // `self.stream`.
            let got = unsafe { libc::read(self.stream.as_raw_fd(), guard.as_ptr().cast(), n) };
            if got >= 0 {
                let len = got as usize;
                if len == 0 {
                    self.host_readable = false;
                    self.host_eof = true;
                    self.send_shutdown = true;
                    return None;
                }
                self.rx_cnt += len as u32;
                self.send_credit_update = false; // the header carries fwd_cnt
                let mut hdr = self.header(op::RW);
                hdr.len = len as u32;
                return Some(hdr);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                _ => {
                    debug!(
                        "vsock: reading host socket of port {}: {e}",
                        self.local_port
                    );
                    self.reset();
                    return None;
                }
            }
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a host peer that went away gives `EPIPE`,
/// never a `SIGPIPE` (whatever the process's signal disposition).
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is readable for its length for the whole call.
    unsafe { send_raw_nosignal(stream, buf.as_ptr(), buf.len()) }
}

/// [`send_nosignal`] of `len` bytes at `ptr` (guest memory, read by the
/// kernel alone).
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the whole call.
unsafe fn send_raw_nosignal(stream: &UnixStream, ptr: *const u8, len: usize) -> io::Result<usize> {
    // SAFETY: `ptr` is readable for `len` bytes (the caller's contract), and
    // the fd is owned by `stream`, which outlives the call.
    let n = unsafe { libc::send(stream.as_raw_fd(), ptr.cast(), len, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

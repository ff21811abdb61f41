//! vsock packets as the muxer sees them: a decoded header, and the payload
//! where it lies in guest memory ([`Payload`]): the host socket is written
//! from it and read into it, with no copy in between.

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused or closed).
    pub const RST: u16 = 3;
    /// The sender will not send and/or receive any more.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buffer space.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the receiver for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A `virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

/// A payload where it lies: in guest memory (in tests, a buffer). The
/// guest may change it at any time, so only volatile copies and system
/// calls touch it, never a Rust reference.
pub type Payload<'a> = vm_memory::VolatileSlice<'a, ()>;

impl Header {
    /// The reply to `pkt` with the addresses swapped and `op`, no payload.
    pub fn reply_to(pkt: &Header, op: u16) -> Header {
        Header {
            src_cid: pkt.dst_cid,
            dst_cid: pkt.src_cid,
            src_port: pkt.dst_port,
            dst_port: pkt.src_port,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }
}

/// A packet with its payload in a buffer of its own (`hdr.len ==
/// data.len()`): what tests and fuzzers play the guest with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    /// The header.
    pub hdr: Header,
    /// The payload (RW packets only).
    pub data: Vec<u8>,
}

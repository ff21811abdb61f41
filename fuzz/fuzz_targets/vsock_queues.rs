//! The vsock muxer behind real rx/tx virtqueues (`VirtqQueues`): tx packets
//! (headers and payloads), rx buffers and the queue layout come from the
//! input. The muxer's Unix socket lives in a per-process scratch directory,
//! with a listener on one guest-connectable port (`<uds>_1024`) and host
//! clients that connect through the muxer's `CONNECT <port>` line.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use devices::virtio::vsock::packet::{Header, HOST_CID, TYPE_STREAM};
use devices::virtio::vsock::queue_handler::VirtqQueues;
use devices::virtio::vsock::{connection, muxer, Muxer, QUEUE_SIZE};
use devices::virtio::VirtioInterrupt;
use libfuzzer_sys::fuzz_target;
use sandboxvm_fuzz::{
    check_used, driver_step, encode_vsock_header, guest_memory, make_available, rx_tx_queues,
    scratch_dir, write_desc, Input, VSOCK_HDR_LEN,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CID: u64 = 3;
const LISTEN_PORT: u32 = 1024;
const HDR_LEN: usize = VSOCK_HDR_LEN;
/// The largest payload the device puts in one rx packet.
const MAX_PKT_DATA: u32 = connection::MAX_PKT_DATA as u32;

/// A header from the input, mostly with the CIDs and type the muxer
/// accepts so the fuzzer reaches the connection state machines.
fn header(inp: &mut Input, len: u32) -> [u8; HDR_LEN] {
    let tag = inp.u8();
    let (src_cid, dst_cid, type_) = if tag & 0xf0 == 0xf0 {
        (inp.u64(), inp.u64(), inp.u16())
    } else {
        (CID, HOST_CID, TYPE_STREAM)
    };
    let src_port = u32::from(inp.u8() % 4) + 5000;
    let dst_port = match inp.u8() % 4 {
        0 => LISTEN_PORT,
        1 => inp.u32(),
        // The host side's local ports (host-initiated connections).
        2 => muxer::LOCAL_PORT_BASE + u32::from(inp.u8() % 4),
        _ => 7,
    };
    let op_ = match inp.u8() {
        x @ 0..=7 => u16::from(x),
        _ => inp.u16(),
    };
    let len = if tag & 1 != 0 { inp.u32() } else { len };
    // The last three fields are read from the input in this order.
    encode_vsock_header(&Header {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        len,
        type_,
        op: op_,
        flags: inp.u32(),
        buf_alloc: inp.u32(),
        fwd_cnt: inp.u32(),
    })
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = guest_memory();
    let Some((mut rxq, mut txq, strict)) = rx_tx_queues(&mut inp, &mem, QUEUE_SIZE) else {
        return;
    };
    let dir = scratch_dir();
    let uds = dir.join("vsock.sock");
    let _ = std::fs::remove_file(&uds);
    let port_path = dir.join(format!("vsock.sock_{LISTEN_PORT}"));
    let _ = std::fs::remove_file(&port_path);
    let listener = UnixListener::bind(&port_path).expect("port listener");
    listener.set_nonblocking(true).unwrap();
    let mut muxer = Muxer::new(CID, uds.clone()).expect("muxer");
    let irq = VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut accepted: Vec<UnixStream> = Vec::new();
    let mut clients: Vec<UnixStream> = Vec::new();
    // Where the next packet's bytes go: a bump allocator over guest memory.
    let mut cursor: u64 = 0x8_0000;

    for _ in 0..128 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 10 {
            0 | 1 => {
                // A tx packet in a well-formed chain: header descriptor,
                // then 0-2 payload descriptors.
                let payload_len = u32::from(inp.u16() % 4096);
                let h = header(&mut inp, payload_len);
                let size = txq.size();
                let head = inp.u16() % size;
                let split = inp.u8();
                let payload = inp.bytes(payload_len as usize);
                let at = cursor;
                cursor = (cursor + HDR_LEN as u64 + payload_len as u64 + 15) & !15;
                if cursor >= 0xf_0000 {
                    cursor = 0x8_0000;
                }
                let _ = mem.write_slice(&h, GuestAddress(at));
                let _ = mem.write_slice(payload, GuestAddress(at + HDR_LEN as u64));
                let n1 = head.wrapping_add(1) % size;
                let n2 = head.wrapping_add(2) % size;
                let plen = payload.len() as u32;
                match split % 3 {
                    0 => write_desc(&mem, txq.desc_table(), head, at, HDR_LEN as u32, 0, 0),
                    1 => {
                        write_desc(&mem, txq.desc_table(), head, at, HDR_LEN as u32, 1, n1);
                        write_desc(&mem, txq.desc_table(), n1, at + HDR_LEN as u64, plen, 0, 0);
                    }
                    _ => {
                        let half = plen / 2;
                        write_desc(&mem, txq.desc_table(), head, at, HDR_LEN as u32, 1, n1);
                        write_desc(&mem, txq.desc_table(), n1, at + HDR_LEN as u64, half, 1, n2);
                        write_desc(
                            &mem,
                            txq.desc_table(),
                            n2,
                            at + HDR_LEN as u64 + half as u64,
                            plen - half,
                            0,
                            0,
                        );
                    }
                }
                make_available(&mem, &txq, head);
            }
            2 => {
                // An rx buffer: header descriptor plus a data descriptor.
                let size = rxq.size();
                let head = inp.u16() % size;
                let n1 = head.wrapping_add(1) % size;
                let (at, data) = if inp.strict {
                    (
                        0x11_0000 + u64::from(inp.u8()) * 0x100,
                        0x12_0000 + u64::from(inp.u16() % 0x2f) * 0x1000,
                    )
                } else {
                    (
                        0xf_0000 + u64::from(inp.u8()) * 0x100,
                        0x11_0000 + u64::from(inp.u16() % 0x3f) * 0x1000,
                    )
                };
                let dlen = u32::from(inp.u16());
                if inp.bool() {
                    write_desc(&mem, rxq.desc_table(), head, at, HDR_LEN as u32, 2 | 1, n1);
                    write_desc(&mem, rxq.desc_table(), n1, data, dlen, 2, 0);
                } else {
                    write_desc(
                        &mem,
                        rxq.desc_table(),
                        head,
                        at,
                        HDR_LEN as u32 + dlen,
                        2,
                        0,
                    );
                }
                make_available(&mem, &rxq, head);
            }
            3 => {
                if !driver_step(&mem, &txq, &mut inp) {
                    break;
                }
            }
            4 => {
                if !driver_step(&mem, &rxq, &mut inp) {
                    break;
                }
            }
            5 => {
                // A host process connects through the muxer's socket.
                if clients.len() < 4 {
                    if let Ok(mut c) = UnixStream::connect(&uds) {
                        c.set_nonblocking(true).unwrap();
                        let line = match inp.u8() % 4 {
                            0 => format!("CONNECT {}\n", inp.u32()).into_bytes(),
                            1 => {
                                let n = usize::from(inp.u8() % 32);
                                inp.bytes(n).to_vec()
                            }
                            _ => format!("CONNECT {LISTEN_PORT}\n").into_bytes(),
                        };
                        let _ = c.write_all(&line);
                        clients.push(c);
                    }
                }
            }
            6 => {
                // Host-side traffic: accept the guest's connections, write
                // to / read from / close host streams.
                while let Ok((s, _)) = listener.accept() {
                    s.set_nonblocking(true).unwrap();
                    accepted.push(s);
                }
                let all = accepted.len() + clients.len();
                if all > 0 {
                    let i = usize::from(inp.u8()) % all;
                    let s = if i < accepted.len() {
                        &mut accepted[i]
                    } else {
                        &mut clients[i - accepted.len()]
                    };
                    match inp.u8() % 4 {
                        0 => {
                            let n = usize::from(inp.u16() % 8192);
                            let _ = s.write(&vec![0x5a; n]);
                        }
                        1 => {
                            let mut buf = [0u8; 4096];
                            let _ = s.read(&mut buf);
                        }
                        2 => {
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                        _ => {
                            if i < accepted.len() {
                                accepted.remove(i);
                            } else {
                                clients.remove(i - accepted.len());
                            }
                        }
                    }
                }
            }
            7 => muxer.reset(),
            _ => {
                let (rx_avail0, rx_used0) = (rxq.next_avail(), rxq.next_used());
                let (tx_avail0, tx_used0) = (txq.next_avail(), txq.next_used());
                let mut queues = VirtqQueues::new(&mem, &mut rxq, &mut txq, Some(&irq));
                muxer.process(&mut queues);
                drop(queues);
                // Every chain taken is used at once, tx with length 0, rx
                // with a header and at most one packet's payload.
                if strict {
                    check_used(&mem, &txq, tx_used0, 0, true, Some(txq.size().into()));
                    check_used(
                        &mem,
                        &rxq,
                        rx_used0,
                        HDR_LEN as u32 + MAX_PKT_DATA,
                        true,
                        Some(rxq.size().into()),
                    );
                }
                // Every chain taken is used at once, except those whose head
                // is out of range (`add_used` refuses them).
                assert!(
                    txq.next_avail().wrapping_sub(tx_avail0)
                        >= txq.next_used().wrapping_sub(tx_used0),
                    "tx used more chains than it took"
                );
                assert!(
                    rxq.next_avail().wrapping_sub(rx_avail0)
                        >= rxq.next_used().wrapping_sub(rx_used0),
                    "rx used more chains than it took"
                );
                assert!(muxer.connection_count() <= devices::virtio::vsock::muxer::MAX_CONNECTIONS);
            }
        }
    }
    drop(muxer);
    assert!(!uds.exists(), "the muxer left its socket behind");
    drop(listener);
    let _ = std::fs::remove_file(&port_path);
});

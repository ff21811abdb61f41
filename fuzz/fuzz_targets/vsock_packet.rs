//! vsock packet decoding and encoding (`VirtqQueues::pop_tx` / `push_rx`,
//! over `virtio_vsock::packet::VsockPacket`): arbitrary header bytes and
//! payloads laid out in guest memory in input-chosen descriptor shapes.
//! A packet that decodes must match the bytes the guest wrote; a packet
//! written into an rx buffer must read back the same.

#![no_main]

use devices::virtio::vsock::connection::MAX_PKT_DATA;
use devices::virtio::vsock::packet::{Header, Packet};
use devices::virtio::vsock::queue_handler::VirtqQueues;
use devices::virtio::vsock::GuestQueues;
use libfuzzer_sys::fuzz_target;
use sandboxvm_fuzz::{
    decode_vsock_header as decode, guest_memory, used_entry, write_desc, Input, QueueSpec,
    VSOCK_HDR_LEN,
};
use vm_memory::{Bytes, GuestAddress};

const HDR_LEN: usize = VSOCK_HDR_LEN;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = guest_memory();
    // Fixed, valid rings: this target is about the packets, not the rings.
    let tx_spec = QueueSpec {
        size: 16,
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
        event_idx: false,
    };
    let rx_spec = QueueSpec {
        size: 16,
        desc: 0x4000,
        avail: 0x5000,
        used: 0x6000,
        event_idx: false,
    };
    let mut txq = tx_spec.build(&mem, 256).unwrap();
    let mut rxq = rx_spec.build(&mem, 256).unwrap();

    let shape = inp.u8();
    let mut raw = [0u8; HDR_LEN];
    let hb = inp.bytes(HDR_LEN);
    raw[..hb.len()].copy_from_slice(hb);
    // Often a header length that matches the payload that follows.
    if shape & 0x80 == 0 {
        let n = (inp.remaining() as u32).min(4096);
        raw[24..28].copy_from_slice(&n.to_le_bytes());
    }
    let hdr = decode(&raw);
    let payload_len = (hdr.len as usize).min(4096).min(inp.remaining());
    let payload = inp.bytes(payload_len).to_vec();

    // Header and payload somewhere in memory (possibly straddling the end
    // of a region or outside it).
    let hdr_at = if shape & 0x40 != 0 {
        inp.addr()
    } else {
        0x8000
    };
    let data_at = if shape & 0x20 != 0 {
        inp.addr()
    } else {
        0x9000
    };
    let _ = mem.write_slice(&raw, GuestAddress(hdr_at));
    let _ = mem.write_slice(&payload, GuestAddress(data_at));
    let hdr_desc_len = if shape & 0x10 != 0 {
        inp.u32()
    } else {
        HDR_LEN as u32
    };
    let data_desc_len = if shape & 0x08 != 0 {
        inp.u32()
    } else {
        payload.len() as u32
    };
    let write_flag = if shape & 0x04 != 0 { 2 } else { 0 };
    match shape & 3 {
        // Header and payload in one descriptor (Linux >= 6.2).
        0 => {
            let _ = mem.write_slice(&payload, GuestAddress(hdr_at.wrapping_add(HDR_LEN as u64)));
            write_desc(
                &mem,
                0,
                0,
                hdr_at,
                hdr_desc_len.wrapping_add(payload.len() as u32),
                write_flag,
                0,
            );
        }
        // Header descriptor, payload descriptor.
        1 => {
            write_desc(&mem, 0, 0, hdr_at, hdr_desc_len, write_flag | 1, 1);
            write_desc(&mem, 0, 1, data_at, data_desc_len, inp.u16() & !1, 0);
        }
        // A chain looping on itself, or through an arbitrary next.
        2 => {
            let next = inp.u16();
            write_desc(&mem, 0, 0, hdr_at, hdr_desc_len, write_flag | 1, next);
            write_desc(&mem, 0, next % 16, data_at, data_desc_len, inp.u16(), next);
        }
        // Indirect.
        _ => {
            let table = 0xa000;
            write_desc(&mem, table, 0, hdr_at, hdr_desc_len, write_flag | 1, 1);
            write_desc(&mem, table, 1, data_at, data_desc_len, inp.u16() & !4, 0);
            write_desc(&mem, 0, 0, table, 32, 4, 0);
        }
    }

    // An rx buffer: header and data descriptors from the input.
    let rx_shape = inp.u8();
    let rx_hdr_at = 0xc000 + u64::from(inp.u8());
    let rx_data_at = if rx_shape & 0x40 != 0 {
        inp.addr()
    } else {
        0xd000
    };
    let rx_hdr_len = if rx_shape & 0x20 != 0 {
        inp.u32()
    } else {
        HDR_LEN as u32
    };
    let rx_data_len = u32::from(inp.u16());
    if rx_shape & 1 != 0 {
        write_desc(&mem, 0x4000, 0, rx_hdr_at, rx_hdr_len, 2 | 1, 1);
        write_desc(&mem, 0x4000, 1, rx_data_at, rx_data_len, 2, 0);
    } else {
        write_desc(
            &mem,
            0x4000,
            0,
            rx_hdr_at,
            rx_hdr_len.wrapping_add(rx_data_len),
            2,
            0,
        );
    }
    // The rings last (the writes above may have hit them): one chain each,
    // head 0.
    for avail in [0x1000u64, 0x5000] {
        let _ = mem.write_obj(0u16, GuestAddress(avail));
        let _ = mem.write_obj(1u16, GuestAddress(avail + 2));
        let _ = mem.write_obj(0u16, GuestAddress(avail + 4));
    }

    // What the header descriptor points at before the device runs (the
    // writes above may have moved or overwritten things, descriptor 0's
    // flags among them, so it is indirect whenever its flags say so now;
    // the device's own used-ring write may land there afterwards).
    let d0_addr: u64 = mem.read_obj(GuestAddress(0)).unwrap();
    let d0_flags: u16 = mem.read_obj(GuestAddress(12)).unwrap();
    let head_addr = if d0_flags & 4 != 0 {
        mem.read_obj::<u64>(GuestAddress(d0_addr)).ok()
    } else {
        Some(d0_addr)
    };
    let mut got_raw = [0u8; HDR_LEN];
    let head_readable =
        head_addr.is_some_and(|a| mem.read_slice(&mut got_raw, GuestAddress(a)).is_ok());

    let mut q = VirtqQueues::new(&mem, &mut rxq, &mut txq, None);
    let mut decoded = 0;
    q.pop_tx(&mut |got, data| {
        decoded += 1;
        assert!(head_readable, "a header decoded from outside guest memory");
        assert_eq!(*got, decode(&got_raw), "decoded header");
        let len = data.map_or(0, |d| d.len());
        assert_eq!(len, got.len as usize, "payload length");
        assert!(len <= MAX_PKT_DATA, "oversized payload accepted");
        if let Some(d) = data {
            let mut bytes = vec![0u8; len];
            assert_eq!(d.copy_to(&mut bytes[..]), len, "payload readable");
        }
    });
    assert!(decoded <= 1);
    assert!(!q.pop_tx(&mut |_, _| panic!("one chain, one packet")));

    // Push a packet made of the rest of the input back to the guest.
    let out_len = inp.u16() as usize;
    let out_data = inp.bytes(out_len).to_vec();
    let out = Packet {
        hdr: Header {
            len: out_data.len() as u32,
            ..hdr
        },
        data: out_data,
    };
    let mut cap = None;
    let declined = q.push_rx(&mut |room| {
        cap = Some(room.len());
        None
    });
    assert_eq!(declined.is_some(), cap.is_some());
    let Some(cap) = cap else {
        return;
    };
    let filled = q.push_rx(&mut |room| {
        assert_eq!(Some(room.len()), Some(cap), "declining consumed a buffer");
        (out.data.len() <= cap).then(|| {
            room.copy_from(&out.data[..]);
            out.hdr
        })
    });
    if filled != Some(true) {
        return;
    }
    drop(q);
    if rx_shape & 0x40 != 0 {
        // The payload may have landed anywhere, the used ring too.
        return;
    }
    let (id, len) = used_entry(&mem, &rxq, 0).unwrap();
    assert_eq!(id, 0);
    assert!(len == 0 || len as usize == HDR_LEN + out.data.len());
    if len != 0 {
        let mut back = [0u8; HDR_LEN];
        mem.read_slice(&mut back, GuestAddress(rx_hdr_at)).unwrap();
        assert_eq!(decode(&back), out.hdr, "rx header round trip");
    }
});

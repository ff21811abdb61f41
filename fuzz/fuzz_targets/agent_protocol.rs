//! Decoding what crosses the agent channel: arbitrary bytes as every
//! request and reply message of `protocol/proto/agent.proto`, as a ttrpc
//! frame (10-byte header, then a `ttrpc.Request` or `ttrpc.Response` whose
//! payload is decoded as the message its method names, as the guest
//! agent's and the host runtime's ttrpc stacks do), and as the OCI mount
//! options the guest agent turns into mount(2) flags.
//!
//! Neither side parses ttrpc by hand (both use the `ttrpc` crate); the
//! host's own checks on replies (`runtime/src/agent.rs`, e.g. clamping
//! `WriteStdinResponse.len` to what was sent) are re-stated below.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::agent::*;
use ttrpc::proto::{MessageHeader, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX};

/// Decodes `bytes` as `M`; whatever decodes must encode and decode back to
/// the same message.
fn roundtrip<M: protobuf::MessageFull>(bytes: &[u8]) -> Option<M> {
    let m = M::parse_from_bytes(bytes).ok()?;
    let again = m.write_to_bytes().expect("a decoded message encodes");
    let back = M::parse_from_bytes(&again).expect("an encoded message decodes");
    assert!(back == m, "{} round trip", M::descriptor().name());
    Some(m)
}

/// Every message type of the service.
fn decode_all(bytes: &[u8]) {
    roundtrip::<Empty>(bytes);
    roundtrip::<CreateContainerRequest>(bytes);
    roundtrip::<ContainerRequest>(bytes);
    roundtrip::<ExecProcessRequest>(bytes);
    roundtrip::<ProcessRequest>(bytes);
    roundtrip::<WaitProcessResponse>(bytes);
    roundtrip::<SignalProcessRequest>(bytes);
    roundtrip::<WriteStdinRequest>(bytes);
    roundtrip::<WriteStdinResponse>(bytes);
    roundtrip::<ReadStreamRequest>(bytes);
    roundtrip::<ReadStreamResponse>(bytes);
    roundtrip::<TtyWinResizeRequest>(bytes);
    roundtrip::<StateContainerResponse>(bytes);
    roundtrip::<StatsContainerResponse>(bytes);
    roundtrip::<UpdateContainerRequest>(bytes);
    roundtrip::<ProcessInfo>(bytes);
    roundtrip::<ListProcessesResponse>(bytes);
    roundtrip::<GuestDetailsResponse>(bytes);
    roundtrip::<NetworkInterface>(bytes);
    roundtrip::<NetworkRoute>(bytes);
    roundtrip::<NetworkConfig>(bytes);
}

/// A request payload decoded as the message its method takes (what the
/// generated server dispatch does).
fn decode_request(method: &str, payload: &[u8]) {
    match method {
        "CreateContainer" => drop(roundtrip::<CreateContainerRequest>(payload)),
        "StartContainer" | "StateContainer" | "RemoveContainer" | "StatsContainer"
        | "ListProcesses" => drop(roundtrip::<ContainerRequest>(payload)),
        "ExecProcess" => drop(roundtrip::<ExecProcessRequest>(payload)),
        "WaitProcess" | "CloseStdin" => drop(roundtrip::<ProcessRequest>(payload)),
        "SignalProcess" => drop(roundtrip::<SignalProcessRequest>(payload)),
        "WriteStdin" => drop(roundtrip::<WriteStdinRequest>(payload)),
        "ReadStdout" | "ReadStderr" => drop(roundtrip::<ReadStreamRequest>(payload)),
        "TtyWinResize" => drop(roundtrip::<TtyWinResizeRequest>(payload)),
        "ConfigureNetwork" => drop(roundtrip::<NetworkConfig>(payload)),
        "UpdateContainer" => drop(roundtrip::<UpdateContainerRequest>(payload)),
        _ => drop(roundtrip::<Empty>(payload)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => decode_all(rest),
        1 | 2 => {
            // A ttrpc frame.
            if rest.len() < MESSAGE_HEADER_LENGTH {
                return;
            }
            let header = MessageHeader::from(&rest[..MESSAGE_HEADER_LENGTH]);
            // Oversized frames are refused before their body is read
            // (ttrpc's `check_oversize`).
            if header.length as usize > MESSAGE_LENGTH_MAX {
                return;
            }
            let body = &rest[MESSAGE_HEADER_LENGTH..];
            let payload = &body[..body.len().min(header.length as usize)];
            if mode % 4 == 1 {
                if let Some(req) = roundtrip::<ttrpc::Request>(payload) {
                    if req.service == "sandboxvm.agent.v1.Agent" || mode & 0x80 != 0 {
                        decode_request(&req.method, &req.payload);
                    }
                }
            } else if let Some(resp) = roundtrip::<ttrpc::Response>(payload) {
                decode_all(&resp.payload);
            }
        }
        _ => {
            // Mount options as in a spec's `mounts[].options`.
            let text = String::from_utf8_lossy(rest);
            let options: Vec<String> = text.split(',').map(str::to_string).collect();
            let (_flags, _propagation, data) = protocol::mount_options::parse(&options);
            assert!(
                data.len() <= text.len(),
                "mount data longer than the options"
            );
        }
    }
});

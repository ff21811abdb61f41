//! The device cgroup filter: `linux.resources.devices` as a cgroup v2
//! device program (BPF_PROG_TYPE_CGROUP_DEVICE) on the container's cgroup.
//!
//! The rules are runc's: the spec's list, then an allow rule for each of
//! `linux.devices`, then runc's default devices (mknod of anything; null,
//! zero, full, random, urandom, tty, ptmx and the ptys). A request is
//! decided by the last rule that matches it, and denied when none does: an
//! allow rule matches when it covers every access asked for, a deny rule
//! when it covers any of them. So a spec that starts with "deny all" (as
//! runc, Docker and containerd write it) or with nothing gets only what it
//! allows, and one that allows everything (`--privileged`) keeps every
//! device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::spec::DeviceConfig;
use super::Error;

/// Access bits as the kernel passes them (BPF_DEVCG_ACC_*).
const MKNOD: u32 = 1;
const READ: u32 = 2;
const WRITE: u32 = 4;
/// Device types as the kernel passes them (BPF_DEVCG_DEV_*).
const BLOCK: u32 = 1;
const CHAR: u32 = 2;

/// One rule: `kind` None for all types, `major`/`minor` None for any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

/// runc's default devices (libcontainer/specconv's AllowedDevices).
const DEFAULTS: [(u32, Option<u32>, Option<u32>, u32); 10] = [
    (CHAR, None, None, MKNOD),
    (BLOCK, None, None, MKNOD),
    (CHAR, Some(1), Some(3), MKNOD | READ | WRITE),
    (CHAR, Some(1), Some(8), MKNOD | READ | WRITE),
    (CHAR, Some(1), Some(7), MKNOD | READ | WRITE),
    (CHAR, Some(5), Some(0), MKNOD | READ | WRITE),
    (CHAR, Some(1), Some(5), MKNOD | READ | WRITE),
    (CHAR, Some(1), Some(9), MKNOD | READ | WRITE),
    (CHAR, Some(136), None, MKNOD | READ | WRITE),
    (CHAR, Some(5), Some(2), MKNOD | READ | WRITE),
];

/// The rules for a container: the spec's, its `linux.devices`, runc's
/// defaults, in that order.
pub fn rules(spec: &[LinuxDeviceCgroup], nodes: &[DeviceConfig]) -> Result<Vec<Rule>, Error> {
    let mut out = Vec::with_capacity(spec.len() + nodes.len() + DEFAULTS.len());
    for r in spec {
        out.push(spec_rule(r)?);
    }
    for d in nodes {
        let kind = match d.kind {
            nix::sys::stat::SFlag::S_IFBLK => BLOCK,
            nix::sys::stat::SFlag::S_IFCHR => CHAR,
            _ => continue, // a fifo is no device
        };
        out.push(Rule {
            allow: true,
            kind: Some(kind),
            major: u32::try_from(d.major).ok(),
            minor: u32::try_from(d.minor).ok(),
            access: MKNOD | READ | WRITE,
        });
    }
    out.extend(DEFAULTS.iter().map(|&(kind, major, minor, access)| Rule {
        allow: true,
        kind: Some(kind),
        major,
        minor,
        access,
    }));
    Ok(out)
}

fn spec_rule(r: &LinuxDeviceCgroup) -> Result<Rule, Error> {
    let bad = |why: String| Error::InvalidSpec(format!("linux.resources.devices: {why}"));
    let kind = match r.typ() {
        None | Some(LinuxDeviceType::A) => None,
        Some(LinuxDeviceType::C | LinuxDeviceType::U) => Some(CHAR),
        Some(LinuxDeviceType::B) => Some(BLOCK),
        Some(t) => return Err(bad(format!("type {t:?} is not a device type (a, b or c)"))),
    };
    let number = |what: &str, n: Option<i64>| match n {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| bad(format!("{what} {n} is not a device number"))),
    };
    let mut access = 0;
    for c in r.access().as_deref().unwrap_or("rwm").chars() {
        access |= match c {
            'r' => READ,
            'w' => WRITE,
            'm' => MKNOD,
            _ => return Err(bad(format!("access {:?}: only r, w and m", r.access()))),
        };
    }
    Ok(Rule {
        allow: r.allow(),
        kind,
        major: number("major", r.major())?,
        minor: number("minor", r.minor())?,
        access,
    })
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV32_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const MOV32_K: u8 = 0xb4; // BPF_ALU | BPF_MOV | BPF_K
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RSH32_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const JNE32_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
const JEQ32_K: u8 = 0x16; // BPF_JMP32 | BPF_JEQ | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// Registers: r1 the context (`struct bpf_cgroup_dev_ctx`: access_type,
// major, minor, u32 each); the program keeps the type in r2, the access
// in r3, major and minor in r4 and r5, and uses r6 as scratch.
const CTX: u8 = 1;
const TYPE: u8 = 2;
const ACCESS: u8 = 3;
const MAJOR: u8 = 4;
const MINOR: u8 = 5;
const TMP: u8 = 6;

/// The program for `rules`: the rules from last to first, each a block
/// that jumps to the next one when it does not match; deny at the end.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, TYPE, CTX, 0, 0),
        insn(MOV32_X, ACCESS, TYPE, 0, 0),
        insn(AND32_K, TYPE, 0, 0, 0xffff),
        insn(RSH32_K, ACCESS, 0, 0, 16),
        insn(LDX_W, MAJOR, CTX, 4, 0),
        insn(LDX_W, MINOR, CTX, 8, 0),
    ];
    for r in rules.iter().rev() {
        // Each test: (opcode, register, value, instructions before it that
        // set the register up).
        let mut block: Vec<Vec<Insn>> = Vec::new();
        if let Some(k) = r.kind {
            block.push(vec![insn(JNE32_K, TYPE, 0, 0, k as i32)]);
        }
        if let Some(m) = r.major {
            block.push(vec![insn(JNE32_K, MAJOR, 0, 0, m as i32)]);
        }
        if let Some(m) = r.minor {
            block.push(vec![insn(JNE32_K, MINOR, 0, 0, m as i32)]);
        }
        // allow: no access outside the rule's; deny: some inside it.
        let (mask, jump) = if r.allow {
            (!r.access & 7, JNE32_K)
        } else {
            (r.access, JEQ32_K)
        };
        block.push(vec![
            insn(MOV32_X, TMP, ACCESS, 0, 0),
            insn(AND32_K, TMP, 0, 0, mask as i32),
            insn(jump, TMP, 0, 0, 0),
        ]);
        let verdict = [
            insn(MOV32_K, 0, 0, 0, r.allow as i32),
            insn(EXIT, 0, 0, 0, 0),
        ];
        let len: usize = block.iter().map(Vec::len).sum::<usize>() + verdict.len();
        let mut done = 0;
        for part in block {
            done += part.len();
            let mut part = part;
            // The jump is each part's last instruction: past the block's
            // end when the rule does not match.
            if let Some(j) = part.last_mut() {
                j.off = (len - done) as i16;
            }
            p.extend(part);
        }
        p.extend(verdict);
    }
    p.push(insn(MOV32_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to expected_attach_type.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for `cmd`,
    // valid for the call; the kernel reads at most its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// BPF_PROG_LOAD of a device program, with the verifier's log in `log`
/// if given (a log too small for the verifier's text fails the load with
/// ENOSPC: asked for only to explain a refusal).
fn load(insns: &[Insn], log: Option<&mut [u8]>) -> std::io::Result<libc::c_long> {
    let license = c"Apache-2.0";
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    attr.prog_name[..7].copy_from_slice(b"devices");
    if let Some(log) = log {
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Loads the program for `rules` and attaches it to the cgroup at `dir`.
/// The kernel keeps it while the cgroup lives.
pub fn attach(dir: &Path, rules: &[Rule]) -> Result<(), Error> {
    let fail = |what: &str, e: std::io::Error| {
        Error::Setup(format!(
            "device cgroup filter of {}: {what}: {e}",
            dir.display()
        ))
    };
    let insns = program(rules);
    let prog = load(&insns, None).map_err(|e| {
        let mut log = vec![0u8; 64 * 1024];
        let _ = load(&insns, Some(&mut log));
        let end = log.iter().position(|&b| b == 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&log[..end]);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.is_empty())
            .unwrap_or("no verifier log");
        fail(&format!("load ({last})"), e)
    })?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor, owned here.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let cgroup = std::fs::File::open(dir).map_err(|e| fail("open", e))?;
    let mut at = ProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut at).map_err(|e| fail("attach", e))?;
    Ok(())
}

#[cfg(test)]
#[path = "devices_tests.rs"]
mod tests;

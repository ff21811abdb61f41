use super::*;

/// What `rules` decide for a request: the program's semantics, in Rust.
fn decide(rules: &[Rule], kind: u32, major: u32, minor: u32, access: u32) -> bool {
    for r in rules.iter().rev() {
        let device = r.kind.is_none_or(|k| k == kind)
            && r.major.is_none_or(|m| m == major)
            && r.minor.is_none_or(|m| m == minor);
        if !device {
            continue;
        }
        if r.allow && access & !r.access == 0 {
            return true;
        }
        if !r.allow && access & r.access != 0 {
            return false;
        }
    }
    false
}

/// Runs a generated program on one request: the few instructions
/// [`program`] emits, as the kernel's interpreter runs them.
fn run(p: &[Insn], kind: u32, major: u32, minor: u32, access: u32) -> bool {
    let ctx = [kind | access << 16, major, minor];
    let mut reg = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..10_000 {
        let i = p[pc];
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        let imm32 = i.imm as u32;
        pc += 1;
        match i.code {
            LDX_W => {
                assert_eq!(src, CTX as usize, "loads only from the context");
                reg[dst] = u64::from(ctx[i.off as usize / 4]);
            }
            MOV32_X => reg[dst] = reg[src] & 0xffff_ffff,
            MOV32_K => reg[dst] = u64::from(imm32),
            AND32_K => reg[dst] = (reg[dst] as u32 & imm32).into(),
            RSH32_K => reg[dst] = ((reg[dst] as u32) >> imm32).into(),
            JNE32_K | JEQ32_K => {
                let eq = reg[dst] as u32 == imm32;
                if eq == (i.code == JEQ32_K) {
                    pc = (pc as isize + i.off as isize) as usize;
                }
            }
            EXIT => return reg[0] == 1,
            c => panic!("opcode {c:#x} not emitted by program()"),
        }
    }
    panic!("the program did not end")
}

fn cg(json: serde_json::Value) -> Vec<LinuxDeviceCgroup> {
    serde_json::from_value(json).unwrap()
}

fn node(kind: nix::sys::stat::SFlag, major: u64, minor: u64) -> DeviceConfig {
    DeviceConfig {
        path: "/dev/x".into(),
        kind,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    }
}

/// Every request over a grid of types, numbers and accesses.
fn requests() -> impl Iterator<Item = (u32, u32, u32, u32)> {
    let numbers = [0, 1, 3, 5, 7, 9, 10, 136, 229, 254, u32::MAX];
    [BLOCK, CHAR].into_iter().flat_map(move |k| {
        numbers.into_iter().flat_map(move |ma| {
            numbers
                .into_iter()
                .flat_map(move |mi| (1..8).map(move |acc| (k, ma, mi, acc)))
        })
    })
}

#[test]
fn the_program_decides_every_request_as_the_rules_say() {
    use nix::sys::stat::SFlag;
    let specs = [
        serde_json::json!([]),
        serde_json::json!([{"allow": false, "access": "rwm"}]),
        serde_json::json!([{"allow": true, "access": "rwm"}]),
        serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
            {"allow": true, "type": "b", "major": 254, "access": "r"},
            {"allow": false, "type": "c", "major": 1, "minor": 9, "access": "w"},
        ]),
        serde_json::json!([
            {"allow": true, "type": "a", "major": -1, "minor": -1, "access": "rwm"},
            {"allow": false, "type": "c", "major": 1, "minor": 1, "access": "rw"},
            {"allow": false, "type": "b", "access": "m"},
        ]),
    ];
    for spec in specs {
        let rules = rules(&cg(spec.clone()), &[node(SFlag::S_IFCHR, 10, 200)]).unwrap();
        let p = program(&rules);
        for (k, ma, mi, acc) in requests() {
            assert_eq!(
                run(&p, k, ma, mi, acc),
                decide(&rules, k, ma, mi, acc),
                "{spec}: type {k} {ma}:{mi} access {acc}"
            );
        }
    }
}

#[test]
fn deny_all_keeps_runcs_defaults_and_the_specs_nodes_and_allow_all_keeps_everything() {
    use nix::sys::stat::SFlag;
    let deny_all = cg(serde_json::json!([{"allow": false, "access": "rwm"}]));
    let r = rules(&deny_all, &[node(SFlag::S_IFCHR, 10, 229)]).unwrap();
    let rw = READ | WRITE;
    assert!(decide(&r, CHAR, 1, 3, rw), "/dev/null");
    assert!(decide(&r, CHAR, 136, 4, rw), "a pty");
    assert!(decide(&r, CHAR, 10, 229, rw), "linux.devices' /dev/fuse");
    assert!(decide(&r, CHAR, 1, 1, MKNOD), "mknod of anything");
    assert!(!decide(&r, CHAR, 1, 1, READ), "/dev/mem");
    assert!(!decide(&r, BLOCK, 254, 0, READ), "a disk");
    assert!(!decide(&r, CHAR, 10, 200, rw), "/dev/net/tun");
    let all = rules(
        &cg(serde_json::json!([{"allow": true, "access": "rwm"}])),
        &[],
    )
    .unwrap();
    assert!(decide(&all, CHAR, 1, 1, rw) && decide(&all, BLOCK, 254, 0, rw | MKNOD));
    // An allow rule must cover every access asked for.
    let r_only = cg(
        serde_json::json!([{"allow": true, "type": "c", "major": 1, "minor": 1, "access": "r"}]),
    );
    let r = rules(&r_only, &[]).unwrap();
    assert!(decide(&r, CHAR, 1, 1, READ) && !decide(&r, CHAR, 1, 1, rw));
}

#[test]
fn a_rule_the_kernel_cannot_take_is_refused_by_name() {
    for (rule, says) in [
        (
            serde_json::json!({"allow": true, "type": "p"}),
            "type P is not a device type",
        ),
        (
            serde_json::json!({"allow": true, "access": "rwx"}),
            "only r, w and m",
        ),
        (
            serde_json::json!({"allow": true, "major": 1_i64 << 33}),
            "major 8589934592 is not a device number",
        ),
        (
            serde_json::json!({"allow": true, "minor": -2}),
            "minor -2 is not a device number",
        ),
    ] {
        let e = rules(&cg(serde_json::json!([rule])), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux.resources.devices: ") && e.contains(says),
            "{rule}: {e}"
        );
    }
}

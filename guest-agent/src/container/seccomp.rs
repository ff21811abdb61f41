//! The OCI seccomp profile (`linux.seccomp`), compiled to classic BPF in the
//! agent (with `seccompiler`) and installed in the container process just
//! before it runs the workload, as runc does.
//!
//! OCI profiles give each rule its own action, where a `seccompiler` filter
//! has one action on match and one on mismatch. A profile becomes a stack of
//! filters, which the kernel runs all of, keeping the most restrictive
//! answer (KILL_PROCESS, KILL_THREAD, TRAP, ERRNO, TRACE, LOG, ALLOW):
//! - the base filter: every rule's calls (with their argument conditions)
//!   are let through, anything else gets the default action;
//! - one filter per other action: that action's rules give it, anything
//!   else is let through.
//!
//! A call that matches a rule so gets the rule's action, one that matches
//! none gets the default, and a call that matches rules of two actions gets
//! the stricter (libseccomp leaves that case to its insertion order); of
//! two ERRNO rules with different numbers, the earlier rule's. The filters
//! are installed in reverse (the base last, while the others let
//! `seccomp(2)` through; the kernel runs the newest first and keeps the
//! first of equal actions).
//!
//! As runc: names this kernel does not know are skipped; the default errno
//! is EPERM; several conditions on the same argument are alternatives
//! (runc's "old behaviour"), others all must hold. Refused with a clear
//! error: SCMP_ACT_NOTIFY (a seccomp agent on the host cannot reach the
//! guest), an architecture list without x86_64, an argument index above 5.
//! Calls of other architectures (the guest kernel has no 32-bit ABI) are
//! killed by `seccompiler`'s architecture check.

use std::collections::BTreeMap;
use std::sync::Arc;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::syscalls;

/// A compiled profile: the filters, in the order they are installed, and
/// the `seccomp(2)` flags.
#[derive(Clone, Debug)]
pub struct Program {
    filters: Vec<BpfProgram>,
    flags: u32,
}

/// Calls of one action: number → alternatives (an empty list matches the
/// call whatever its arguments).
type Calls = BTreeMap<i64, Vec<SeccompRule>>;

fn refuse(msg: String) -> super::Error {
    super::Error::InvalidSpec(format!("linux.seccomp: {msg}"))
}

const EPERM: u32 = libc::EPERM as u32;

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, super::Error> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(EPERM)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(EPERM)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(refuse(
                "SCMP_ACT_NOTIFY is not supported: a seccomp agent on the host cannot serve \
                 calls made in the guest"
                    .into(),
            ))
        }
    })
}

fn condition(a: &LinuxSeccompArg) -> Result<SeccompCondition, super::Error> {
    let index = u8::try_from(a.index())
        .ok()
        .filter(|i| *i <= 5)
        .ok_or_else(|| refuse(format!("argument index {} (0 to 5)", a.index())))?;
    let (op, value) = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
        // libseccomp's SCMP_CMP_MASKED_EQ(mask, datum): value is the mask.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(a.value()),
            a.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| refuse(format!("argument {index}: {e}")))
}

/// The alternatives a rule's conditions make: none (any arguments), one
/// rule with all of them, or one rule per condition when an argument is
/// named twice.
fn alternatives(args: &[LinuxSeccompArg]) -> Result<Vec<SeccompRule>, super::Error> {
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let conds = args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
    let mut seen = [0u8; 6];
    for a in args {
        seen[a.index()] += 1;
    }
    let groups: Vec<Vec<SeccompCondition>> = if seen.iter().any(|n| *n > 1) {
        conds.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conds]
    };
    groups
        .into_iter()
        .map(|g| SeccompRule::new(g).map_err(|e| refuse(e.to_string())))
        .collect()
}

/// Adds `rules` for `nr` to `calls`: a call matched whatever its arguments
/// stays so.
fn add(calls: &mut Calls, nr: i64, rules: &[SeccompRule]) {
    match calls.get_mut(&nr) {
        None => {
            calls.insert(nr, rules.to_vec());
        }
        Some(existing) if existing.is_empty() => {}
        Some(existing) => {
            if rules.is_empty() {
                existing.clear();
            } else {
                existing.extend(rules.iter().cloned());
            }
        }
    }
}

fn filter(
    calls: Calls,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, super::Error> {
    SeccompFilter::new(calls, mismatch, on_match, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| refuse(e.to_string()))
}

fn flags(f: &[LinuxSeccompFilterFlag]) -> Result<u32, super::Error> {
    let mut out = 0;
    for flag in f {
        out |=
            match flag {
                LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
                LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                    libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
                }
                // The container process is single-threaded when it installs
                // the filter: synchronising threads is a no-op.
                LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
                LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => return Err(refuse(
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV needs SCMP_ACT_NOTIFY, which is not \
                     supported"
                        .into(),
                )),
            } as u32;
    }
    Ok(out)
}

/// Compiles a profile.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, super::Error> {
    if profile.listener_path().is_some() {
        return Err(refuse(
            "listenerPath is not supported: a seccomp agent on the host cannot serve calls made \
             in the guest"
                .into(),
        ));
    }
    if let Some(arches) = profile.architectures() {
        let native = [Arch::ScmpArchNative, Arch::ScmpArchX86_64];
        if !arches.is_empty() && !arches.iter().any(|a| native.contains(a)) {
            return Err(refuse(format!(
                "architectures {arches:?} do not include SCMP_ARCH_X86_64, the guest's"
            )));
        }
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    // (action, calls), in the order actions first appear.
    let mut by_action: Vec<(SeccompAction, Calls)> = Vec::new();
    let mut all = Calls::new();
    for rule in profile.syscalls().iter().flatten() {
        let act = rule_action(rule)?;
        let alts = alternatives(rule.args().as_deref().unwrap_or_default())?;
        let slot = match by_action.iter().position(|(a, _)| *a == act) {
            Some(i) => i,
            None => {
                by_action.push((act.clone(), Calls::new()));
                by_action.len() - 1
            }
        };
        for name in rule.names() {
            let Some(nr) = syscalls::number(name) else {
                continue;
            };
            add(&mut by_action[slot].1, nr, &alts);
            add(&mut all, nr, &alts);
        }
    }
    let mut filters = Vec::new();
    for (act, calls) in by_action.into_iter().rev() {
        if act != SeccompAction::Allow && !calls.is_empty() {
            filters.push(filter(calls, SeccompAction::Allow, act)?);
        }
    }
    if default != SeccompAction::Allow {
        filters.push(filter(all, default, SeccompAction::Allow)?);
    }
    Ok(Program {
        filters,
        flags: flags(profile.flags().as_deref().unwrap_or_default())?,
    })
}

fn rule_action(rule: &LinuxSyscall) -> Result<SeccompAction, super::Error> {
    action(rule.action(), rule.errno_ret())
}

/// Compiles the spec's profile, if it has one.
pub fn from_spec(
    linux: Option<&oci_spec::runtime::Linux>,
) -> Result<Option<Arc<Program>>, super::Error> {
    linux
        .and_then(|l| l.seccomp().as_ref())
        .map(|p| compile(p).map(Arc::new))
        .transpose()
}

impl Program {
    /// Installs the filters in the calling thread (the container process,
    /// single-threaded, after fork). Without no_new_privs this needs
    /// CAP_SYS_ADMIN.
    pub fn install(&self) -> Result<(), String> {
        for f in &self.filters {
            let prog = libc::sock_fprog {
                len: f.len() as u16,
                // seccompiler's sock_filter has libc's layout (repr(C),
                // same fields).
                filter: f.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: `prog` points at `f`, alive for the call; the kernel
            // copies the program.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &prog as *const libc::sock_fprog,
                )
            };
            if r != 0 {
                return Err(format!(
                    "install the seccomp profile: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    }

    /// How many filters the profile makes (for tests and logs).
    pub fn len(&self) -> usize {
        self.filters.len()
    }

    /// Whether the profile installs nothing (default allow, no rules).
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

#[cfg(test)]
#[path = "seccomp_tests.rs"]
mod tests;

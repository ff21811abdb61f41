use super::*;

fn profile(json: &str) -> LinuxSeccomp {
    serde_json::from_str(json).unwrap()
}

/// What a forked child saw: the errno of each call (0 = it worked), or
/// the signal that killed it.
#[derive(Debug, PartialEq)]
enum Seen {
    Errnos(Vec<i32>),
    Signal(i32),
}

/// Forks, installs `p` (with no_new_privs, as an unprivileged test may not
/// have CAP_SYS_ADMIN) and makes each call; reports what each returned.
fn run(p: &Program, calls: &[(i64, [i64; 2])]) -> Seen {
    let (rd, wr) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only makes raw system calls, writes to a pipe and
    // _exits: no allocation or lock after the fork.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            use std::os::fd::AsRawFd;
            // SAFETY: plain-integer prctl, then raw calls without pointers.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if p.install().is_err() {
                    libc::_exit(100);
                }
                for (nr, [a, b]) in calls {
                    let r = libc::syscall(*nr, *a, *b);
                    let e: i32 = if r < 0 { *libc::__errno_location() } else { 0 };
                    libc::write(wr.as_raw_fd(), (&e as *const i32).cast(), 4);
                }
                libc::_exit(0)
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut out = Vec::new();
            use std::io::Read;
            std::fs::File::from(rd).read_to_end(&mut out).unwrap();
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Seen::Errnos(
                    out.chunks(4)
                        .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                nix::sys::wait::WaitStatus::Signaled(_, s, _) => Seen::Signal(s as i32),
                other => panic!("child: {other:?}"),
            }
        }
    }
}

const GETPID: (i64, [i64; 2]) = (libc::SYS_getpid, [0, 0]);
const GETPPID: (i64, [i64; 2]) = (libc::SYS_getppid, [0, 0]);
const fn getpriority(which: i64) -> (i64, [i64; 2]) {
    (libc::SYS_getpriority, [which, 0])
}

#[test]
fn a_rule_blocks_its_call_with_its_errno_and_leaves_the_rest() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["getppid","no_such_call"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
    ))
    .unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(run(&p, &[GETPID, GETPPID]), Seen::Errnos(vec![0, 38]));
}

#[test]
fn an_allow_list_refuses_everything_else_with_the_default_errno() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":13,"architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
            "syscalls":[{"names":["getpid","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
                        {"names":["getpriority"],"action":"SCMP_ACT_ERRNO"}]}"#,
    ))
    .unwrap();
    assert_eq!(
        run(&p, &[GETPID, GETPPID, getpriority(0)]),
        Seen::Errnos(vec![0, 13, libc::EPERM])
    );
}

#[test]
fn argument_conditions_select_calls_and_a_repeated_argument_is_an_alternative() {
    // getpriority(which): blocked for PRIO_PGRP (1) or PRIO_USER (2).
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["getpriority"],"action":"SCMP_ACT_ERRNO","errnoRet":5,
             "args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"},{"index":0,"value":2,"op":"SCMP_CMP_EQ"}]}]}"#,
    ))
    .unwrap();
    assert_eq!(
        run(&p, &[getpriority(0), getpriority(1), getpriority(2)]),
        Seen::Errnos(vec![0, 5, 5])
    );
    // Conditions on different arguments must all hold; MASKED_EQ takes
    // the mask in value and the datum in valueTwo.
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["getpriority"],"action":"SCMP_ACT_ERRNO",
             "args":[{"index":0,"value":2,"valueTwo":2,"op":"SCMP_CMP_MASKED_EQ"},{"index":1,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
    ))
    .unwrap();
    assert_eq!(
        run(
            &p,
            &[
                getpriority(0),
                getpriority(2),
                getpriority(3),
                (libc::SYS_getpriority, [2, 1])
            ]
        ),
        Seen::Errnos(vec![0, libc::EPERM, libc::EPERM, libc::ESRCH])
    );
}

#[test]
fn a_call_outside_the_rules_of_a_killing_default_kills_the_process() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_KILL_PROCESS","syscalls":[
            {"names":["getpid","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
            {"names":["getpriority"],"action":"SCMP_ACT_ERRNO","errnoRet":7}]}"#,
    ))
    .unwrap();
    assert_eq!(run(&p, &[GETPID, getpriority(0)]), Seen::Errnos(vec![0, 7]));
    assert_eq!(run(&p, &[GETPID, GETPPID]), Seen::Signal(libc::SIGSYS));
}

#[test]
fn of_two_rules_for_one_call_the_stricter_wins_then_the_earlier() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
            {"names":["write","exit_group","getppid","getpid"],"action":"SCMP_ACT_ALLOW"},
            {"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":9},
            {"names":["getppid","getpid"],"action":"SCMP_ACT_ERRNO","errnoRet":4}]}"#,
    ))
    .unwrap();
    assert_eq!(run(&p, &[GETPPID, GETPID]), Seen::Errnos(vec![9, 4]));
}

#[test]
fn what_cannot_be_applied_in_a_guest_is_refused_by_name() {
    for (json, says) in [
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["getpid"],"action":"SCMP_ACT_NOTIFY"}]}"#,
            "SCMP_ACT_NOTIFY is not supported",
        ),
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
            "listenerPath is not supported",
        ),
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#,
            "do not include SCMP_ARCH_X86_64",
        ),
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["getpid"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
            "argument index 6",
        ),
    ] {
        let e = compile(&profile(json)).unwrap_err().to_string();
        assert!(e.contains("linux.seccomp: ") && e.contains(says), "{e}");
    }
}

#[test]
fn an_allow_everything_profile_installs_nothing() {
    let p = compile(&profile(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#)).unwrap();
    assert!(p.is_empty());
}

#[test]
fn what_sandboxvm_features_lists_compiles() {
    use protocol::guest_features as f;
    for a in f::SECCOMP_ACTIONS {
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["getpid"],"action":"{a}"}}]}}"#
        );
        compile(&profile(&json)).unwrap_or_else(|e| panic!("{a}: {e}"));
    }
    for op in f::SECCOMP_OPERATORS {
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["getpid"],"action":"SCMP_ACT_ERRNO","args":[{{"index":0,"value":1,"valueTwo":1,"op":"{op}"}}]}}]}}"#
        );
        compile(&profile(&json)).unwrap_or_else(|e| panic!("{op}: {e}"));
    }
    let json = format!(
        r#"{{"defaultAction":"SCMP_ACT_ERRNO","architectures":{:?},"flags":{:?}}}"#,
        f::SECCOMP_ARCHS,
        f::SECCOMP_FLAGS
    );
    compile(&profile(&json)).unwrap();
}

//! Forking container processes.
//!
//! Both the container init and exec'd processes are made with a double fork:
//! the agent forks an intermediate process A (single-threaded, so it may
//! unshare/setns the mount namespace), A joins the cgroup and namespaces,
//! unshares the new ones and forks B, reports B's pid and exits. B is the
//! workload: PID 1 of a new PID namespace when one was asked for (a process
//! only enters a PID namespace by being forked into it). B is reparented to
//! the agent (PID 1, or a child subreaper in test mode).
//!
//! B reports failures as `E<message>` on a CLOEXEC pipe; for an init it
//! writes `R` once set up, then blocks on the start pipe until
//! StartContainer. A successful execve closes the pipe (EOF = success).

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::fcntl::{open, OFlag};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{
    chdir, chroot, dup2, fchdir, fork, setgroups, sethostname, setresgid, setresuid, setsid,
    ForkResult, Gid, Uid,
};

use super::spec::{resolve_executable, ContainerConfig, ProcessConfig};
use super::{Error, Stdio};
use crate::reaper::reaper;

/// What to fork.
pub enum Kind<'a> {
    /// A container init: new namespaces, rootfs setup, wait on `start_rd`.
    Init {
        cfg: &'a ContainerConfig,
        start_rd: OwnedFd,
    },
    /// A process in the running container whose init has pid `init_pid`.
    Exec { init_pid: i32 },
}

/// A forked process: its pid and the read end of its error pipe.
pub struct Spawned {
    pub pid: i32,
    pub sync_rd: File,
}

pub(super) fn pipe() -> Result<(File, File), Error> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
    Ok((File::from(r), File::from(w)))
}

/// Forks the process; for an init, returns once it is set up (or failed).
pub fn spawn(
    kind: Kind<'_>,
    proc_cfg: &ProcessConfig,
    cgroup: Option<&PathBuf>,
    stdio: Stdio,
) -> Result<Spawned, Error> {
    let (mut sync_rd, sync_wr) = pipe()?;
    let (mut pid_rd, pid_wr) = pipe()?;
    let is_init = matches!(kind, Kind::Init { .. });
    let pid = {
        let mut table = reaper().lock();
        // SAFETY: the child only runs `intermediate`, which never returns:
        // it ends in `_exit` (or in B, execve/_exit). It uses no lock the
        // agent's other threads could hold (glibc's malloc is fork-safe)
        // and never touches the reaper table lock held here.
        match unsafe { fork() }.map_err(|e| Error::sys("fork", e))? {
            ForkResult::Child => {
                drop(sync_rd);
                drop(pid_rd);
                intermediate(kind, proc_cfg, cgroup, stdio, sync_wr, pid_wr)
            }
            ForkResult::Parent { .. } => {}
        }
        drop(pid_wr);
        drop(stdio);
        let mut buf = [0u8; 4];
        let got = pid_rd.read_exact(&mut buf);
        match got {
            Ok(()) => {
                let pid = i32::from_ne_bytes(buf);
                table.register(pid);
                pid
            }
            Err(_) => {
                drop(table);
                drop(sync_wr);
                let mut msg = String::new();
                let _ = sync_rd.read_to_string(&mut msg);
                let msg = msg.strip_prefix('E').unwrap_or(&msg).to_string();
                return Err(Error::Setup(if msg.is_empty() {
                    "the container process died during setup".into()
                } else {
                    msg
                }));
            }
        }
    };
    reaper().notify_spawned();
    drop(sync_wr);
    if is_init {
        let mut b = [0u8; 1];
        match sync_rd.read(&mut b) {
            Ok(1) if b[0] == b'R' => {}
            _ => {
                let mut msg = String::new();
                let _ = sync_rd.read_to_string(&mut msg);
                reaper().wait(pid);
                return Err(Error::Setup(if msg.is_empty() {
                    "the container init died during setup".into()
                } else {
                    msg
                }));
            }
        }
    } else {
        finish_exec(pid, &mut sync_rd)?;
    }
    Ok(Spawned { pid, sync_rd })
}

/// Reads the error pipe to EOF after the process was told to exec:
/// nothing = execve succeeded.
pub fn finish_exec(pid: i32, sync_rd: &mut File) -> Result<(), Error> {
    let mut msg = String::new();
    let _ = sync_rd.read_to_string(&mut msg);
    if msg.is_empty() {
        return Ok(());
    }
    reaper().wait(pid);
    let msg = msg.strip_prefix('E').unwrap_or(&msg).to_string();
    Err(Error::Setup(msg))
}

fn fail(mut w: &File, msg: &str) -> ! {
    let _ = w.write_all(format!("E{msg}").as_bytes());
    // SAFETY: _exit ends the forked child without running the parent's
    // atexit handlers or destructors.
    unsafe { libc::_exit(127) }
}

/// Closes every descriptor above 2 except `keep`.
fn close_other_fds(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep.iter().filter(|&&f| f > 2).map(|&f| f as u32).collect();
    keep.sort_unstable();
    let mut lo = 3u32;
    for k in keep {
        if k >= lo {
            if k > lo {
                // SAFETY: close_range only closes descriptors of this
                // (single-threaded, forked) process.
                unsafe { libc::syscall(libc::SYS_close_range, lo, k - 1, 0) };
            }
            lo = k + 1;
        }
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0) };
}

/// Process A: runs in the forked child; never returns.
fn intermediate(
    kind: Kind<'_>,
    proc_cfg: &ProcessConfig,
    cgroup: Option<&PathBuf>,
    stdio: Stdio,
    sync_wr: File,
    mut pid_wr: File,
) -> ! {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), String> {
        // Stdio first, then drop every other inherited descriptor (other
        // containers' pipes must not be held open by this one).
        for (fd, target) in [(&stdio.stdin, 0), (&stdio.stdout, 1), (&stdio.stderr, 2)] {
            dup2(fd.as_raw_fd(), target).map_err(|e| format!("dup2 stdio: {e}"))?;
        }
        let start_fd = match &kind {
            Kind::Init { start_rd, .. } => start_rd.as_raw_fd(),
            Kind::Exec { .. } => -1,
        };
        close_other_fds(&[sync_wr.as_raw_fd(), pid_wr.as_raw_fd(), start_fd]);
        if let Some(cg) = cgroup {
            std::fs::write(cg.join("cgroup.procs"), "0")
                .map_err(|e| format!("join cgroup {}: {e}", cg.display()))?;
        }
        // Limits and the OOM score here, in the guest's user namespace: in
        // the container's own, raising a hard limit or lowering the score
        // is refused. B inherits both.
        set_limits(proc_cfg)?;
        let mut root_fd = None;
        match &kind {
            Kind::Init { cfg, .. } => {
                for (flag, path) in &cfg.join_ns {
                    let fd = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                        .map_err(|e| format!("open namespace {}: {e}", path.display()))?;
                    // SAFETY: `fd` was just opened and is owned here.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    setns(&fd, *flag)
                        .map_err(|e| format!("join namespace {}: {e}", path.display()))?;
                }
                if let Some(maps) = &cfg.id_maps {
                    super::userns::enter_new(maps)?;
                }
                unshare(cfg.new_ns - CloneFlags::CLONE_NEWUSER)
                    .map_err(|e| format!("unshare namespaces: {e}"))?;
                if cfg.new_ns.contains(CloneFlags::CLONE_NEWNET) {
                    // A network namespace of its own: loopback only, up.
                    crate::init::loopback_up()
                        .map_err(|e| format!("loopback up in the new network namespace: {e}"))?;
                }
            }
            Kind::Exec { init_pid } => {
                let open_o = |p: String| -> Result<OwnedFd, String> {
                    let fd = open(
                        p.as_str(),
                        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| format!("open {p}: {e}"))?;
                    // SAFETY: `fd` was just opened and is owned here.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                };
                // Open everything first: /proc changes with the mount ns.
                root_fd = Some(open_o(format!("/proc/{init_pid}/root"))?);
                let mut fds = Vec::new();
                // The user namespace first: the others are its.
                for (ns, flag) in [
                    ("user", CloneFlags::CLONE_NEWUSER),
                    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
                    ("ipc", CloneFlags::CLONE_NEWIPC),
                    ("uts", CloneFlags::CLONE_NEWUTS),
                    ("net", CloneFlags::CLONE_NEWNET),
                    ("pid", CloneFlags::CLONE_NEWPID),
                    ("mnt", CloneFlags::CLONE_NEWNS),
                ] {
                    let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
                    let theirs = std::fs::read_link(format!("/proc/{init_pid}/ns/{ns}")).ok();
                    if mine != theirs {
                        fds.push((open_o(format!("/proc/{init_pid}/ns/{ns}"))?, flag, ns));
                    }
                }
                for (fd, flag, ns) in fds {
                    setns(&fd, flag).map_err(|e| format!("join {ns} namespace: {e}"))?;
                }
            }
        }
        // SAFETY: this process is single-threaded (forked), B only runs
        // `workload`, which ends in execve or _exit.
        match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
            ForkResult::Child => {
                drop(pid_wr);
                workload(kind, proc_cfg, root_fd, &sync_wr)
            }
            ForkResult::Parent { child } => {
                pid_wr
                    .write_all(&child.as_raw().to_ne_bytes())
                    .map_err(|e| format!("report pid: {e}"))?;
                Ok(())
            }
        }
    }));
    match r {
        Ok(Ok(())) => {
            // SAFETY: ends the intermediate process (see `fail`).
            unsafe { libc::_exit(0) }
        }
        Ok(Err(msg)) => fail(&sync_wr, &msg),
        Err(_) => fail(&sync_wr, "the agent's container setup panicked"),
    }
}

/// Process B: sets up and execs the workload; never returns.
fn workload(
    kind: Kind<'_>,
    p: &ProcessConfig,
    root_fd: Option<OwnedFd>,
    sync_wr: &File,
) -> Result<(), String> {
    let r = (|| -> Result<Infallible, String> {
        setsid().map_err(|e| format!("setsid: {e}"))?;
        if p.terminal {
            // SAFETY: TIOCSCTTY on stdin (the pty slave) takes no pointer.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
                return Err(format!(
                    "set controlling terminal: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let (start_rd, init_cfg) = match kind {
            Kind::Init { cfg, start_rd } => {
                if let Some(h) = &cfg.hostname {
                    if cfg.new_ns.contains(CloneFlags::CLONE_NEWUTS) {
                        sethostname(h).map_err(|e| format!("sethostname {h}: {e}"))?;
                    }
                }
                // In the container's namespaces, through the guest's /proc
                // (the container's may be read-only).
                for (key, value) in &cfg.sysctl {
                    let path = std::path::Path::new("/proc/sys").join(key);
                    std::fs::write(&path, value)
                        .map_err(|e| format!("linux.sysctl {}={value}: {e}", key.display()))?;
                }
                super::mounts::setup_rootfs(cfg)?;
                (Some(start_rd), Some(cfg))
            }
            Kind::Exec { .. } => {
                if let Some(fd) = &root_fd {
                    fchdir(fd.as_raw_fd()).map_err(|e| format!("enter container root: {e}"))?;
                    chroot(".").map_err(|e| format!("chroot container root: {e}"))?;
                }
                (None, None)
            }
        };
        drop(root_fd);
        let path = resolve_executable(&p.args[0], &p.path_env)?;
        let args: Vec<CString> = p
            .args
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| "NUL byte in process.args".to_string()))
            .collect::<Result<_, _>>()?;
        chdir(&p.cwd).map_err(|e| format!("chdir to cwd {}: {e}", p.cwd.display()))?;
        // The profile goes in as late as it can (the fewer calls it must
        // allow for set-up, the better): after the identity change with
        // no_new_privs; before it otherwise, while CAP_SYS_ADMIN is held.
        let seccomp = p.seccomp.as_deref();
        if let Some(s) = seccomp.filter(|_| !p.no_new_privileges) {
            s.install()?;
        }
        set_identity(p)?;
        if let Some(s) = seccomp.filter(|_| p.no_new_privileges) {
            s.install()?;
        }
        if let Some(start_rd) = start_rd {
            let mut start = File::from(start_rd);
            let _ = (&*sync_wr).write_all(b"R");
            let mut b = [0u8; 1];
            if !matches!(start.read(&mut b), Ok(1)) {
                // Removed before being started.
                // SAFETY: ends the forked child.
                unsafe { libc::_exit(1) }
            }
        }
        // Undo what the agent's runtime set: Rust ignores SIGPIPE.
        // SAFETY: resetting dispositions to default in a single-threaded
        // child about to exec.
        unsafe {
            for s in [
                Signal::SIGPIPE,
                Signal::SIGCHLD,
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
            ] {
                let _ = signal(s, SigHandler::SigDfl);
            }
        }
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        if let Some(cfg) = init_cfg.filter(|c| !c.start_hooks.is_empty()) {
            let mut state: serde_json::Value = serde_json::from_str(&cfg.state).unwrap_or_default();
            state["pid"] = std::process::id().into();
            let state = state.to_string();
            for h in &cfg.start_hooks {
                run_hook(h, &state)?;
            }
        }
        let e = nix::unistd::execve(&path, &args, &p.env).unwrap_err();
        Err(format!("exec: \"{}\": {}", p.args[0], e.desc()))
    })();
    match r {
        Err(msg) => fail(sync_wr, &msg),
        Ok(never) => match never {},
    }
}

/// Runs a startContainer hook (in the container, as its user, under its
/// seccomp profile, as runc does) with the state on its stdin; an exit
/// status other than 0, a signal or its timeout fail the start.
fn run_hook(h: &super::spec::HookConfig, state: &str) -> Result<(), String> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let name = h.path.to_string_lossy();
    let (rd, wr) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded (forked); the child only
    // redirects stdin and execs, or _exits.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(wr);
            let _ = dup2(rd.as_raw_fd(), 0);
            let _ = nix::unistd::execve(&h.path, &h.args, &h.env);
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(rd);
            let mut wr = File::from(wr);
            let _ = wr.write_all(state.as_bytes());
            drop(wr);
            let deadline = h
                .timeout
                .map(|t| std::time::Instant::now() + std::time::Duration::from_secs(t.into()));
            loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {
                        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                            let _ = waitpid(child, None);
                            return Err(format!(
                                "startContainer hook {name} timed out after {} s",
                                h.timeout.unwrap_or(0)
                            ));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
                    Ok(WaitStatus::Exited(_, 127)) => {
                        return Err(format!(
                            "startContainer hook {name}: cannot run it in the container"
                        ))
                    }
                    Ok(WaitStatus::Exited(_, c)) => {
                        return Err(format!(
                            "startContainer hook {name} failed (exit status {c})"
                        ))
                    }
                    Ok(WaitStatus::Signaled(_, s, _)) => {
                        return Err(format!("startContainer hook {name} failed (killed by {s})"))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("startContainer hook {name}: wait: {e}")),
                }
            }
        }
    }
}

/// `process.rlimits` and `oomScoreAdj`, applied to the calling process.
fn set_limits(p: &ProcessConfig) -> Result<(), String> {
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("oomScoreAdj {adj}: {e}"))?;
    }
    for (res, soft, hard) in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: *soft,
            rlim_max: *hard,
        };
        // SAFETY: `lim` is a valid rlimit for the duration of the call.
        if unsafe { libc::setrlimit(*res as _, &lim) } != 0 {
            return Err(format!(
                "setrlimit {res}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn set_identity(p: &ProcessConfig) -> Result<(), String> {
    if let Some(c) = &p.caps {
        for cap in caps::all() {
            if !c.bounding.contains(&cap) {
                let _ = caps::drop(None, caps::CapSet::Bounding, cap);
            }
        }
        // SAFETY: PR_SET_KEEPCAPS takes plain integers.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    }
    let gids: Vec<Gid> = p
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&gids).map_err(|e| format!("setgroups: {e}"))?;
    let gid = Gid::from_raw(p.gid);
    setresgid(gid, gid, gid).map_err(|e| format!("setgid {}: {e}", p.gid))?;
    let uid = Uid::from_raw(p.uid);
    setresuid(uid, uid, uid).map_err(|e| format!("setuid {}: {e}", p.uid))?;
    if let Some(c) = &p.caps {
        let set = |s, v: &std::collections::HashSet<caps::Capability>| {
            caps::set(None, s, v).map_err(|e| format!("set capabilities: {e}"))
        };
        // Effective must stay within permitted at every step: shrink it
        // first, then permitted, then inheritable (within the new bounding
        // and permitted sets).
        let effective: std::collections::HashSet<_> =
            c.effective.intersection(&c.permitted).copied().collect();
        set(caps::CapSet::Effective, &effective)?;
        set(caps::CapSet::Permitted, &c.permitted)?;
        set(caps::CapSet::Inheritable, &c.inheritable)?;
        let _ = caps::clear(None, caps::CapSet::Ambient);
        for cap in &c.ambient {
            let _ = caps::raise(None, caps::CapSet::Ambient, *cap);
        }
    }
    if p.no_new_privileges {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
    }
    if let Some(m) = p.umask {
        nix::sys::stat::umask(Mode::from_bits_truncate(m as libc::mode_t));
    }
    Ok(())
}

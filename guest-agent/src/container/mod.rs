//! OCI containers inside the guest: create/start/exec/wait/signal/io/remove.

pub mod cgroup;
pub mod devices;
pub mod mounts;
pub mod process;
pub mod seccomp;
pub mod spec;
mod syscalls;
pub mod userns;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Spec};

use crate::reaper::reaper;

/// Where virtio-fs shares are mounted.
pub const SHARES_DIR: &str = "/run/sandboxvm/shares";

/// Errors of container operations; the Display text is what the host sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("process {1:?} of container {0:?} not found")]
    ExecNotFound(String, String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    State(String),
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn sys(what: &str, source: nix::Error) -> Self {
        Error::Sys {
            what: what.to_string(),
            source,
        }
    }
    pub fn io(what: &str, source: std::io::Error) -> Self {
        Error::Io {
            what: what.to_string(),
            source,
        }
    }
}

/// The child's ends of its stdio.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends of a process's stdio.
struct ProcIo {
    stdin: Mutex<Option<File>>,
    stdout: Option<File>,
    stderr: Option<File>,
    pty: Option<File>,
}

fn make_stdio(terminal: bool) -> Result<(Stdio, ProcIo), Error> {
    if terminal {
        let pty = nix::pty::openpty(None, None).map_err(|e| Error::sys("openpty", e))?;
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| Error::sys("fcntl", e))?;
        }
        let dup = |f: &OwnedFd| f.try_clone().map_err(|e| Error::io("dup", e));
        let child = Stdio {
            stdin: dup(&pty.slave)?,
            stdout: dup(&pty.slave)?,
            stderr: pty.slave,
        };
        let master = File::from(pty.master);
        let io = ProcIo {
            stdin: Mutex::new(Some(master.try_clone().map_err(|e| Error::io("dup", e))?)),
            stdout: Some(master.try_clone().map_err(|e| Error::io("dup", e))?),
            stderr: None,
            pty: Some(master),
        };
        return Ok((child, io));
    }
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e));
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    for r in [&out_r, &err_r] {
        // Only a speed-up: the default size stays if the kernel refuses.
        let _ = nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(protocol::OUTPUT_CHUNK as libc::c_int),
        );
    }
    Ok((
        Stdio {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
        ProcIo {
            stdin: Mutex::new(Some(File::from(in_w))),
            stdout: Some(File::from(out_r)),
            stderr: Some(File::from(err_r)),
            pty: None,
        },
    ))
}

struct Proc {
    pid: i32,
    io: ProcIo,
}

struct Container {
    id: String,
    cgroup: Option<PathBuf>,
    /// The profile exec'd processes get too.
    seccomp: Option<Arc<seccomp::Program>>,
    init: Arc<Proc>,
    /// Write end of the start pipe and the init's error pipe, until started.
    start: Mutex<Option<(File, File)>>,
    started: Mutex<bool>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

/// Which stream to read.
#[derive(Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The agent's containers.
pub struct Manager {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    cgroup_root: PathBuf,
}

fn valid_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > 128 || id.contains('/') || id.starts_with('.') {
        return Err(Error::InvalidSpec(format!("invalid id {id:?}")));
    }
    Ok(())
}

/// Mounts the virtio-fs share `tag` if needed; returns its mount point.
fn mount_share(tag: &str) -> Result<PathBuf, Error> {
    valid_id(tag)?;
    let dir = Path::new(SHARES_DIR).join(tag);
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap_or("")));
    if !mounted {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(&format!("create {}", dir.display()), e))?;
        nix::mount::mount(
            Some(tag),
            &dir,
            Some("virtiofs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::sys(&format!("mount virtio-fs share {tag:?}"), e))?;
        widen_read_ahead(&dir);
    }
    Ok(dir)
}

/// Read-ahead of a FUSE mount, KiB: what a virtiofsd request carries at
/// most (1 MiB). The kernel's default, 128 KiB, makes a sequential read
/// eight times as many round trips to virtiofsd as it needs.
const SHARE_READ_AHEAD_KB: u32 = 1024;

/// Raises the read-ahead of the file system mounted on `dir` (its
/// backing device's `read_ahead_kb`); only a speed-up, so a failure is
/// logged, not returned.
fn widen_read_ahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let result = std::fs::metadata(dir).and_then(|m| {
        let dev = m.dev();
        let path = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        std::fs::write(path, SHARE_READ_AHEAD_KB.to_string())
    });
    if let Err(e) = result {
        log::debug!("read-ahead of {} not raised: {e}", dir.display());
    }
}

impl Manager {
    pub fn new(cgroup_root: PathBuf) -> Self {
        Manager {
            containers: Mutex::new(HashMap::new()),
            cgroup_root,
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, Error> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    fn proc(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>, Error> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::ExecNotFound(id.to_string(), exec_id.to_string()))
    }

    /// CreateContainer.
    pub fn create(
        &self,
        id: &str,
        spec_json: &str,
        share_tag: &str,
        subpath: &str,
    ) -> Result<(), Error> {
        valid_id(id)?;
        if self.get(id).is_ok() {
            return Err(Error::Exists(format!("container {id:?}")));
        }
        let spec: Spec = serde_json::from_str(spec_json)
            .map_err(|e| Error::InvalidSpec(format!("config.json: {e}")))?;
        let base = if share_tag.is_empty() {
            PathBuf::from("/")
        } else {
            mount_share(share_tag)?
        };
        let rootfs = base.join(subpath.trim_start_matches('/'));
        if !rootfs.is_dir() {
            return Err(Error::InvalidSpec(format!(
                "rootfs {} is not a directory",
                rootfs.display()
            )));
        }
        let mut cfg = spec::container_config(&spec, rootfs)?;
        cfg.state = serde_json::json!({
            "ociVersion": spec.version(),
            "id": id,
            "status": "created",
            "bundle": "/",
            "annotations": spec.annotations(),
        })
        .to_string();
        if cfg.in_guest_netns() {
            // The pod network: its DNS and hosts, unless the spec (CRI)
            // mounts its own.
            for (rel, text) in crate::network::etc_files(cfg.hostname.as_deref()) {
                if !cfg.mounts_at(&Path::new("/").join(rel)) {
                    cfg.etc_files.push((PathBuf::from(rel), text));
                }
            }
        }
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let device_rules = devices::rules(
            resources
                .and_then(|r| r.devices().as_deref())
                .unwrap_or_default(),
            &cfg.devices,
        )?;
        let cgroup = cgroup::create(&self.cgroup_root, id, resources, &device_rules)?;
        let cleanup = |cg: &Option<PathBuf>| {
            if let Some(cg) = cg {
                let _ = cgroup::remove(cg);
            }
        };
        // Kept until the init is set up (spawn returns): its mounts hold
        // the files then.
        let staged = mounts::stage_etc(&cfg, id).map_err(Error::Setup);
        let result = (|| {
            let staged = staged?;
            cfg.staged_etc = staged.files.clone();
            let (child_io, io) = make_stdio(cfg.process.terminal)?;
            let (start_rd, start_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::sys("pipe", e))?;
            let spawned = process::spawn(
                process::Kind::Init {
                    cfg: &cfg,
                    start_rd,
                },
                &cfg.process,
                cgroup.as_ref(),
                child_io,
            )?;
            Ok((spawned, io, File::from(start_wr)))
        })();
        let (spawned, io, start_wr) = match result {
            Ok(r) => r,
            Err(e) => {
                cleanup(&cgroup);
                return Err(e);
            }
        };
        let c = Container {
            id: id.to_string(),
            cgroup,
            seccomp: cfg.process.seccomp.clone(),
            init: Arc::new(Proc {
                pid: spawned.pid,
                io,
            }),
            start: Mutex::new(Some((start_wr, spawned.sync_rd))),
            started: Mutex::new(false),
            execs: Mutex::new(HashMap::new()),
        };
        log::info!("created container {id} (init pid {})", spawned.pid);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), Arc::new(c));
        Ok(())
    }

    /// StartContainer: lets the init exec the user program.
    pub fn start(&self, id: &str) -> Result<(), Error> {
        let c = self.get(id)?;
        let Some((mut start_wr, mut sync_rd)) =
            c.start.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return Err(Error::State(format!(
                "container {id:?} was already started"
            )));
        };
        *c.started.lock().unwrap_or_else(|e| e.into_inner()) = true;
        start_wr
            .write_all(b"S")
            .map_err(|e| Error::State(format!("container {id:?} init is gone: {e}")))?;
        drop(start_wr);
        process::finish_exec(c.init.pid, &mut sync_rd)
    }

    /// ExecProcess.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &str) -> Result<(), Error> {
        valid_id(exec_id)?;
        let c = self.get(id)?;
        if reaper().lock().status(c.init.pid).is_some()
            || !*c.started.lock().unwrap_or_else(|e| e.into_inner())
        {
            return Err(Error::State(format!("container {id:?} is not running")));
        }
        if c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(exec_id)
        {
            return Err(Error::Exists(format!(
                "exec {exec_id:?} in container {id:?}"
            )));
        }
        let p: oci_spec::runtime::Process = serde_json::from_str(process_json)
            .map_err(|e| Error::InvalidSpec(format!("process: {e}")))?;
        let mut pcfg = spec::process_config(&p)?;
        pcfg.seccomp = c.seccomp.clone();
        let (child_io, io) = make_stdio(pcfg.terminal)?;
        let spawned = process::spawn(
            process::Kind::Exec {
                init_pid: c.init.pid,
            },
            &pcfg,
            c.cgroup.as_ref(),
            child_io,
        )?;
        c.execs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            exec_id.to_string(),
            Arc::new(Proc {
                pid: spawned.pid,
                io,
            }),
        );
        Ok(())
    }

    /// WaitProcess: exit code or 128 + signal; for the init, whether the
    /// OOM killer killed a process of the container.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<(i32, bool), Error> {
        let p = self.proc(id, exec_id)?;
        let status = reaper().wait(p.pid);
        let oom = exec_id.is_empty()
            && self
                .get(id)?
                .cgroup
                .as_deref()
                .is_some_and(|cg| cgroup::oom_kills(cg) > 0);
        Ok((status, oom))
    }

    /// SignalProcess.
    pub fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<(), Error> {
        let c = self.get(id)?;
        let p = self.proc(id, exec_id)?;
        let sig = Signal::try_from(sig as i32)
            .map_err(|_| Error::InvalidSpec(format!("invalid signal {sig}")))?;
        if reaper().lock().status(p.pid).is_some() {
            return Err(Error::State(format!(
                "process {:?} of container {id:?} has exited",
                exec_id
            )));
        }
        let mut pids = vec![p.pid];
        if all && exec_id.is_empty() {
            if let Some(cg) = &c.cgroup {
                pids.extend(cgroup::procs(cg));
            }
        }
        for pid in pids {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(Error::sys(&format!("kill {pid}"), e)),
            }
        }
        Ok(())
    }

    /// WriteStdin.
    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize, Error> {
        let p = self.proc(id, exec_id)?;
        let mut stdin = p.io.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let f = stdin
            .as_mut()
            .ok_or_else(|| Error::State("stdin is closed".into()))?;
        f.write_all(data).map_err(|e| Error::io("write stdin", e))?;
        Ok(data.len())
    }

    /// CloseStdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Error> {
        let p = self.proc(id, exec_id)?;
        let mut stdin = p.io.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if p.io.pty.is_some() {
            // A pty has no half-close: send EOF (^D) to the line discipline.
            if let Some(f) = stdin.as_mut() {
                let _ = f.write_all(&[4]);
            }
        }
        *stdin = None;
        Ok(())
    }

    /// ReadStdout / ReadStderr: blocks until data; empty = EOF.
    pub fn read(
        &self,
        id: &str,
        exec_id: &str,
        stream: Stream,
        len: u32,
    ) -> Result<Vec<u8>, Error> {
        let p = self.proc(id, exec_id)?;
        let f = match stream {
            Stream::Stdout => p.io.stdout.as_ref(),
            Stream::Stderr => p.io.stderr.as_ref(),
        };
        let Some(mut f) = f else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; len.clamp(1, protocol::OUTPUT_CHUNK) as usize];
        loop {
            match f.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A pty master reads EIO once the slave side is closed.
                Err(e) if p.io.pty.is_some() && e.raw_os_error() == Some(libc::EIO) => {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(Error::io("read output", e)),
            }
        }
    }

    /// TtyWinResize.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), Error> {
        let p = self.proc(id, exec_id)?;
        let pty =
            p.io.pty
                .as_ref()
                .ok_or_else(|| Error::State("the process has no terminal".into()))?;
        let ws = libc::winsize {
            ws_row: rows.min(u16::MAX as u32) as u16,
            ws_col: cols.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that lives across the call.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(Error::io("TIOCSWINSZ", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// StateContainer: (status, pid, exit status).
    pub fn state(&self, id: &str) -> Result<(&'static str, u32, i32), Error> {
        let c = self.get(id)?;
        let exit = reaper().lock().status(c.init.pid);
        let started = *c.started.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match exit {
            Some(s) => ("stopped", c.init.pid as u32, s),
            None if started => ("running", c.init.pid as u32, 0),
            None => ("created", c.init.pid as u32, 0),
        })
    }

    /// UpdateContainer: `resources_json` (an OCI `LinuxResources`) applied
    /// to the container's cgroup at once.
    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), Error> {
        let c = self.get(id)?;
        let r: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| Error::InvalidSpec(format!("resources: {e}")))?;
        let dir = c
            .cgroup
            .as_deref()
            .ok_or_else(|| Error::State(format!("container {id} has no cgroup to update")))?;
        cgroup::apply(dir, &r)
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<(u64, u64, u64), Error> {
        let c = self.get(id)?;
        Ok(c.cgroup.as_deref().map(cgroup::stats).unwrap_or((0, 0, 0)))
    }

    /// ListProcesses: (pid, ppid, command line) of every live process of
    /// the container, by pid.
    pub fn processes(&self, id: &str) -> Result<Vec<(u32, u32, String)>, Error> {
        let c = self.get(id)?;
        let mut pids: Vec<i32> = match &c.cgroup {
            Some(cg) => cgroup::procs(cg),
            None => {
                let mut v = vec![c.init.pid];
                v.extend(
                    c.execs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .map(|p| p.pid),
                );
                v
            }
        };
        pids.sort_unstable();
        pids.dedup();
        Ok(pids
            .into_iter()
            .filter_map(|pid| process_info(pid).map(|(ppid, cmd)| (pid as u32, ppid, cmd)))
            .collect())
    }

    /// RemoveContainer: kills, reaps, removes the cgroup.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        let c = self.get(id)?;
        let execs: Vec<Arc<Proc>> = c
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut pids: Vec<i32> = execs.iter().map(|p| p.pid).collect();
        pids.push(c.init.pid);
        if let Some(cg) = &c.cgroup {
            cgroup::kill_all(cg);
        }
        for &pid in &pids {
            if reaper().lock().status(pid).is_none() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for &pid in &pids {
            if reaper()
                .wait_timeout(pid, Duration::from_secs(10))
                .is_none()
            {
                return Err(Error::State(format!(
                    "container {id:?}: process {pid} did not die"
                )));
            }
        }
        if let Some(cg) = &c.cgroup {
            cgroup::remove(cg)?;
        }
        {
            let mut t = reaper().lock();
            for pid in pids {
                t.forget(pid);
            }
        }
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&c.id);
        log::info!("removed container {id}");
        Ok(())
    }

    /// Ids of all containers.
    pub fn ids(&self) -> Vec<String> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// A live process's parent pid and command line; None if it is gone or a
/// zombie.
fn process_info(pid: i32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    let mut fields = tail.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ppid = fields.next()?.parse().ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cmd = if args.is_empty() {
        format!("[{comm}]")
    } else {
        args.join(" ")
    };
    Some((ppid, cmd))
}

#[cfg(test)]
mod process_info_tests {
    use super::process_info;

    #[test]
    fn a_live_process_has_its_parent_and_command_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Right after fork the child may not have exec'd sleep yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (ppid, cmd) = loop {
            let info = process_info(child.id() as i32).unwrap();
            if info.1 == "sleep 30" || std::time::Instant::now() > deadline {
                break info;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(ppid, std::process::id());
        assert_eq!(cmd, "sleep 30");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(process_info(child.id() as i32).is_none());
    }
}

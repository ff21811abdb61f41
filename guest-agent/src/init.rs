//! PID 1 duties in the guest: system mounts, loopback, logging, power off.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};

/// Mounts what the agent and the containers need.
pub fn setup_system() -> Vec<String> {
    let mut errors = Vec::new();
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nosuid_noexec_nodev, None),
        ("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("ptmxmode=0666,mode=0620"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            nosuid_noexec_nodev,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_noexec_nodev,
            None,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(src), target, Some(fstype), flags, data) {
            // devtmpfs may already be mounted by the kernel (CONFIG_DEVTMPFS_MOUNT).
            if e != nix::Error::EBUSY {
                errors.push(format!("mount {fstype} on {target}: {e}"));
            }
        }
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for c in ["+cpu", "+memory", "+pids"] {
        let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", c);
    }
    let _ = std::fs::create_dir_all("/tmp");
    if let Err(e) = loopback_up() {
        errors.push(format!("loopback up: {e}"));
    }
    errors
}

/// `ip link set lo up` with ioctls.
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    if r < 0 {
        Err(err)
    } else {
        Ok(())
    }
}

/// Syncs and ends the VM (the VMM stops on guest reboot). Never returns.
pub fn power_off(why: &str) -> ! {
    log::error!("powering off: {why}");
    nix::unistd::sync();
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::park();
    }
}

/// A logger to /dev/kmsg (PID 1) or stderr.
pub struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    kmsg: bool,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let prio = match r.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            _ => 7,
        };
        let line = if self.kmsg {
            format!("<{prio}>sandboxvm-agent: {}\n", r.args())
        } else {
            format!("sandboxvm-agent: {}: {}\n", r.level(), r.args())
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

/// Installs the logger: /dev/kmsg when `pid1` and it opens, else stderr.
pub fn init_logging(pid1: bool, level: log::LevelFilter) {
    let kmsg = if pid1 {
        OpenOptions::new().write(true).open("/dev/kmsg").ok()
    } else {
        None
    };
    let logger = match kmsg {
        Some(f) => Logger {
            out: Mutex::new(Box::new(f)),
            kmsg: true,
        },
        None => Logger {
            out: Mutex::new(Box::new(std::io::stderr())),
            kmsg: false,
        },
    };
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
}

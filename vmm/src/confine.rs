//! What the VMM gives up once its VM is built: every device, file and
//! socket it needs is open by then, so a device bug that the guest turns
//! into code execution finds a process with no capabilities, no way to gain
//! privileges through exec, and bounded resources. Applied before the vCPU
//! and device threads start, which inherit it.
//!
//! [`jail`] gives it a mount namespace of its own whose root holds nothing
//! but its sandbox's state directory (at its usual path), so the paths it
//! still opens (the console log's next generation, guest connections to
//! `vsock.sock_<port>`) cannot name any other host file or socket.
//!
//! [`apply`] can also make it an unprivileged user of its own ([`User`]):
//! everything it opened stays usable, the jail's directory is given to that
//! user (for the console log's next generation), and no file of the host's
//! root user is its own any more. With a user of its own, RLIMIT_NPROC
//! bounds its threads (it counts every task of the uid).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Most open files: the VM's fds, two per vsock connection (at most 1024),
/// epoll and event fds of the devices.
pub const NOFILE: u64 = 4096;
/// Largest file the VMM may write: its console log rotates at 2 MiB and its
/// own log stops at 16 MiB.
pub const FSIZE: u64 = 64 << 20;

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes `lim`, which lives for the call.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Never above the hard limit the VMM was given (raising it needs a
    // privilege the VMM may not have).
    let value = value.min(lim.rlim_max);
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads `lim`, which lives for the call.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn c(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// Moves the calling process (single-threaded: a mount namespace is per
/// process) into a mount namespace of its own whose root is an empty tmpfs
/// holding only `dir` (bound at its own absolute path, not recursively), and
/// detaches the host's tree from it. Everything opened before stays open.
pub fn jail(dir: &Path) -> io::Result<()> {
    let dir = dir.canonicalize()?;
    // SAFETY: unshare and mount take integers and NUL-terminated paths that
    // live for each call.
    unsafe {
        check(
            libc::unshare(libc::CLONE_NEWNS),
            "unshare the mount namespace",
        )?;
        // Nothing mounted here goes back to the host.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ),
            "make / a slave",
        )?;
    }
    let root = dir.join(".jail");
    match std::fs::create_dir(&root) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let root_c = c(&root)?;
    // 0711: a VMM that became another user (apply) still walks the path to
    // its directory, without listing anything.
    // SAFETY: as above.
    unsafe {
        check(
            libc::mount(
                c"tmpfs".as_ptr(),
                root_c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=64k,mode=0711".as_ptr().cast(),
            ),
            "mount the jail's root",
        )?;
    }
    let inside = root.join(dir.strip_prefix("/").unwrap_or(&dir));
    std::fs::create_dir_all(&inside)?;
    // Walkable by the VMM's own user (apply) whatever the umask.
    for d in inside
        .ancestors()
        .take_while(|d| d.starts_with(&root) && *d != root)
    {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    }
    let (dir_c, inside_c) = (c(&dir)?, c(&inside)?);
    // SAFETY: as above; pivot_root takes two NUL-terminated paths.
    unsafe {
        check(
            libc::mount(
                dir_c.as_ptr(),
                inside_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "bind the state directory into the jail",
        )?;
        check(libc::chdir(root_c.as_ptr()), "enter the jail")?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        // The host's tree, now stacked under ours: gone from this namespace.
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detach the host's tree",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    Ok(())
}

/// Most tasks (threads) of the VMM's own user: vCPUs and device workers.
pub const NPROC: u64 = 256;

/// First uid (and gid) of [`User::Auto`]: the VMM's pid is added, so that
/// no two live VMMs of one pid namespace share one (pids are below 2^22).
/// Runtimes in different pid namespaces on one host (nested containerised
/// nodes), or Kubernetes user-namespace ranges reaching this high, can meet
/// such ids: give `--user UID:GID` there.
pub const AUTO_ID_BASE: u32 = 0x7000_0000;

/// Which user the VMM becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// A uid and gid of its own: [`AUTO_ID_BASE`] + its pid.
    Auto,
    /// These.
    Ids {
        /// The uid.
        uid: u32,
        /// The gid.
        gid: u32,
    },
}

impl User {
    /// The ids this stands for, in this process.
    pub fn ids(self) -> (u32, u32) {
        match self {
            User::Auto => {
                let id = AUTO_ID_BASE + std::process::id();
                (id, id)
            }
            User::Ids { uid, gid } => (uid, gid),
        }
    }
}

/// As [`User`]'s `FromStr` reads it: `auto` or `UID:GID`.
impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            User::Auto => f.write_str("auto"),
            User::Ids { uid, gid } => write!(f, "{uid}:{gid}"),
        }
    }
}

impl std::str::FromStr for User {
    type Err = String;

    /// `auto`, `UID` or `UID:GID` (numbers; 0 is refused: the point is to
    /// stop being root).
    fn from_str(s: &str) -> Result<User, String> {
        if s == "auto" {
            return Ok(User::Auto);
        }
        let bad = || format!("{s:?}: expected auto, UID or UID:GID (numbers, not 0)");
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        let uid: u32 = u.parse().map_err(|_| bad())?;
        let gid: u32 = g.parse().map_err(|_| bad())?;
        if uid == 0 || gid == 0 || uid == u32::MAX || gid == u32::MAX {
            return Err(bad());
        }
        Ok(User::Ids { uid, gid })
    }
}

/// Gives `dir` (the jail's directory) to `user`, so that the VMM can still
/// make files there (the console log's next generation) once it is that
/// user.
pub fn give_dir(dir: &Path, user: User) -> io::Result<()> {
    let (uid, gid) = user.ids();
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
}

/// Confines the calling thread (and the threads it starts later): no new
/// privileges, no capabilities in any set, no core dumps (they would hold
/// guest memory), at most [`NOFILE`] files and `max_file` bytes a file
/// ([`FSIZE`], or a template's memory); with `user`, that user (no
/// supplementary groups) and at most [`NPROC`] tasks.
pub fn apply(user: Option<User>, max_file: u64) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    set_limit(libc::RLIMIT_CORE, 0)?;
    set_limit(libc::RLIMIT_NOFILE, NOFILE)?;
    set_limit(libc::RLIMIT_FSIZE, max_file)?;
    // The bounding set first (dropping from it needs CAP_SETPCAP, which
    // goes with the rest below); a process without privileges has nothing
    // to drop.
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments only; EINVAL past the last
        // capability the kernel knows.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) => break,
                Some(libc::EPERM) => {}
                _ => return Err(e),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if let Some(user) = user {
        let (uid, gid) = user.ids();
        set_limit(libc::RLIMIT_NPROC, NPROC)?;
        // SAFETY: setgroups with no list, setresgid and setresuid with
        // integers; still privileged here (the capabilities go below, and a
        // uid change from 0 clears the permitted set anyway).
        unsafe {
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(gid, gid, gid), "setresgid")?;
            check(libc::setresuid(uid, uid, uid), "setresuid")?;
        }
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two data structs (version 3),
    // all alive for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not a test by itself: the body of the process that
    /// `the_vmm_keeps_no_capability_and_cannot_regain_one` starts (the
    /// limits are per process and cannot be raised back).
    #[test]
    fn confined_child() {
        if std::env::var_os("SANDBOXVM_TEST_CONFINE_CHILD").is_none() {
            return;
        }
        apply(None, FSIZE).unwrap();
        // A thread started afterwards, as the vCPUs are.
        let status = std::thread::spawn(|| std::fs::read_to_string("/proc/thread-self/status"))
            .join()
            .unwrap()
            .unwrap();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        print!("{status}{limits}");
    }

    #[test]
    fn the_vmm_keeps_no_capability_and_cannot_regain_one() {
        let out = crate::child_test(
            "SANDBOXVM_TEST_CONFINE_CHILD",
            "confine::tests::confined_child",
            "1",
        )
        .output()
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_string()
        };
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
            assert_eq!(field(set), "0000000000000000", "{set}");
        }
        if nix_is_root() {
            assert_eq!(field("CapBnd:"), "0000000000000000");
        }
        assert_eq!(field("NoNewPrivs:"), "1");
        let limit = |name: &str| {
            let l = field(name);
            l.split_whitespace().next().unwrap().to_string()
        };
        assert_eq!(limit("Max core file size"), "0");
        assert_eq!(limit("Max open files"), NOFILE.to_string());
        assert_eq!(limit("Max file size"), FSIZE.to_string());
    }

    /// Not a test by itself: the jailed process of
    /// `a_jailed_vmm_sees_its_state_directory_and_nothing_else`.
    #[test]
    fn jailed_child() {
        let Some(dir) = std::env::var_os("SANDBOXVM_TEST_JAIL_CHILD") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let before = std::fs::File::open("/etc/hostname").unwrap();
        jail(&dir).unwrap();
        give_dir(&dir, User::Auto).unwrap();
        apply(Some(User::Auto), FSIZE).unwrap();
        let mut seen = String::new();
        seen += &format!(
            "state={:?}\n",
            std::fs::read_to_string(dir.join("state")).ok()
        );
        std::fs::write(dir.join("written"), "inside").unwrap();
        // A file of root's: not the VMM's own any more.
        seen += &format!(
            "root-file-writable={}\n",
            std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("roots"))
                .is_ok()
        );
        // SAFETY: getuid/getgid have no preconditions.
        seen += &format!("ids={} {}\n", unsafe { libc::getuid() }, unsafe {
            libc::getgid()
        });
        for p in ["/etc/passwd", "/run", "/proc/self", "/dev/kvm", "/tmp"] {
            seen += &format!("{p}={}\n", std::path::Path::new(p).exists());
        }
        // What was open before stays usable.
        seen += &format!("open-before={}\n", before.metadata().is_ok());
        print!("{seen}");
    }

    #[test]
    fn users_are_auto_or_numbers_never_root() {
        assert_eq!("auto".parse(), Ok(User::Auto));
        assert_eq!(
            "1000".parse(),
            Ok(User::Ids {
                uid: 1000,
                gid: 1000
            })
        );
        assert_eq!(
            "1000:2000".parse(),
            Ok(User::Ids {
                uid: 1000,
                gid: 2000
            })
        );
        for bad in ["0", "0:5", "5:0", "root", "-1", "", "1:2:3", "4294967295"] {
            assert!(bad.parse::<User>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_jailed_vmm_sees_its_state_directory_and_nothing_else() {
        if !nix_is_root() {
            eprintln!("skipped: needs root for a mount namespace");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sandboxvm-jail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), "here").unwrap();
        std::fs::write(dir.join("roots"), "root's").unwrap();
        std::fs::set_permissions(
            dir.join("roots"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let child = crate::child_test(
            "SANDBOXVM_TEST_JAIL_CHILD",
            "confine::tests::jailed_child",
            &dir,
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let id = AUTO_ID_BASE + child.id();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "state=Some(\"here\")",
            "/etc/passwd=false",
            "/run=false",
            "/proc/self=false",
            "/dev/kvm=false",
            "open-before=true",
            "root-file-writable=false",
            &format!("ids={id} {id}"),
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("written")).unwrap(),
            "inside"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}

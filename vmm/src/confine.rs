//! What the VMM gives up once its VM is built: every device, file and
//! socket it needs is open by then, so a device bug that the guest turns
//! into code execution finds a process with no capabilities, no way to gain
//! privileges through exec, and bounded resources. Applied before the vCPU
//! and device threads start, which inherit it.
//!
//! Not (yet) here: an unprivileged uid (the state files, /dev/kvm and the
//! taps would need their owners arranged), RLIMIT_NPROC (it counts every
//! process of the uid: for root, the whole host's), seccomp filters and a
//! mount namespace of its own.

use std::io;

/// Most open files: the VM's fds, two per vsock connection (at most 1024),
/// epoll and event fds of the devices.
pub const NOFILE: u64 = 4096;
/// Largest file the VMM may write: its console log rotates at 2 MiB and its
/// own log stops at 16 MiB.
pub const FSIZE: u64 = 64 << 20;

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
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

/// Confines the calling thread (and the threads it starts later): no new
/// privileges, no capabilities in any set, no core dumps (they would hold
/// guest memory), at most [`NOFILE`] files and [`FSIZE`] bytes a file.
pub fn apply() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    set_limit(libc::RLIMIT_CORE, 0)?;
    set_limit(libc::RLIMIT_NOFILE, NOFILE)?;
    set_limit(libc::RLIMIT_FSIZE, FSIZE)?;
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
        apply().unwrap();
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
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "confine::tests::confined_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SANDBOXVM_TEST_CONFINE_CHILD", "1")
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

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}

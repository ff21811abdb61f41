//! Per-thread seccomp filters for the VMM (allowlists kept as data in
//! `vmm/seccomp/x86_64.json`, see its README). A system call outside a
//! thread's list traps; the SIGSYS handler writes one line naming it to
//! stderr (the VMM's log) and ends the process with status [`EXIT_STATUS`].
//!
//! Filters are only installed once [`enable`] ran (the VMM binary does so
//! after the VM is built): library users and unit tests that run vCPUs are
//! not filtered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::BpfProgram;

/// The VMM's exit status after a seccomp violation (128 + SIGSYS).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

/// The kinds of threads, each with its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// The whole process, installed before any other thread exists.
    Process,
    /// The main thread once the vCPUs run.
    Main,
    /// A device's worker thread.
    Worker,
}

impl Thread {
    fn key(self) -> &'static str {
        match self {
            Thread::Process => "process",
            Thread::Main => "main",
            Thread::Worker => "worker",
        }
    }
}

/// Errors compiling or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The JSON allowlists do not compile.
    #[error("the seccomp filters do not compile: {0}")]
    Compile(String),
    /// The kernel refused a filter.
    #[error("cannot install the {0} seccomp filter: {1}")]
    Install(&'static str, String),
    /// The SIGSYS handler could not be installed.
    #[error("cannot handle SIGSYS: {0}")]
    Handler(std::io::Error),
}

static ENABLED: AtomicBool = AtomicBool::new(false);

fn filters() -> Result<&'static HashMap<String, BpfProgram>, Error> {
    static FILTERS: OnceLock<Result<HashMap<String, BpfProgram>, String>> = OnceLock::new();
    FILTERS
        .get_or_init(|| {
            let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
                .map_err(|e| format!("{e:?}"))?;
            seccompiler::compile_from_json(FILTERS_JSON.as_bytes(), arch).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Compile(e.clone()))
}

/// Installs the SIGSYS handler and the [`Thread::Process`] filter on the
/// calling thread (the only one), and turns filtering on for the threads
/// started later ([`apply`]). Needs no_new_privs (see `confine`).
pub fn enable() -> Result<(), Error> {
    filters()?;
    install_handler()?;
    ENABLED.store(true, Ordering::SeqCst);
    devices::virtio::worker::set_thread_start(|| {
        apply(Thread::Worker).map_err(|e| std::io::Error::other(e.to_string()))
    });
    apply(Thread::Process)
}

/// The compiled filter named `key` in the allowlists.
fn filter(key: &str) -> Result<&'static BpfProgram, Error> {
    filters()?
        .get(key)
        .ok_or_else(|| Error::Compile(format!("no {key} filter")))
}

/// Adds `thread`'s filter to the calling thread, if filtering is on.
pub fn apply(thread: Thread) -> Result<(), Error> {
    if !ENABLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    let prog = filter(thread.key())?;
    let installed = if thread == Thread::Process {
        // Every thread of the process, should one exist already; with
        // clone3 failing, so that new threads come from the clone whose
        // flags the process filter checks.
        let threads_only = filter("threads_only")?;
        seccompiler::apply_filter_all_threads(threads_only)
            .and_then(|()| seccompiler::apply_filter_all_threads(prog))
    } else {
        seccompiler::apply_filter(prog)
    };
    installed.map_err(|e| Error::Install(thread.key(), e.to_string()))
}

fn install_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; the handler only calls
    // async-signal-safe functions (write, _exit).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(Error::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Formats `n` in decimal into `buf`; the digits' length.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> usize {
    let mut tmp = [0u8; 10];
    let mut i = 0;
    loop {
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        i += 1;
        if n == 0 {
            break;
        }
    }
    for j in 0..i {
        buf[j] = tmp[i - 1 - j];
    }
    i
}

/// The line the handler writes for syscall `nr`, into `out`; its length.
fn violation_line(nr: u32, out: &mut [u8; 96]) -> usize {
    const HEAD: &[u8] = b"sandboxvm: VMM killed by seccomp: syscall ";
    let mut len = 0;
    for &b in HEAD {
        out[len] = b;
        len += 1;
    }
    let mut digits = [0u8; 10];
    let n = decimal(nr, &mut digits);
    out[len..len + n].copy_from_slice(&digits[..n]);
    len += n;
    out[len] = b'\n';
    len + 1
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO; for
    // SIGSYS its union holds {call_addr: *void, syscall: int, arch: uint}
    // right after the three ints and padding (offset 16): the syscall
    // number is at byte offset 24 on 64-bit Linux.
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) } as u32;
    let mut line = [0u8; 96];
    let len = violation_line(nr, &mut line);
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number of rules of each filter.
    fn sizes() -> Vec<(String, usize)> {
        let json: serde_json::Value = serde_json::from_str(FILTERS_JSON).unwrap_or_default();
        let mut out: Vec<(String, usize)> = json
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v["filter"].as_array().map_or(0, Vec::len)))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_allowlists_compile_and_are_narrower_per_thread() {
        let f = filters().unwrap();
        for key in ["process", "main", "worker"] {
            assert!(f.contains_key(key), "{key}");
        }
        let sizes: HashMap<String, usize> = sizes().into_iter().collect();
        assert!(sizes["main"] < sizes["process"], "{sizes:?}");
        assert!(sizes["worker"] < sizes["process"], "{sizes:?}");
    }

    #[test]
    fn the_violation_line_names_the_syscall() {
        let mut out = [0u8; 96];
        let n = violation_line(59, &mut out);
        assert_eq!(
            &out[..n],
            b"sandboxvm: VMM killed by seccomp: syscall 59\n".as_slice()
        );
        let n = violation_line(u32::MAX, &mut out);
        assert!(std::str::from_utf8(&out[..n])
            .unwrap()
            .ends_with(" 4294967295\n"));
    }

    /// Not a test by itself: the body of the process that
    /// `a_forbidden_syscall_ends_the_process_with_one_line` starts.
    #[test]
    fn filtered_child() {
        if std::env::var_os("SANDBOXVM_TEST_SECCOMP_CHILD").is_none() {
            return;
        }
        crate::confine::apply(None, crate::confine::FSIZE).unwrap();
        enable().unwrap();
        // A worker-like thread may not open files.
        let t = std::thread::spawn(|| {
            apply(Thread::Worker).unwrap();
            let _ = std::fs::File::open("/etc/hostname");
        });
        let _ = t.join();
        // Not reached: the handler ended the process.
        std::process::exit(0);
    }

    /// The body of the process that `the_vmm_makes_threads_but_cannot_fork`
    /// starts.
    #[test]
    fn forking_child() {
        if std::env::var_os("SANDBOXVM_TEST_SECCOMP_FORK").is_none() {
            return;
        }
        crate::confine::apply(None, crate::confine::FSIZE).unwrap();
        enable().unwrap();
        // Threads still come (clone3 fails, glibc falls back to clone).
        std::thread::spawn(|| eprintln!("a thread ran"))
            .join()
            .unwrap();
        // SAFETY: a clone3 call with no arguments: the filter answers
        // before the kernel would read them.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        eprintln!(
            "clone3: {rc} {}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        );
        // SAFETY: fork in a test process; the child would only exit.
        if unsafe { libc::fork() } == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        // Not reached: the handler ended the process on fork's clone.
        std::process::exit(0);
    }

    #[test]
    fn the_vmm_makes_threads_but_cannot_fork() {
        let out = crate::child_test(
            "SANDBOXVM_TEST_SECCOMP_FORK",
            "seccomp::tests::forking_child",
            "1",
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("a thread ran\n"), "{err}");
        assert!(err.contains("clone3: -1 38\n"), "ENOSYS: {err}");
        assert_eq!(out.status.code(), Some(EXIT_STATUS), "{err}");
        // clone (fork's, without CLONE_THREAD) is 56 on x86_64.
        assert!(
            err.contains("sandboxvm: VMM killed by seccomp: syscall 56\n"),
            "{err}"
        );
    }

    #[test]
    fn a_forbidden_syscall_ends_the_process_with_one_line() {
        let out = crate::child_test(
            "SANDBOXVM_TEST_SECCOMP_CHILD",
            "seccomp::tests::filtered_child",
            "1",
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_STATUS), "{err}");
        // openat is 257 on x86_64.
        assert!(
            err.contains("sandboxvm: VMM killed by seccomp: syscall 257\n"),
            "{err}"
        );
    }
}

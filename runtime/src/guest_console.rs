//! Explaining a guest that does not answer: its console log and its VMM's
//! threads. The console text is the guest's (attacker-controlled) and the
//! log may be large: only its end is read, lines are bounded and control
//! characters are escaped before the text reaches a host error or log.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of the log's end is read at most.
const TAIL_BYTES: u64 = 64 * 1024;
/// Longest line kept (in characters, before escaping).
const LINE_CHARS: usize = 200;

/// Console lines that tell why a guest stopped answering: RCU stalls (a dead
/// timer or a starved vCPU), soft/hard lockups, hung tasks, panics, OOM.
const TROUBLE: &[&str] = &[
    "rcu: INFO",
    "kthread timer wakeup didn't happen",
    "Possible timer handling issue",
    "self-detected stall",
    "detected stalls on CPUs",
    "soft lockup",
    "hard LOCKUP",
    "blocked for more than",
    "Kernel panic",
    "Out of memory",
];

/// The last `lines` lines of the log at `path` (escaped, bounded), from at
/// most its last 64 KiB; empty if it cannot be read.
pub fn tail(path: &Path, lines: usize) -> Vec<String> {
    let text = read_end(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| escape(l))
        .collect()
}

/// What the console says about a guest that did not answer: its trouble
/// lines (stall, lockup, panic reports; the first three) and its last
/// line, as one line; "" if the log is empty.
pub fn diagnose(path: &Path) -> String {
    let text = read_end(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let trouble: Vec<String> = lines
        .iter()
        .filter(|l| TROUBLE.iter().any(|t| l.contains(t)))
        .take(3)
        .map(|l| escape(l.trim()))
        .collect();
    let last = lines.last().map(|l| escape(l.trim()));
    match (trouble.is_empty(), last) {
        (_, None) => String::new(),
        (true, Some(last)) => format!("guest console ends: {last}"),
        (false, Some(last)) => format!(
            "guest console reports: {}; and ends: {last}",
            trouble.join(" | ")
        ),
    }
}

/// Where to look when a guest does not answer: its console log and its
/// VMM process.
#[derive(Debug, Clone, Default)]
pub struct Witnesses {
    /// The guest console log.
    pub console: Option<PathBuf>,
    /// The VMM's host pid.
    pub vmm_pid: Option<u32>,
}

impl Witnesses {
    /// Those of the sandbox whose state directory is `dir`, its VMM being
    /// `vmm_pid` (if it runs).
    pub fn of(dir: &Path, vmm_pid: Option<u32>) -> Witnesses {
        Witnesses {
            console: Some(crate::sandbox::console_log_in(dir)),
            vmm_pid,
        }
    }

    /// What they say, as "; ..." parts (console lines, then the VMM's
    /// threads: a vCPU thread blocked outside KVM_RUN freezes the guest), or
    /// "" if nothing.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.console {
            let d = diagnose(c);
            if !d.is_empty() {
                out.push_str("; ");
                out.push_str(&d);
            }
        }
        if let Some(pid) = self.vmm_pid {
            let t = threads(pid);
            if !t.is_empty() {
                out.push_str("; VMM threads: ");
                out.push_str(&t);
            }
        }
        out
    }
}

/// The threads of process `pid` with their state and, when asleep, the
/// kernel function they wait in: "vcpu0 R, vmm S(ep_poll)"; "" if gone.
pub fn threads(pid: u32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut tids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    let parts: Vec<String> = tids
        .iter()
        .take(16)
        .filter_map(|tid| {
            let base = format!("/proc/{pid}/task/{tid}");
            let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1;
            let state = rest.split_whitespace().next()?;
            let wchan = std::fs::read_to_string(format!("{base}/wchan")).unwrap_or_default();
            let wchan = wchan.trim();
            Some(if state == "R" || wchan.is_empty() || wchan == "0" {
                format!("{} {state}", escape(comm))
            } else {
                format!("{} {state}({})", escape(comm), escape(wchan))
            })
        })
        .collect();
    parts.join(", ")
}

fn read_end(path: &Path) -> std::io::Result<String> {
    let (now, len) = read_last(path, TAIL_BYTES)?;
    // The VMM rotates the log (vmm::console_file): a log shorter than the
    // tail continues the previous generation.
    let missing = TAIL_BYTES.saturating_sub(len);
    if missing > 0 {
        if let Ok((before, _)) = read_last(&vmm::console_file::previous(path), missing) {
            return Ok(before + &now);
        }
    }
    Ok(now)
}

/// The last `max` bytes of the file at `path`, from a line start, and the
/// file's length.
fn read_last(path: &Path, max: u64) -> std::io::Result<(String, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    // The log's directory belongs to the VMM's user: a regular file only,
    // never a symlink (to a host file) or a fifo (that would hang us).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let len = meta.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(max).read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        // The first line is cut: drop it.
        text = text
            .split_once('\n')
            .map(|x| x.1.to_string())
            .unwrap_or_default();
    }
    Ok((text, len))
}

/// Guest text made safe for a host line: bounded, control characters
/// (terminal escapes, carriage returns) shown as `\xNN`.
pub fn escape(line: &str) -> String {
    escape_within(line, LINE_CHARS)
}

/// [`escape`] with at most `max` characters kept.
pub fn escape_within(line: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in line.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", u32::from(c).min(0xff)));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log file holding `text`, removed when the guard drops.
    struct Log(std::path::PathBuf);
    impl Drop for Log {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn log(text: &str) -> (Log, std::path::PathBuf) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "sandboxvm-console-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        (Log(p.clone()), p)
    }

    #[test]
    fn a_console_log_swapped_for_a_symlink_or_a_fifo_is_not_read() {
        let (_secret, secret) = log("root:$6$secret:19000:0:99999:7:::\n");
        let (_l, link) = log("");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(tail(&link, 5).is_empty(), "followed a symlink");
        assert_eq!(diagnose(&link), "");
        let (_f, fifo) = log("");
        std::fs::remove_file(&fifo).unwrap();
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns (no writer would ever come) with nothing.
        assert!(tail(&fifo, 5).is_empty());
    }

    #[test]
    fn a_stall_report_is_named_with_the_last_line() {
        let (_d, p) = log("Linux version 6.1\n\
             rcu: INFO: rcu_sched detected stalls on CPUs/tasks:\n\
             rcu: rcu_sched kthread timer wakeup didn't happen for 7002 jiffies! g-1115 f0x0\n\
             rcu: \tPossible timer handling issue on cpu=0 timer-softirq=1\n\
             sandboxvm-agent: listening\n");
        let d = diagnose(&p);
        assert!(d.starts_with("guest console reports: rcu: INFO"), "{d}");
        assert!(d.contains("timer wakeup didn't happen"), "{d}");
        assert!(d.ends_with("and ends: sandboxvm-agent: listening"), "{d}");
    }

    #[test]
    fn a_rotated_log_is_read_across_its_two_generations() {
        let (_d, p) = log("c\n");
        let before = vmm::console_file::previous(&p);
        std::fs::write(&before, "a\nb\n").unwrap();
        assert_eq!(tail(&p, 3), ["a", "b", "c"]);
        std::fs::remove_file(before).unwrap();
        assert_eq!(tail(&p, 3), ["c"]);
    }

    #[test]
    fn a_quiet_console_gives_its_last_line_and_an_empty_one_nothing() {
        let (_d, p) = log("booting\nagent up\n\n");
        assert_eq!(diagnose(&p), "guest console ends: agent up");
        let (_d, p) = log("");
        assert_eq!(diagnose(&p), "");
        assert_eq!(diagnose(Path::new("/nonexistent/console.log")), "");
    }

    #[test]
    fn threads_of_a_process_have_names_and_states() {
        let me = threads(std::process::id());
        assert!(!me.is_empty());
        assert!(me.split(", ").all(|t| t.contains(' ')), "{me}");
        assert_eq!(threads(u32::MAX), "");
        let w = Witnesses {
            console: None,
            vmm_pid: Some(std::process::id()),
        };
        assert!(
            w.explain().starts_with("; VMM threads: "),
            "{}",
            w.explain()
        );
        assert_eq!(Witnesses::default().explain(), "");
    }

    #[test]
    fn only_the_end_of_a_huge_log_is_read_and_guest_text_is_escaped() {
        let mut text = "x".repeat(10 * 1024 * 1024);
        text.push_str("\nlast \x1b[2Jli\rne\n");
        let (_d, p) = log(&text);
        assert_eq!(tail(&p, 5), vec!["last \\x1b[2Jli\\x0dne".to_string()]);
        let long = "y".repeat(1000);
        assert_eq!(escape(&long).chars().count(), LINE_CHARS + 1);
    }
}

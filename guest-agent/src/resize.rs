//! `ResizeVm`: the guest side of growing a running VM. The VMM creates every
//! vCPU the VM may have, the extra ones offline (`maxcpus=`), and maps the
//! memory the VM may add above its boot RAM, outside the e820 map, telling
//! the guest where on its command line (`sandboxvm.hotplug=ADDR:LEN`). To
//! grow, the agent brings vCPUs online and adds memory blocks through the
//! kernel's sysfs interfaces (`cpuN/online`, `memory/probe`, `memoryN/state`).
//! It never shrinks the VM: a lower limit only changes the cgroups.

use std::path::{Path, PathBuf};

/// Errors from resizing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was asked cannot be done in this VM.
    #[error("{0}")]
    Invalid(String),
    /// The kernel refused.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
}

/// The kernel's sysfs, as resizing uses it (a seam for the unit tests).
pub trait Sys {
    /// Reads `rel` (under `/sys/devices/system`), trimmed.
    fn read(&self, rel: &str) -> std::io::Result<String>;
    /// Writes `value` to `rel`.
    fn write(&self, rel: &str, value: &str) -> std::io::Result<()>;
    /// Whether `rel` exists.
    fn exists(&self, rel: &str) -> bool;
    /// The names in directory `rel`.
    fn list(&self, rel: &str) -> std::io::Result<Vec<String>>;
}

/// The real sysfs.
pub struct SysFs(pub PathBuf);

impl Default for SysFs {
    fn default() -> SysFs {
        SysFs("/sys/devices/system".into())
    }
}

impl Sys for SysFs {
    fn read(&self, rel: &str) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(self.0.join(rel))?
            .trim()
            .to_string())
    }
    fn write(&self, rel: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.0.join(rel), value)
    }
    fn exists(&self, rel: &str) -> bool {
        self.0.join(rel).exists()
    }
    fn list(&self, rel: &str) -> std::io::Result<Vec<String>> {
        std::fs::read_dir(self.0.join(rel))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect()
    }
}

/// The memory the VM may add, from the kernel command line: `(address,
/// length)` in bytes, None when the VM has none. The first occurrence is
/// the VMM's (the configuration's parameters come after it).
pub fn hotplug_region(cmdline: &str) -> Result<Option<(u64, u64)>, Error> {
    let key = protocol::HOTPLUG_PARAM;
    let Some(value) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    else {
        return Ok(None);
    };
    let bad = || Error::Invalid(format!("malformed {key}={value:?}"));
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| bad());
    let (addr, len) = value.split_once(':').ok_or_else(bad)?;
    let (addr, len) = (hex(addr)?, hex(len)?);
    addr.checked_add(len).ok_or_else(bad)?;
    Ok(Some((addr, len)))
}

/// Brings vCPUs online, lowest first, until `want` are (or all present
/// are); returns how many are online.
pub fn online_cpus(sys: &dyn Sys, want: u32) -> Result<u32, Error> {
    let mut cpus: Vec<u32> = sys
        .list("cpu")
        .map_err(|source| Error::Sys {
            what: "cannot list the vCPUs".into(),
            source,
        })?
        .iter()
        .filter_map(|n| n.strip_prefix("cpu")?.parse().ok())
        .collect();
    cpus.sort_unstable();
    // A CPU without an `online` file (the boot CPU) cannot go offline.
    let is_online = |n: u32| {
        sys.read(&format!("cpu/cpu{n}/online"))
            .map_or(true, |s| s == "1")
    };
    let mut online = cpus.iter().filter(|&&n| is_online(n)).count() as u32;
    for &n in &cpus {
        if online >= want {
            break;
        }
        if is_online(n) {
            continue;
        }
        sys.write(&format!("cpu/cpu{n}/online"), "1")
            .map_err(|source| Error::Sys {
                what: format!("cannot bring vCPU {n} online"),
                source,
            })?;
        online += 1;
    }
    Ok(online)
}

/// Adds and onlines memory blocks of `region`, from its start, until at
/// least `want` bytes of it are; returns how many bytes are.
pub fn add_memory(sys: &dyn Sys, region: Option<(u64, u64)>, want: u64) -> Result<u64, Error> {
    let Some((addr, len)) = region else {
        return match want {
            0 => Ok(0),
            _ => Err(Error::Invalid(format!(
                "this VM has no memory to add (it was booted without {}=)",
                protocol::HOTPLUG_PARAM
            ))),
        };
    };
    if want == 0 {
        return Ok(0);
    }
    if !sys.exists("memory/probe") {
        return Err(Error::Invalid(
            "the guest kernel cannot add memory (no /sys/devices/system/memory/probe: \
             CONFIG_MEMORY_HOTPLUG and CONFIG_ARCH_MEMORY_PROBE)"
                .into(),
        ));
    }
    let block = sys
        .read("memory/block_size_bytes")
        .ok()
        .and_then(|s| u64::from_str_radix(&s, 16).ok())
        .filter(|&b| b > 0 && b.is_power_of_two())
        .ok_or_else(|| {
            Error::Invalid("the guest kernel's memory block size is unreadable".into())
        })?;
    if addr % block != 0 {
        return Err(Error::Invalid(format!(
            "the memory to add at {addr:#x} is not aligned to the guest's {block:#x}-byte blocks"
        )));
    }
    let mut added = 0;
    for start in (addr..addr + len / block * block).step_by(block as usize) {
        if added >= want {
            break;
        }
        let dir = format!("memory/memory{}", start / block);
        if !sys.exists(&dir) {
            match sys.write("memory/probe", &format!("{start:#x}")) {
                // Added meanwhile (by the guest's own kernel or a user).
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                r => r.map_err(|source| Error::Sys {
                    what: format!("cannot add the memory block at {start:#x}"),
                    source,
                })?,
            }
        }
        let state = format!("{dir}/state");
        if sys.read(&state).map_or(true, |s| s != "online") {
            // The kernel's zone: its own allocations (page tables, slab)
            // may use the new memory too, not only the boot RAM. The VM
            // never gives memory back, so it need not stay movable.
            sys.write(&state, "online").map_err(|source| Error::Sys {
                what: format!("cannot online the memory block at {start:#x}"),
                source,
            })?;
        }
        added += block;
    }
    Ok(added)
}

/// The guest's kernel command line.
pub fn cmdline() -> String {
    std::fs::read_to_string(Path::new("/proc/cmdline")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A kernel in miniature: writing an address to `memory/probe` makes
    /// its block appear offline; writing to `online`/`state` changes them.
    #[derive(Default)]
    struct FakeSys {
        files: RefCell<BTreeMap<String, String>>,
    }

    impl FakeSys {
        fn new(cpus: u32, online: u32, block: u64, blocks: &[u64]) -> FakeSys {
            let sys = FakeSys::default();
            {
                let mut f = sys.files.borrow_mut();
                for n in 0..cpus {
                    if n > 0 {
                        let v = if n < online { "1" } else { "0" };
                        f.insert(format!("cpu/cpu{n}/online"), v.into());
                    } else {
                        f.insert("cpu/cpu0/topology".into(), String::new());
                    }
                }
                f.insert("memory/probe".into(), String::new());
                f.insert("memory/block_size_bytes".into(), format!("{block:x}"));
                for id in blocks {
                    f.insert(format!("memory/memory{id}/state"), "online".into());
                }
            }
            sys
        }
        fn get(&self, rel: &str) -> Option<String> {
            self.files.borrow().get(rel).cloned()
        }
    }

    impl Sys for FakeSys {
        fn read(&self, rel: &str) -> std::io::Result<String> {
            self.get(rel)
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn write(&self, rel: &str, value: &str) -> std::io::Result<()> {
            let mut f = self.files.borrow_mut();
            if rel == "memory/probe" {
                let block = u64::from_str_radix(&f["memory/block_size_bytes"], 16).unwrap();
                let addr = u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
                assert_eq!(addr % block, 0, "probe of an unaligned address");
                let state = format!("memory/memory{}/state", addr / block);
                assert!(!f.contains_key(&state), "probe of a block already there");
                f.insert(state, "offline".into());
                return Ok(());
            }
            let old = f
                .get_mut(rel)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
            *old = value.into();
            Ok(())
        }
        fn exists(&self, rel: &str) -> bool {
            let f = self.files.borrow();
            f.keys()
                .any(|k| k == rel || k.starts_with(&format!("{rel}/")))
        }
        fn list(&self, rel: &str) -> std::io::Result<Vec<String>> {
            let f = self.files.borrow();
            let mut names: Vec<String> = f
                .keys()
                .filter_map(|k| k.strip_prefix(&format!("{rel}/")))
                .map(|k| k.split('/').next().unwrap().to_string())
                .collect();
            names.dedup();
            Ok(names)
        }
    }

    const BLOCK: u64 = 128 << 20;
    const BASE: u64 = 4 << 30;

    #[test]
    fn the_region_comes_from_the_command_line() {
        let line = "console=ttyS0 sandboxvm.hotplug=0x100000000:0x40000000 quiet";
        assert_eq!(hotplug_region(line).unwrap(), Some((BASE, 1 << 30)));
        assert_eq!(hotplug_region("console=ttyS0").unwrap(), None);
        for bad in [
            "sandboxvm.hotplug=",
            "sandboxvm.hotplug=0x1",
            "sandboxvm.hotplug=zz:1",
        ] {
            assert!(hotplug_region(bad).is_err(), "{bad}");
        }
        assert!(hotplug_region("sandboxvm.hotplug=ffffffffffffffff:2").is_err());
    }

    #[test]
    fn offline_vcpus_come_online_lowest_first_and_never_go_offline() {
        let sys = FakeSys::new(4, 1, BLOCK, &[]);
        assert_eq!(online_cpus(&sys, 3).unwrap(), 3);
        assert_eq!(sys.get("cpu/cpu1/online").unwrap(), "1");
        assert_eq!(sys.get("cpu/cpu2/online").unwrap(), "1");
        assert_eq!(sys.get("cpu/cpu3/online").unwrap(), "0");
        assert_eq!(online_cpus(&sys, 1).unwrap(), 3, "no shrinking");
        assert_eq!(online_cpus(&sys, 9).unwrap(), 4, "at most what is present");
    }

    #[test]
    fn memory_is_added_block_by_block_from_the_start_of_the_region() {
        let sys = FakeSys::new(1, 1, BLOCK, &[0, 1, 2]);
        let region = Some((BASE, 4 * BLOCK));
        assert_eq!(add_memory(&sys, region, BLOCK + 1).unwrap(), 2 * BLOCK);
        let id = BASE / BLOCK;
        assert_eq!(
            sys.get(&format!("memory/memory{id}/state")).unwrap(),
            "online"
        );
        assert_eq!(
            sys.get(&format!("memory/memory{}/state", id + 1)).unwrap(),
            "online"
        );
        assert!(sys.get(&format!("memory/memory{}/state", id + 2)).is_none());
        // Again with more: the two blocks there are counted, not probed twice.
        assert_eq!(add_memory(&sys, region, 3 * BLOCK).unwrap(), 3 * BLOCK);
        assert_eq!(add_memory(&sys, region, 100 * BLOCK).unwrap(), 4 * BLOCK);
        assert_eq!(add_memory(&sys, region, 0).unwrap(), 0);
    }

    #[test]
    fn an_offline_block_left_over_is_onlined() {
        let sys = FakeSys::new(1, 1, BLOCK, &[]);
        let id = BASE / BLOCK;
        sys.files
            .borrow_mut()
            .insert(format!("memory/memory{id}/state"), "offline".into());
        assert_eq!(add_memory(&sys, Some((BASE, BLOCK)), 1).unwrap(), BLOCK);
        assert_eq!(
            sys.get(&format!("memory/memory{id}/state")).unwrap(),
            "online"
        );
    }

    #[test]
    fn what_cannot_be_added_is_a_clear_error() {
        let sys = FakeSys::new(1, 1, BLOCK, &[]);
        let e = add_memory(&sys, None, 1).unwrap_err().to_string();
        assert!(e.contains("no memory to add"), "{e}");
        let e = add_memory(&sys, Some((BASE + 4096, BLOCK)), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not aligned"), "{e}");
        sys.files.borrow_mut().remove("memory/probe");
        let e = add_memory(&sys, Some((BASE, BLOCK)), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CONFIG_ARCH_MEMORY_PROBE"), "{e}");
    }
}

//! The template store: one saved guest per kind of VM, under the cache
//! directory (`templates/`, 0700), built on first use and restored by every
//! sandbox of that kind after ([`vmm::snapshot`] says what a template holds).
//!
//! A template's key hashes everything it depends on: the format, the
//! `sandboxvm` executable, the kernel and the initramfs (device, inode,
//! size, modification and change times: a rebuilt file is a new key), the
//! vCPUs, memory, device slots and command line, and the host's kernel. The
//! VMM checks again what it can (the VM it fits, checksums of state and
//! memory) and removes a template that does not check out; the next sandbox
//! then builds it again.
//!
//! Concurrent first use builds one template: the builder holds an exclusive
//! lock on `KEY.lock` while the others wait for it, then find it there. A
//! build goes into `KEY.tmp.PID` and is renamed into place whole.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm::VmmConfig;

use crate::vmm_args::BootArgs;

/// What the runtime writes beside the VMM's files: what the template is of.
const INFO: &str = "info.json";

/// The most templates the store keeps (about 40 MB of disk each for a
/// 256 MiB guest); older ones go when a new one is built.
pub const KEEP: usize = 16;

/// Errors of the template store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the store.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The build failed.
    #[error("template build failed: {0}")]
    Build(String),
    /// No such template.
    #[error("no template {0}")]
    NotFound(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `template list` shows of a template.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Info {
    /// The key (its directory's name).
    #[serde(default)]
    pub key: String,
    /// The `sandboxvm` executable that built it (older templates: none).
    #[serde(default)]
    pub exe: Option<PathBuf>,
    /// The kernel and initramfs it booted.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// vCPUs at boot and in all.
    pub vcpus: (u8, u8),
    /// Memory at boot and to add, MiB.
    pub memory_mib: (u64, u64),
    /// Seconds since the Unix epoch when it was built.
    pub built: u64,
    /// How long the build took, ms.
    pub build_ms: u64,
    /// Bytes of guest memory saved (on disk, the rest is holes).
    #[serde(default)]
    pub bytes: u64,
}

/// How a template is built: by `exe boot --template-out` (with `verbose`
/// `-v`s), given up after `limit` (a cold boot to the agent, then the save).
#[derive(Clone, Copy)]
pub struct Builder<'a> {
    /// The `sandboxvm` executable.
    pub exe: &'a Path,
    /// `-v` count.
    pub verbose: u8,
    /// How long the build may take.
    pub limit: Duration,
}

/// The store.
pub struct Store {
    dir: PathBuf,
}

/// `dev:ino:size:mtime:ctime` of a file, or its error (a key that never
/// matches a template).
fn identity(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{}:{}:{}:{}.{}:{}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ),
        Err(e) => format!("unreadable({e})"),
    }
}

/// 64-bit FNV-1a: a name for a key text, not a defence (the key text itself
/// is kept in the template's info and compared).
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Whether `path` was last written over an hour ago.
fn hour_old(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e > Duration::from_secs(3600)))
}

/// A template's key: its key text's hash.
fn key_of(text: &str) -> String {
    format!("{:016x}", fnv(text))
}

/// The text a template's key hashes: everything a template depends on.
pub fn key_text(config: &VmmConfig, exe: &Path) -> String {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "format={} exe={} kernel={} initrd={} vcpus={}/{} memory={}+{} slots={}/{}/{}/{} pvm={} \
         host={release} cmdline={}",
        vmm::snapshot::FORMAT,
        identity(exe),
        identity(&config.boot.kernel),
        config
            .boot
            .initrd
            .as_deref()
            .map_or("none".into(), identity),
        config.vcpus,
        config.max_vcpus,
        config.memory_mib,
        config.hotplug_mib,
        u8::from(config.vsock.is_some()),
        config.fs.len(),
        config.net.len(),
        u8::from(config.free_page_reporting),
        config.pvm_guest,
        config.boot.cmdline,
    )
}

impl Store {
    /// The store under the cache directory (made 0700 if missing).
    pub fn open() -> Result<Store, Error> {
        let dir = crate::artefacts::cache_dir().join("templates");
        crate::private::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Store { dir })
    }

    /// A store in `dir` (tests).
    pub fn at(dir: PathBuf) -> Result<Store, Error> {
        crate::private::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Store { dir })
    }

    /// Where it is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The template for `config` (booted by `exe`), built now if there is
    /// none; `None` (and a warning) when it cannot be built: the sandbox
    /// boots cold.
    ///
    /// A build that failed is not tried again for the same key within the
    /// hour (a guest that never gets ready would cost every sandbox a boot
    /// time-out): `KEY.failed` holds why, until then, `template rm --all`
    /// or a new key.
    pub fn ensure(&self, config: &VmmConfig, with: &Builder<'_>) -> Option<PathBuf> {
        let text = key_text(config, with.exe);
        let key = key_of(&text);
        let failed = self.dir.join(format!("{key}.failed"));
        if let Some(why) = std::fs::read_to_string(&failed)
            .ok()
            .filter(|_| !hour_old(&failed))
        {
            log::info!("booting cold: template {key} did not build before: {why}");
            return None;
        }
        match self.lookup(config, with, &text, &key) {
            Ok(dir) => Some(dir),
            Err(e) => {
                // Shown with -v: the sandbox still boots, cold.
                log::info!("booting cold: {e}");
                if let Error::Build(why) = &e {
                    let _ = crate::private::write_file(&failed, why.as_bytes());
                }
                None
            }
        }
    }

    /// As [`Store::ensure`], with the error of a failed build.
    pub fn get_or_build(&self, config: &VmmConfig, with: &Builder<'_>) -> Result<PathBuf, Error> {
        let text = key_text(config, with.exe);
        self.lookup(config, with, &text, &key_of(&text))
    }

    /// The template of key text `text` (hashed: `key`), built if missing.
    fn lookup(
        &self,
        config: &VmmConfig,
        with: &Builder<'_>,
        text: &str,
        key: &str,
    ) -> Result<PathBuf, Error> {
        let dir = self.dir.join(key);
        let lock_path = self.dir.join(format!("{key}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let waited = Instant::now();
        // SAFETY: flock on an fd `lock` owns; released when it is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&lock_path)(std::io::Error::last_os_error()));
        }
        if waited.elapsed() > Duration::from_millis(100) {
            log::info!(
                "waited {} ms for template {key} (another sandbox was building it)",
                waited.elapsed().as_millis()
            );
        }
        if dir.join(vmm::snapshot::MANIFEST).exists() {
            if std::fs::read_to_string(dir.join("key.txt")).is_ok_and(|t| t == text) {
                log::info!("restoring the VM from template {key}");
                return Ok(dir);
            }
            log::warn!("template {key} is of another configuration: building it again");
            let _ = std::fs::remove_dir_all(&dir);
        }
        self.build(config, with, key, text)?;
        let _ = std::fs::remove_file(self.dir.join(format!("{key}.failed")));
        self.prune();
        log::info!("restoring the VM from template {key}");
        Ok(dir)
    }

    /// Boots `config` as a template guest into `KEY.tmp.PID` and renames
    /// it to `KEY` (the caller holds the key's lock).
    fn build(
        &self,
        config: &VmmConfig,
        with: &Builder<'_>,
        key: &str,
        text: &str,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let tmp = self.dir.join(format!("{key}.tmp.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        crate::private::create_dir(&tmp).map_err(io(&tmp))?;
        let result = self.build_in(config, with, &tmp, text, started);
        match result {
            Ok(()) => {
                let dir = self.dir.join(key);
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
                log::info!(
                    "template {key} built in {} ms",
                    started.elapsed().as_millis()
                );
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn build_in(
        &self,
        config: &VmmConfig,
        with: &Builder<'_>,
        tmp: &Path,
        text: &str,
        started: Instant,
    ) -> Result<(), Error> {
        // Only the slots count: nothing is attached behind them.
        let mut t = config.clone();
        t.console = vmm::Console::File(tmp.join("console.log"));
        t.template_out = Some(tmp.to_path_buf());
        t.restore = None;
        if let Some(v) = &mut t.vsock {
            v.uds = tmp.join("vsock");
        }
        for (i, fs) in t.fs.iter_mut().enumerate() {
            fs.socket = tmp.join(format!("fs{i}.sock"));
        }
        for (i, net) in t.net.iter_mut().enumerate() {
            net.tap = format!("tpl{i}");
        }
        let log_path = tmp.join("vmm.log");
        let log = File::create(&log_path).map_err(io(&log_path))?;
        let Builder {
            exe,
            verbose,
            limit,
        } = *with;
        let mut cmd = Command::new(exe);
        if verbose > 0 {
            cmd.arg(format!("-{}", "v".repeat(verbose.into())));
        }
        cmd.arg("boot")
            .args(BootArgs::from_config(&t).to_argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().map_err(io(exe))?;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io(exe))? {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Build(format!(
                    "not saved within {} s",
                    limit.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() || !tmp.join(vmm::snapshot::MANIFEST).exists() {
            let vmm_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = vmm_log.lines().last().unwrap_or("no message").to_string();
            return Err(Error::Build(format!("the VMM ended ({status}): {last}")));
        }
        let bytes = std::fs::metadata(tmp.join(vmm::snapshot::MEMORY))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let info = Info {
            key: String::new(),
            exe: Some(exe.to_path_buf()),
            kernel: config.boot.kernel.clone(),
            initrd: config.boot.initrd.clone(),
            vcpus: (config.vcpus, config.max_vcpus),
            memory_mib: (config.memory_mib, config.hotplug_mib),
            built: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            build_ms: started.elapsed().as_millis() as u64,
            bytes,
        };
        for (name, body) in [
            (INFO, serde_json::to_string(&info).expect("info serializes")),
            ("key.txt", text.to_string()),
        ] {
            let path = tmp.join(name);
            crate::private::write_file(&path, body.as_bytes()).map_err(io(&path))?;
        }
        for name in ["console.log", "vmm.log"] {
            let _ = std::fs::remove_file(tmp.join(name));
        }
        Ok(())
    }

    /// Removes the templates that can never be used again: their
    /// executable, kernel or initramfs is not the file at its path any more
    /// (each rebuild of `sandboxvm` would otherwise leave one behind), and
    /// the oldest beyond [`KEEP`]. Also the lock files of keys without a
    /// template and the failed-build marks, once an hour old (a failed build
    /// is tried again after that).
    fn prune(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let orphan_lock = name
                    .strip_suffix(".lock")
                    .is_some_and(|key| !self.dir.join(key).exists());
                if (orphan_lock || name.ends_with(".failed")) && hour_old(&path) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let Ok(all) = self.list() else { return };
        let mut kept = Vec::new();
        for t in all {
            let dir = self.dir.join(&t.key);
            let Ok(text) = std::fs::read_to_string(dir.join("key.txt")) else {
                continue;
            };
            let field = |name: &str| {
                text.split(' ')
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_string)
            };
            let changed = |name: &str, path: Option<&Path>| {
                path.is_some_and(|p| field(name) != Some(identity(p)))
            };
            if changed("exe=", t.exe.as_deref())
                || changed("kernel=", Some(&t.kernel))
                || changed("initrd=", t.initrd.as_deref())
            {
                self.remove_one(&t.key, "its executable, kernel or initramfs changed");
            } else {
                kept.push(t.key);
            }
        }
        // `list` is oldest first.
        for key in &kept[..kept.len().saturating_sub(KEEP)] {
            self.remove_one(key, &format!("the store keeps the newest {KEEP}"));
        }
    }

    /// Removes template `key` as `prune` does, saying why.
    fn remove_one(&self, key: &str, why: &str) {
        if std::fs::remove_dir_all(self.dir.join(key)).is_ok() {
            let _ = std::fs::remove_file(self.dir.join(format!("{key}.lock")));
            log::info!("template {key} removed: {why}");
        }
    }

    /// Every whole template, oldest first.
    pub fn list(&self) -> Result<Vec<Info>, Error> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() != 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let info = std::fs::read(entry.path().join(INFO))
                .ok()
                .and_then(|b| serde_json::from_slice::<Info>(&b).ok());
            if let Some(mut info) = info {
                info.key = name;
                all.push(info);
            }
        }
        all.sort_by_key(|i| i.built);
        Ok(all)
    }

    /// Removes template `key` (or every one with `None`); returns how many.
    pub fn remove(&self, key: Option<&str>) -> Result<usize, Error> {
        let keys: Vec<String> = match key {
            Some(k) => {
                if !self.dir.join(k).join(INFO).exists()
                    || k.len() != 16
                    || !k.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(Error::NotFound(k.to_string()));
                }
                vec![k.to_string()]
            }
            None => {
                // Failed builds are forgotten too: the next use tries again.
                for entry in std::fs::read_dir(&self.dir)
                    .map_err(io(&self.dir))?
                    .flatten()
                {
                    if entry.file_name().to_string_lossy().ends_with(".failed") {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
                self.list()?.into_iter().map(|i| i.key).collect()
            }
        };
        for k in &keys {
            let dir = self.dir.join(k);
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            let _ = std::fs::remove_file(self.dir.join(format!("{k}.lock")));
        }
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_the_kernel_file_and_the_vm() {
        let dir = std::env::temp_dir().join(format!("sbx-tplkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, "one").unwrap();
        let exe = std::env::current_exe().unwrap();
        let config = VmmConfig::new(&kernel);
        let a = key_text(&config, &exe);
        assert_eq!(a, key_text(&config, &exe), "stable");
        // The same path, rewritten: another key.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&kernel, "two!").unwrap();
        let b = key_text(&config, &exe);
        assert_ne!(a, b);
        let mut bigger = config.clone();
        bigger.memory_mib += 128;
        assert_ne!(b, key_text(&bigger, &exe));
        let mut net = config.clone();
        net.net.push("tap=t".parse().unwrap());
        assert_ne!(b, key_text(&net, &exe));
        assert_ne!(fnv(&a), fnv(&b));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn removing_an_unknown_or_malformed_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("sbx-tplrm-{}", std::process::id()));
        let store = Store::at(dir.clone()).unwrap();
        for bad in ["0123456789abcdef", "../etc", ""] {
            assert!(matches!(store.remove(Some(bad)), Err(Error::NotFound(_))));
        }
        assert_eq!(store.remove(None).unwrap(), 0);
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes a fake template `n` (info and key text, as a build leaves
    /// them) of `exe` and `kernel`, built at time `n`.
    fn fake(store: &Store, n: u64, exe: &Path, kernel: &Path) -> String {
        let config = VmmConfig::new(kernel);
        let text = format!("{} n={n}", key_text(&config, exe));
        let key = key_of(&text);
        let dir = store.dir().join(&key);
        std::fs::create_dir_all(&dir).unwrap();
        let info = Info {
            key: String::new(),
            exe: Some(exe.to_path_buf()),
            kernel: kernel.to_path_buf(),
            initrd: None,
            vcpus: (1, 1),
            memory_mib: (256, 0),
            built: n,
            build_ms: 1,
            bytes: 0,
        };
        std::fs::write(dir.join(INFO), serde_json::to_string(&info).unwrap()).unwrap();
        std::fs::write(dir.join("key.txt"), text).unwrap();
        key
    }

    #[test]
    fn templates_of_a_rebuilt_executable_and_the_oldest_beyond_the_cap_are_pruned() {
        let dir = std::env::temp_dir().join(format!("sbx-tplprune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::at(dir.join("store")).unwrap();
        let (exe, kernel) = (dir.join("sandboxvm"), dir.join("vmlinux"));
        std::fs::write(&exe, "build one").unwrap();
        std::fs::write(&kernel, "kernel").unwrap();
        let old = fake(&store, 0, &exe, &kernel);
        store.prune();
        assert_eq!(store.list().unwrap().len(), 1, "nothing changed: kept");
        // `cargo build` writes a new executable at the same path.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&exe, "build two").unwrap();
        let keys: Vec<String> = (1..=KEEP as u64 + 2)
            .map(|n| fake(&store, n, &exe, &kernel))
            .collect();
        store.prune();
        let left: Vec<String> = store.list().unwrap().into_iter().map(|i| i.key).collect();
        assert!(!left.contains(&old), "the old executable's template stays");
        assert_eq!(left, keys[2..], "the newest {KEEP} are kept, oldest first");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The configuration file, `/etc/sandboxvm/config.toml` (or the file named
//! by `--config`, `$SANDBOXVM_CONFIG`, or the containerd shim's runtime
//! option `ConfigPath`). Every key is optional and the defaults are what
//! sandboxvm does without a file; an unknown key, a bad value or a
//! default above its maximum is refused when the file is loaded, with one
//! line that names the file and the key.
//!
//! Precedence, highest first: a command-line flag (`--kernel`, `--cpus`,
//! ...), the environment variables that came before the file
//! (`SANDBOXVM_KERNEL`, `SANDBOXVM_INITRD`, `SANDBOXVM_VIRTIOFSD`, the
//! timeouts' variables, `SANDBOXVM_VMM_CONFINE=off`), the file, the
//! built-in defaults. `sandboxvm env` prints the result.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the file is looked for when no path is given.
pub const DEFAULT_PATH: &str = "/etc/sandboxvm/config.toml";
/// The environment variable that names the file.
pub const ENV: &str = "SANDBOXVM_CONFIG";
/// The prefix of the pod annotations a configuration may let pods use.
pub const ANNOTATION_PREFIX: &str = "io.sandboxvm.";
/// The most vCPUs a VM gets (the VMM's limit).
pub const VCPU_LIMIT: u8 = vmm::arch::mptable::MAX_CPUS;
/// The least memory a guest boots with, MiB.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Longest kernel command line the file or an annotation may add.
const MAX_KERNEL_PARAMS: usize = 1024;

/// Errors loading the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file named explicitly cannot be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, or a key or value the schema refuses.
    #[error("config {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, on one line.
        msg: String,
    },
    /// Parsed, but inconsistent.
    #[error("config {path}: {msg}")]
    Invalid {
        /// The file (or "(defaults)").
        path: String,
        /// What is wrong.
        msg: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The guest: kernel, initramfs, size.
    pub guest: Guest,
    /// The file server of the container's root filesystem.
    pub virtiofsd: Virtiofsd,
    /// The VMM process.
    pub vmm: Vmm,
    /// How long the host waits for the guest.
    pub timeouts: Timeouts,
    /// The runtime's own log.
    pub log: Log,
    /// What pods may choose through annotations.
    pub annotations: Annotations,
}

/// `[guest]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Guest {
    /// Guest kernel (vmlinux or bzImage); unset: found as without a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// The agent's initramfs; unset: found as without a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Appended to the guest kernel's command line.
    pub kernel_params: String,
    /// vCPUs of a VM whose container asks for fewer (or nothing).
    pub default_vcpus: u8,
    /// The most vCPUs a VM gets; a pod asking for more gets this many.
    /// A VM is created with this many, those beyond its boot count offline
    /// until an update brings them online ([`crate::vm_size`]). Unset: a
    /// pod is cut at the VMM's limit, 32, and a VM grows as
    /// [`crate::vm_size::VmSize::ceiling`] says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u8>,
    /// Memory of a VM whose container asks for less (or nothing), MiB.
    pub default_memory_mib: u64,
    /// The most memory a VM may have, MiB; a container whose limit does
    /// not fit is refused, and a VM grows up to it on update
    /// ([`crate::vm_size`]). Unset: no maximum for sizing, and a VM grows
    /// as [`crate::vm_size::VmSize::ceiling`] says (guest memory is only
    /// allocated as the guest touches it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
}

impl Default for Guest {
    fn default() -> Guest {
        Guest {
            kernel: None,
            initrd: None,
            kernel_params: String::new(),
            default_vcpus: 1,
            max_vcpus: None,
            default_memory_mib: vmm::config::DEFAULT_MEMORY_MIB,
            max_memory_mib: None,
        }
    }
}

/// `[virtiofsd]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Virtiofsd {
    /// The binary; unset: found as without a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// virtiofsd's `--cache`.
    pub cache: CacheMode,
    /// virtiofsd's `--thread-pool-size` (0: requests served on the queue's
    /// own thread).
    pub thread_pool_size: u16,
}

impl Default for Virtiofsd {
    fn default() -> Virtiofsd {
        Virtiofsd {
            path: None,
            cache: CacheMode::Auto,
            thread_pool_size: 1,
        }
    }
}

/// virtiofsd's cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// No caching in the guest: every access goes to the host.
    Never,
    /// Metadata cached, data not.
    Metadata,
    /// Cached until the file changes on the host (timeouts).
    Auto,
    /// Cached, the host's changes may not be seen.
    Always,
}

impl CacheMode {
    /// virtiofsd's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Never => "never",
            CacheMode::Metadata => "metadata",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        }
    }
}

/// `[vmm]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Vmm {
    /// The VMM in its own jail, as its own user, under seccomp filters.
    /// `false` is for measuring what that costs, never for production.
    pub confine: bool,
    /// Sandboxes restored from a template of their kind of VM (built on
    /// first use) instead of booting their kernel: `false` boots every one
    /// cold.
    pub template: bool,
    /// Guests hand the memory they free back to the host (a virtio-balloon
    /// device with free page reporting): an idle sandbox costs what its
    /// guest uses now, not the most it ever touched.
    pub free_page_reporting: bool,
}

impl Default for Vmm {
    fn default() -> Vmm {
        Vmm {
            confine: true,
            template: true,
            free_page_reporting: true,
        }
    }
}

/// `[timeouts]`, seconds; unset: the built-in defaults
/// ([`crate::timeouts`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// From the VMM's start until the guest agent answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_secs: Option<f64>,
    /// One ordinary agent call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_secs: Option<f64>,
    /// Multiplies both (an overcommitted or emulated host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// The level without `-v` or `RUST_LOG`: error, warn, info, debug or
    /// trace (default warn).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// env_logger's filter.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `[annotations]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Annotations {
    /// The `io.sandboxvm.*` annotations a pod may set; none by default,
    /// and a pod that sets one not listed here is refused.
    pub allowed: Vec<Overridable>,
}

/// What a pod may choose, as `io.sandboxvm.<name>` annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overridable {
    /// `io.sandboxvm.vcpus`: the VM's vCPUs (up to `max_vcpus`).
    Vcpus,
    /// `io.sandboxvm.memory_mib`: the VM's memory (up to `max_memory_mib`).
    MemoryMib,
    /// `io.sandboxvm.kernel_params`: appended to the kernel command line.
    KernelParams,
}

impl Overridable {
    const ALL: [Overridable; 3] = [
        Overridable::Vcpus,
        Overridable::MemoryMib,
        Overridable::KernelParams,
    ];

    fn name(self) -> &'static str {
        match self {
            Overridable::Vcpus => "vcpus",
            Overridable::MemoryMib => "memory_mib",
            Overridable::KernelParams => "kernel_params",
        }
    }
}

/// A loaded configuration and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The file, or None for the built-in defaults.
    pub path: Option<PathBuf>,
    /// Its content.
    pub config: Config,
}

impl Loaded {
    /// The file named by `flag`, else by `$SANDBOXVM_CONFIG`, else
    /// [`DEFAULT_PATH`] if it exists, else the defaults. A named file must
    /// exist.
    pub fn load(flag: Option<&Path>) -> Result<Loaded, Error> {
        let named = flag.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        Loaded::load_from(named.as_deref(), Path::new(DEFAULT_PATH))
    }

    /// As [`Loaded::load`] with the lookup done: `named`, else `default`
    /// if it exists.
    pub fn load_from(named: Option<&Path>, default: &Path) -> Result<Loaded, Error> {
        let path = match named {
            Some(p) => p.to_path_buf(),
            None if default.exists() => default.to_path_buf(),
            None => {
                return Ok(Loaded {
                    path: None,
                    config: Config::default(),
                })
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|msg| Error::Parse {
            path: path.clone(),
            msg,
        })?;
        config.validate().map_err(|msg| Error::Invalid {
            path: path.display().to_string(),
            msg,
        })?;
        Ok(Loaded {
            path: Some(path),
            config,
        })
    }

    /// The file's name for messages.
    pub fn name(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "the built-in defaults".into(),
        }
    }
}

impl Config {
    /// Parses TOML text; the error is toml's message on one line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let msg = one_line(e.message());
            match e.span() {
                Some(span) => {
                    let start = span.start.min(text.len());
                    let line = text[..start].matches('\n').count() + 1;
                    let at = text.lines().nth(line - 1).unwrap_or_default().trim();
                    let at = crate::guest_console::escape_within(at, 80);
                    format!("line {line} ({at}): {msg}")
                }
                None => msg,
            }
        })
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Consistency checks beyond the schema.
    pub fn validate(&self) -> Result<(), String> {
        let g = &self.guest;
        if g.default_vcpus == 0 || g.default_vcpus > VCPU_LIMIT {
            return Err(format!(
                "guest.default_vcpus = {}: must be 1 to {VCPU_LIMIT}",
                g.default_vcpus
            ));
        }
        if let Some(max) = g.max_vcpus {
            if max == 0 || max > VCPU_LIMIT {
                return Err(format!(
                    "guest.max_vcpus = {max}: must be 1 to {VCPU_LIMIT}"
                ));
            }
            if g.default_vcpus > max {
                return Err(format!(
                    "guest.default_vcpus = {} is above guest.max_vcpus = {max}",
                    g.default_vcpus
                ));
            }
        }
        if g.default_memory_mib < MIN_MEMORY_MIB {
            return Err(format!(
                "guest.default_memory_mib = {}: at least {MIN_MEMORY_MIB}",
                g.default_memory_mib
            ));
        }
        if let Some(max) = g.max_memory_mib {
            if max > crate::vm_size::MAX_MEMORY_MIB {
                return Err(format!(
                    "guest.max_memory_mib = {max}: at most {}",
                    crate::vm_size::MAX_MEMORY_MIB
                ));
            }
            if g.default_memory_mib > max {
                return Err(format!(
                    "guest.default_memory_mib = {} is above guest.max_memory_mib = {max}",
                    g.default_memory_mib
                ));
            }
        }
        check_kernel_params("guest.kernel_params", &g.kernel_params)?;
        for (key, path) in [
            ("guest.kernel", &g.kernel),
            ("guest.initrd", &g.initrd),
            ("virtiofsd.path", &self.virtiofsd.path),
        ] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Err(format!("{key} = {:?}: must be an absolute path", p));
                }
            }
        }
        use crate::timeouts::{scale, seconds, MAX_SECS, SCALE};
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.boot_secs", t.boot_secs),
            ("timeouts.agent_secs", t.agent_secs),
        ] {
            if let Some(v) = v.filter(|&v| seconds(v).is_none()) {
                return Err(format!(
                    "{key} = {v}: must be above 0 and at most {MAX_SECS}"
                ));
            }
        }
        if let Some(v) = t.scale.filter(|&v| scale(v).is_none()) {
            return Err(format!(
                "timeouts.scale = {v}: must be {} to {}",
                SCALE.start(),
                SCALE.end()
            ));
        }
        if self.virtiofsd.thread_pool_size > 64 {
            return Err(format!(
                "virtiofsd.thread_pool_size = {}: at most 64",
                self.virtiofsd.thread_pool_size
            ));
        }
        Ok(())
    }

    /// The most vCPUs a VM gets.
    pub fn max_vcpus(&self) -> u8 {
        self.guest.max_vcpus.unwrap_or(VCPU_LIMIT)
    }

    /// Sizes a VM: `asked_vcpus` and `asked_memory_mib` are what its
    /// container (or pod) needs (None: nothing asked), `annotations` its
    /// spec's. vCPUs beyond the maximum are cut to it (the container is
    /// only throttled less than it asked); memory beyond it is refused
    /// (a smaller guest would OOM-kill the container).
    pub fn size<'a>(
        &self,
        asked_vcpus: Option<u8>,
        asked_memory_mib: Option<u64>,
        annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Size, String> {
        let chosen = self.pod_choices(annotations)?;
        let max_vcpus = self.max_vcpus();
        let mut vcpus = match chosen.vcpus {
            Some(v) if v > max_vcpus => {
                return Err(format!(
                    "{ANNOTATION_PREFIX}vcpus = {v} is above the configured maximum of {max_vcpus}"
                ))
            }
            Some(v) => v,
            None => asked_vcpus.unwrap_or(1).max(self.guest.default_vcpus),
        };
        if vcpus > max_vcpus {
            log::warn!("{vcpus} vCPUs are more than the maximum here: the VM gets {max_vcpus}");
            vcpus = max_vcpus;
        }
        let memory_mib = match chosen.memory_mib {
            Some(m) => m,
            None => asked_memory_mib
                .unwrap_or(0)
                .max(self.guest.default_memory_mib),
        };
        if let Some(max_memory) = self.guest.max_memory_mib.filter(|&m| memory_mib > m) {
            let what = if chosen.memory_mib.is_some() {
                format!("{ANNOTATION_PREFIX}memory_mib = {memory_mib}")
            } else {
                format!("the container's memory limit needs a {memory_mib} MiB VM, which")
            };
            return Err(format!(
                "{what} is above the configured maximum of {max_memory} MiB"
            ));
        }
        let mut kernel_params = self.guest.kernel_params.clone();
        if let Some(extra) = chosen.kernel_params {
            if !kernel_params.is_empty() {
                kernel_params.push(' ');
            }
            kernel_params.push_str(&extra);
        }
        Ok(Size {
            vcpus,
            memory_mib,
            kernel_params,
        })
    }

    /// The `io.sandboxvm.*` annotations, checked against the allowlist.
    fn pod_choices<'a>(
        &self,
        annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Choices, String> {
        let mut c = Choices::default();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let Some(what) = Overridable::ALL.into_iter().find(|o| o.name() == name) else {
                return Err(format!(
                    "unknown annotation {}: sandboxvm knows {}",
                    esc(key),
                    Overridable::ALL
                        .map(|o| format!("{ANNOTATION_PREFIX}{}", o.name()))
                        .join(", ")
                ));
            };
            if !self.annotations.allowed.contains(&what) {
                return Err(format!(
                    "annotation {ANNOTATION_PREFIX}{name} is not allowed here (the configuration's \
                     annotations.allowed does not list \"{name}\")"
                ));
            }
            let bad =
                |why: &str| format!("annotation {ANNOTATION_PREFIX}{name}={}: {why}", esc(value));
            match what {
                Overridable::Vcpus => match value.trim().parse::<u8>() {
                    Ok(v) if v >= 1 => c.vcpus = Some(v),
                    _ => return Err(bad("not a number of vCPUs")),
                },
                Overridable::MemoryMib => match value.trim().parse::<u64>() {
                    Ok(m) if m >= MIN_MEMORY_MIB => c.memory_mib = Some(m),
                    _ => {
                        return Err(bad(&format!(
                            "not a size in MiB of at least {MIN_MEMORY_MIB}"
                        )))
                    }
                },
                Overridable::KernelParams => {
                    check_kernel_params(&format!("annotation {ANNOTATION_PREFIX}{name}"), value)?;
                    c.kernel_params = Some(value.clone());
                }
            }
        }
        Ok(c)
    }
}

/// What the pod chose through annotations.
#[derive(Debug, Default)]
struct Choices {
    vcpus: Option<u8>,
    memory_mib: Option<u64>,
    kernel_params: Option<String>,
}

/// A VM's size and extra kernel parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size {
    /// vCPUs.
    pub vcpus: u8,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Appended to the kernel command line.
    pub kernel_params: String,
}

/// Pod-supplied text for a message: bounded, control characters escaped.
fn esc(s: &str) -> String {
    format!("{:?}", crate::guest_console::escape_within(s, 80))
}

/// Kernel parameters are one line of printable ASCII, bounded.
fn check_kernel_params(key: &str, v: &str) -> Result<(), String> {
    if v.len() > MAX_KERNEL_PARAMS {
        return Err(format!("{key}: longer than {MAX_KERNEL_PARAMS} bytes"));
    }
    if let Some(c) = v.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(format!(
            "{key}: {:?} is not allowed in kernel parameters (printable ASCII only)",
            c
        ));
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

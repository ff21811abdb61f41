//! Where the guest kernel, the agent's initramfs and virtiofsd are found.
//!
//! In order: an explicit flag, the environment (`SANDBOXVM_KERNEL`,
//! `SANDBOXVM_INITRD`, `SANDBOXVM_VIRTIOFSD`), the configuration file
//! ([`crate::config`]: `guest.kernel`, `guest.initrd`, `virtiofsd.path`),
//! the build cache
//! (`${SANDBOXVM_CACHE:-~/.cache/sandboxvm}/vmlinux` and `initramfs.cpio`,
//! links that `kernel-config/build` and `guest-agent/build-initramfs` keep
//! pointing at their latest result), then the install location
//! (`/usr/share/sandboxvm`).

use std::path::{Path, PathBuf};

/// Errors finding an artefact.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing found anywhere.
    #[error("no {what} found (looked at {looked}); {hint}")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Where.
        looked: String,
        /// How to get one.
        hint: &'static str,
    },
    /// An explicit path does not exist.
    #[error("{what} {path}: no such file")]
    Missing {
        /// What it is.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
}

/// Install location of the guest kernel and initramfs.
pub const SHARE_DIR: &str = "/usr/share/sandboxvm";

pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("SANDBOXVM_CACHE") {
        return PathBuf::from(c);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    base.join("sandboxvm")
}

/// The first of the flag, the environment variable `env` and the
/// configured path that is given; it must exist.
fn given(
    flag: Option<&Path>,
    env: &str,
    configured: Option<&Path>,
    what: &'static str,
) -> Option<Result<PathBuf, Error>> {
    let p = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .or_else(|| configured.map(Path::to_path_buf))?;
    Some(if p.is_file() {
        Ok(p)
    } else {
        Err(Error::Missing { what, path: p })
    })
}

fn find(
    flag: Option<&Path>,
    configured: Option<&Path>,
    what: &'static str,
    env: &str,
    name: &str,
    hint: &'static str,
) -> Result<PathBuf, Error> {
    if let Some(found) = given(flag, env, configured, what) {
        return found;
    }
    let candidates = [cache_dir().join(name), Path::new(SHARE_DIR).join(name)];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(Error::NotFound {
        what,
        looked: format!(
            "${env}, {}, {}",
            candidates[0].display(),
            candidates[1].display()
        ),
        hint,
    })
}

/// The guest kernel: `flag`, else `$SANDBOXVM_KERNEL`, else `configured`,
/// else the build cache or the install location.
pub fn kernel(flag: Option<&Path>, configured: Option<&Path>) -> Result<PathBuf, Error> {
    find(
        flag,
        configured,
        "guest kernel",
        "SANDBOXVM_KERNEL",
        "vmlinux",
        "build one with kernel-config/build",
    )
}

/// The guest agent's initramfs (looked for as [`kernel`]).
pub fn initrd(flag: Option<&Path>, configured: Option<&Path>) -> Result<PathBuf, Error> {
    find(
        flag,
        configured,
        "guest initramfs",
        "SANDBOXVM_INITRD",
        "initramfs.cpio",
        "build one with guest-agent/build-initramfs",
    )
}

/// virtiofsd: `SANDBOXVM_VIRTIOFSD`, `configured`, `PATH`, `~/.cargo/bin`,
/// `/usr/libexec`.
pub fn virtiofsd(configured: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(found) = given(None, "SANDBOXVM_VIRTIOFSD", configured, "virtiofsd") {
        return found;
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/virtiofsd"));
    }
    candidates.push(PathBuf::from("/usr/libexec/virtiofsd"));
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .ok_or(Error::NotFound {
            what: "virtiofsd",
            looked: "$SANDBOXVM_VIRTIOFSD, $PATH, ~/.cargo/bin, /usr/libexec".into(),
            hint: "install it with `cargo install virtiofsd` (ci/install-deps does)",
        })
}

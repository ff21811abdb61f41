//! Where the guest kernel, the agent's initramfs and virtiofsd are found.
//!
//! In order: an explicit flag, the environment (`SANDBOXVM_KERNEL`,
//! `SANDBOXVM_INITRD`, `SANDBOXVM_VIRTIOFSD`), the build cache
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

fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("SANDBOXVM_CACHE") {
        return PathBuf::from(c);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    base.join("sandboxvm")
}

fn find(
    flag: Option<&Path>,
    what: &'static str,
    env: &str,
    name: &str,
    hint: &'static str,
) -> Result<PathBuf, Error> {
    if let Some(p) = flag {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::Missing {
                what,
                path: p.to_path_buf(),
            })
        };
    }
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Missing { what, path: p })
        };
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

/// The guest kernel.
pub fn kernel(flag: Option<&Path>) -> Result<PathBuf, Error> {
    find(
        flag,
        "guest kernel",
        "SANDBOXVM_KERNEL",
        "vmlinux",
        "build one with kernel-config/build",
    )
}

/// The guest agent's initramfs.
pub fn initrd(flag: Option<&Path>) -> Result<PathBuf, Error> {
    find(
        flag,
        "guest initramfs",
        "SANDBOXVM_INITRD",
        "initramfs.cpio",
        "build one with guest-agent/build-initramfs",
    )
}

/// virtiofsd: `SANDBOXVM_VIRTIOFSD`, `PATH`, `~/.cargo/bin`, `/usr/libexec`.
pub fn virtiofsd() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("SANDBOXVM_VIRTIOFSD") {
        return Ok(PathBuf::from(p));
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

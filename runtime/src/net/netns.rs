//! Fresh network namespaces kept by a bind mount of their nsfs file, as
//! `ip netns add` does (`/run/netns/NAME`), and removed again.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::Error;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The path of the named namespace `name` (`/run/netns/NAME`).
pub fn named(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Makes a new, empty network namespace (loopback only, down) kept at
/// `path` (a file is created there; the directory must exist or be
/// creatable).
pub fn create(path: &Path) -> Result<(), Error> {
    let err = |source: std::io::Error| Error::Netns {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let target = path.to_path_buf();
    // A thread of our own unshares (network namespaces are per thread)
    // and its namespace outlives it through the bind mount.
    let made = std::thread::spawn(move || -> Result<(), std::io::Error> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        let tid = nix::unistd::gettid();
        mount(
            Some(Path::new(&format!("/proc/self/task/{tid}/ns/net"))),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| err(std::io::Error::other("the unshare thread panicked")))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

/// Unmounts and removes a namespace made by [`create`] (or `ip netns
/// add`); the namespace goes once nothing else holds it. Missing is fine.
pub fn remove(path: &Path) -> Result<(), Error> {
    let err = |source: std::io::Error| Error::Netns {
        path: path.to_path_buf(),
        source,
    };
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(err(e.into())),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(e)),
        _ => Ok(()),
    }
}

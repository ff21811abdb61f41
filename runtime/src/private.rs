//! Private host state: what sandboxvm creates for a sandbox (state
//! directories, sockets) is its own user's alone, whatever the caller's
//! umask. Behind a sandbox's state directory are its agent's socket (an
//! unauthenticated API that runs processes as root in the guest), the
//! container's rootfs and its volumes (secrets), so the modes are set
//! explicitly, never left to the umask.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of state directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of sockets.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of files.
pub const FILE_MODE: u32 = 0o600;

/// Creates directory `path` (its parent must exist) with mode 0700; fails
/// if it exists.
pub fn create_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    // The umask may have taken bits away; none are added back but ours.
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Creates `path` and its missing ancestors, each created one with mode
/// 0700 (existing ones are left as they are: the root may be a shared
/// directory such as /tmp).
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_all(parent)?;
        }
    }
    match create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r,
    }
}

/// Writes `data` to the file `path` (created or truncated), readable and
/// writable by its owner only: a new file is made 0600 whatever the umask.
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?
        .write_all(data)
}

/// Restricts the socket at `path` to its owner (mode 0600).
pub fn restrict_socket(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(SOCKET_MODE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    /// Not a test by itself: the body of the child that
    /// `directories_are_0700_under_any_umask` starts (umask is per process,
    /// so each umask gets a process of this test binary).
    #[test]
    fn umask_child() {
        let Ok(arg) = std::env::var("SANDBOXVM_TEST_UMASK_CHILD") else {
            return;
        };
        let (mask, dir) = arg.split_once(':').unwrap();
        // SAFETY: umask has no memory effects; this process runs only this test.
        unsafe { libc::umask(u32::from_str_radix(mask, 8).unwrap()) };
        create_dir_all(&Path::new(dir).join("a/b")).unwrap();
    }

    #[test]
    fn directories_are_0700_under_any_umask() {
        let base = std::env::temp_dir().join(format!("sandboxvm-private-{}", std::process::id()));
        for mask in ["000", "022", "077"] {
            let dir = base.join(mask);
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "private::tests::umask_child", "--test-threads=1"])
                .env(
                    "SANDBOXVM_TEST_UMASK_CHILD",
                    format!("{mask}:{}", dir.display()),
                )
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
            for p in [dir.join("a"), dir.join("a/b")] {
                assert_eq!(mode(&p), 0o700, "{} under umask {mask}", p.display());
            }
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_socket_is_0600() {
        let dir = std::env::temp_dir().join(format!("sandboxvm-sock-{}", std::process::id()));
        create_dir(&dir).unwrap();
        let p = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o777)).unwrap();
        restrict_socket(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert!(
            create_dir(&dir).is_err(),
            "an existing directory is an error"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

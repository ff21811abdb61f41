//! What virtiofsd shares with a guest: a directory holding the container's
//! root filesystem and the sources of the spec's host bind mounts
//! (`/etc/hosts`, `resolv.conf`, volumes...), each bind-mounted into it,
//! with the spec rewritten to their guest paths. The guest cannot see host
//! paths, so every host path a spec names must come through the share.
//!
//! Mount points are made before virtiofsd starts (it then sees them
//! through its own mount namespace); [`unmount_under`] takes them down
//! before a state directory is removed (a plain recursive delete would
//! descend into the bind-mounted rootfs).

use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::guest_spec::{Amend, GuestNetns, HostBind};

/// Where the agent mounts the share with tag T: `SHARES_DIR/T`.
pub const SHARES_DIR: &str = "/run/sandboxvm/shares";

/// Errors preparing a share.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mount point or bind mount failed.
    #[error("cannot share {src} with the guest: {reason}")]
    Bind {
        /// The host path.
        src: PathBuf,
        /// Why.
        reason: String,
    },
    /// The spec could not be amended for the guest.
    #[error("the spec: {0}")]
    Spec(String),
}

/// A directory shared with the guest by tag.
#[derive(Debug)]
pub struct Share {
    dir: PathBuf,
    tag: String,
}

impl Share {
    /// The share rooted at `dir` (created if missing), known in the guest by
    /// `tag`.
    pub fn new(dir: &Path, tag: &str) -> Result<Share, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Bind {
            src: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Share {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
        })
    }

    /// The host directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest path of `sub` inside the share.
    pub fn guest_path(&self, sub: &str) -> PathBuf {
        Path::new(SHARES_DIR).join(&self.tag).join(sub)
    }

    /// Bind-mounts host path `src` (file or directory) at `sub` in the
    /// share (recursively, so submounts come along); returns the guest path.
    pub fn bind(&self, src: &Path, sub: &str, readonly: bool) -> Result<PathBuf, Error> {
        let err = |reason: String| Error::Bind {
            src: src.to_path_buf(),
            reason,
        };
        let target = self.dir.join(sub);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
        }
        let meta = std::fs::metadata(src).map_err(|e| err(e.to_string()))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| err(e.to_string()))?;
        } else {
            std::fs::File::create(&target).map_err(|e| err(e.to_string()))?;
        }
        bind_tree(src, &target, readonly).map_err(err)?;
        Ok(self.guest_path(sub))
    }

    /// Shares a container whose guest spec is `guest`: its rootfs `rootfs`
    /// at `<prefix>rootfs` and its host binds under `<prefix>mounts/`
    /// (`prefix`: a pod container's directory, with its slash, or "").
    pub fn add_container(
        &self,
        prefix: &str,
        rootfs: &Path,
        guest: &crate::guest_spec::GuestSpec,
    ) -> Result<(), Error> {
        self.bind_rootfs(
            rootfs,
            &format!("{prefix}rootfs"),
            guest.readonly_root,
            &guest.mount_points,
        )?;
        self.bind_all(prefix, &guest.binds)
    }

    /// Binds the container's rootfs `src` at `sub` in the share; with
    /// `readonly` (`root.readonly`) read-only, after making the mount
    /// points the agent needs in it ([`make_mount_points`]).
    fn bind_rootfs(
        &self,
        src: &Path,
        sub: &str,
        readonly: bool,
        mount_points: &[(PathBuf, bool)],
    ) -> Result<PathBuf, Error> {
        if readonly {
            make_mount_points(src, mount_points).map_err(|reason| Error::Bind {
                src: src.to_path_buf(),
                reason,
            })?;
        }
        self.bind(src, sub, readonly)
    }

    /// Binds every one of `binds` at `<prefix>mounts/<name>` in the share.
    fn bind_all(&self, prefix: &str, binds: &[HostBind]) -> Result<(), Error> {
        for b in binds {
            self.bind(&b.source, &format!("{prefix}mounts/{}", b.name), b.readonly)?;
        }
        Ok(())
    }

    /// What virtiofsd serves: a view of the share whose own directories
    /// (the skeleton: `rootfs`, `mounts/`, per-container directories) are
    /// read-only, below which every bind keeps its own mode (the rootfs and
    /// read-write volumes writable, read-only ones read-only). A guest that
    /// mounts the share itself can then neither fill the host's /run nor
    /// swap the skeleton's directories for symlinks while the host mounts
    /// in it. The view (`<share>.served`, beside the share) receives what is
    /// mounted in the share later (it is its slave), so containers added to
    /// a running pod appear in it.
    pub fn served(&self) -> Result<PathBuf, Error> {
        let mut name = self.dir.as_os_str().to_owned();
        name.push(".served");
        let view = PathBuf::from(name);
        let err = |reason: String| Error::Bind {
            src: self.dir.clone(),
            reason,
        };
        std::fs::create_dir(&view).map_err(|e| err(format!("create {}: {e}", view.display())))?;
        let steps: [(Option<&Path>, MsFlags, &str); 3] = [
            (Some(&self.dir), MsFlags::MS_BIND | MsFlags::MS_REC, "bind"),
            (None, MsFlags::MS_SLAVE, "make slave"),
            (
                None,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV,
                "read-only remount",
            ),
        ];
        for (i, (src, flags, what)) in steps.into_iter().enumerate() {
            if let Err(e) = mount(src, &view, None::<&str>, flags, None::<&str>) {
                if i > 0 {
                    let _ = umount2(&view, MntFlags::MNT_DETACH);
                }
                let _ = std::fs::remove_dir(&view);
                return Err(err(format!("the guest's view: {what}: {e}")));
            }
        }
        Ok(view)
    }
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_int = 0x8000;
const OPEN_TREE_CLONE: libc::c_int = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_int = 0x4;

fn c_path(p: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| "a path with a NUL byte".into())
}

fn os_err(what: &str) -> String {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSYS) {
        format!("{what}: needs Linux 5.12 or later (the mount API with mount_setattr)")
    } else {
        format!("{what}: {e}")
    }
}

/// Whether a bind mount option makes it read-only (`ro`, or `rro`: submounts
/// too; [`bind_tree`] makes every read-only bind recursive anyway).
pub fn is_readonly_option(option: &str) -> bool {
    matches!(option, "ro" | "rro")
}

/// Bind-mounts `src` and every mount below it on `target`; with `readonly`,
/// all of them read-only (`rro`), made so before the copy is attached: a
/// read-only bind must not leave a submount writable, nor reach a
/// propagation peer (the guest's view of a running pod's share) writable
/// for an instant or for good (a remount changes only the mount it is
/// given, not the copies propagation made). The tree is cloned, set and
/// moved by file descriptor (open_tree, mount_setattr, move_mount); the
/// target's last component is not followed if it is a symlink.
pub fn bind_tree(src: &Path, target: &Path, readonly: bool) -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let src_c = c_path(src)?;
    // SAFETY: open_tree reads the NUL-terminated path; the returned fd is
    // owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(os_err("clone the mount tree"));
    }
    // SAFETY: a new fd of ours that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // Private: a mount the host makes later under the source (or under its
    // peers) does not reach the share, where it would come with its own,
    // writable, mode.
    let attr = MountAttr {
        attr_set: if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads "" and `attr` (of the size given), both
    // alive for the call, and acts on the detached tree `tree`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(os_err("set the mount tree's mode and propagation"));
    }
    let target_c = c_path(target)?;
    // SAFETY: move_mount reads "" and the NUL-terminated target path; the
    // tree fd stays open for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(os_err("attach the mount tree"));
    }
    Ok(())
}

/// Opens `path` below the directory `dirfd` as if `dirfd` were `/`
/// (`openat2` with `RESOLVE_IN_ROOT`): a symlink in the rootfs resolves
/// inside it, as it will in the container, never to a host path.
fn open_in_root(dirfd: &OwnedFd, path: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let c = c_path(path).map_err(std::io::Error::other)?;
    // SAFETY: open_how is plain integers: all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and `how` (its size
    // given) during the call; the result is checked before use.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Err(std::io::Error::other(
                "openat2 is missing: a read-only rootfs needs Linux 5.6 or later",
            ));
        }
        return Err(e);
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes the mount points `points` (relative paths; files or directories)
/// in `rootfs` where they are missing, for a rootfs the guest gets
/// read-only. Every path is resolved inside the rootfs (a symlink in the
/// image cannot point a host write elsewhere); an entry that exists in any
/// form, a symlink included, is left as it is (the agent resolves it), and
/// so is one below a symlink that leads nowhere in the rootfs (the agent
/// then says what is missing). Modes are 0755 and 0644 whatever the umask.
pub fn make_mount_points(rootfs: &Path, points: &[(PathBuf, bool)]) -> Result<(), String> {
    let root = std::fs::File::open(rootfs)
        .map(OwnedFd::from)
        .map_err(|e| format!("open {}: {e}", rootfs.display()))?;
    for (point, is_file) in points {
        let fail = |what: &str, e: std::io::Error| {
            format!("mount point /{} ({what}): {e}", point.display())
        };
        let Some(name) = point.file_name() else {
            continue;
        };
        // The parent, made directory by directory where missing.
        let mut parent = open_in_root(&root, Path::new("."), libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| fail("open the rootfs", e))?;
        let mut sofar = PathBuf::new();
        let mut reachable = true;
        for part in point.parent().into_iter().flat_map(Path::components) {
            sofar.push(part);
            let dir = match open_in_root(&root, &sofar, libc::O_PATH | libc::O_DIRECTORY) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    mkdir_at(&parent, part.as_os_str()).map_err(|e| fail("mkdir", e))?;
                    match open_in_root(&root, &sofar, libc::O_PATH | libc::O_DIRECTORY) {
                        // A dangling symlink in the image: not ours to fix.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            reachable = false;
                            break;
                        }
                        other => other,
                    }
                }
                other => other,
            };
            parent = dir.map_err(|e| fail("parent", e))?;
        }
        if !reachable {
            log::debug!(
                "mount point /{}: a symlink on the way leads nowhere in the rootfs",
                point.display()
            );
            continue;
        }
        let cname = c_path(Path::new(name))?;
        // SAFETY: fstatat with AT_SYMLINK_NOFOLLOW on a name relative to a
        // descriptor we own, writing into a zeroed stat buffer.
        let exists = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstatat(
                parent.as_raw_fd(),
                cname.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ) == 0
        };
        if exists {
            continue;
        }
        if *is_file {
            // SAFETY: openat on a name (no slash) relative to our
            // descriptor, not following a symlink; the fd is closed at once.
            let fd = unsafe {
                libc::openat(
                    parent.as_raw_fd(),
                    cname.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd < 0 {
                return Err(fail("create", std::io::Error::last_os_error()));
            }
            // SAFETY: the descriptor just opened: its mode whatever the
            // umask, then closed.
            unsafe {
                libc::fchmod(fd, 0o644);
                libc::close(fd);
            }
        } else {
            mkdir_at(&parent, name).map_err(|e| fail("mkdir", e))?;
        }
    }
    Ok(())
}

/// mkdirat(2) of `name` (one component) in `dir`; an existing entry is
/// fine.
fn mkdir_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> std::io::Result<()> {
    let c = c_path(Path::new(name)).map_err(std::io::Error::other)?;
    // SAFETY: mkdirat on a single component relative to a descriptor we
    // own; it never follows a symlink in that component.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
        return Ok(());
    }
    // 0755 whatever the umask. The rootfs is not shared yet: nothing can
    // have swapped the new directory for a symlink.
    // SAFETY: as above, on the directory just made.
    unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), 0o755, 0) };
    Ok(())
}

/// Shares `bundle` with the guest through `dir` as the share `tag`: its
/// rootfs at `rootfs`, the sources of its host bind mounts under `mounts/`
/// ([`crate::guest_spec`]); returns the share and the spec for the agent,
/// whose rootfs is the share's `rootfs`.
pub fn share_bundle(
    dir: &Path,
    tag: &str,
    bundle: &crate::bundle::Bundle,
    id: &str,
    netns: GuestNetns,
) -> Result<(Share, String), Error> {
    let spec: serde_json::Value =
        serde_json::from_str(&bundle.config_json).map_err(|e| Error::Spec(e.to_string()))?;
    let share = Share::new(dir, tag)?;
    let guest = crate::guest_spec::amend(
        &spec,
        &Amend {
            id,
            share_dir: share.guest_path(""),
            netns,
            sandbox_pid: None,
            pod_shm: false,
            drop_user_and_time: false,
            bundle_dir: bundle.dir.clone(),
        },
    )
    .map_err(|e| Error::Spec(e.to_string()))?;
    share.add_container("", &bundle.rootfs, &guest)?;
    Ok((share, guest.json))
}

/// Mount points at or below `dir` in this mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir`; true if none is left (only
/// then may `dir` be removed recursively).
pub fn unmount_under(dir: &Path) -> bool {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return true;
        }
        for m in mounts {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                log::debug!("umount {}: {e}", m.display());
            }
        }
    }
    mounts_under(dir).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b\011c"), "/a b\tc");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn proc_is_mounted_under_root_and_not_under_a_sibling_prefix() {
        assert!(mounts_under(Path::new("/")).contains(&PathBuf::from("/proc")));
        assert!(mounts_under(Path::new("/pro")).is_empty());
    }

    #[test]
    fn the_guest_cannot_write_the_skeleton_or_a_read_only_bind_and_its_submounts() {
        if !root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let base = std::env::temp_dir().join(format!("sandboxvm-served-{}", std::process::id()));
        let host = base.join("host");
        let (rootfs, vol, sub) = (host.join("rootfs"), host.join("vol"), host.join("other"));
        for d in [&rootfs, &vol.join("sub"), &sub, &host.join("late")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(sub.join("secret"), "keep").unwrap();
        // A submount inside the read-only volume (as a hostPath over mounts).
        mount(
            Some(&sub),
            &vol.join("sub"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let share = Share::new(&base.join("shared"), "sbx-rootfs").unwrap();
        share.bind(&rootfs, "rootfs", false).unwrap();
        share.bind(&vol, "mounts/0-vol", true).unwrap();
        let view = share.served().unwrap();
        let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EROFS);
        // The skeleton: no new files, no symlink swaps.
        assert!(erofs(std::fs::write(view.join("fill"), "x")));
        assert!(erofs(std::fs::create_dir(view.join("mounts/evil"))));
        assert!(erofs(std::fs::rename(view.join("mounts"), view.join("m2"))));
        // The read-only bind and its submount.
        assert!(erofs(std::fs::write(view.join("mounts/0-vol/x"), "x")));
        assert!(erofs(std::fs::write(
            view.join("mounts/0-vol/sub/secret"),
            "owned"
        )));
        assert_eq!(std::fs::read_to_string(sub.join("secret")).unwrap(), "keep");
        // The container's own rootfs stays writable.
        std::fs::write(view.join("rootfs/file"), "mine").unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.join("file")).unwrap(),
            "mine"
        );
        assert!(unmount_under(&base));
        let _ = umount2(&vol.join("sub"), MntFlags::MNT_DETACH);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn what_the_host_binds_later_in_a_shared_share_appears_in_the_view() {
        if !root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let base = std::env::temp_dir().join(format!("sandboxvm-late-{}", std::process::id()));
        let late = base.join("late");
        std::fs::create_dir_all(&late).unwrap();
        std::fs::write(late.join("f"), "late").unwrap();
        let staging = base.join("shared");
        std::fs::create_dir_all(&staging).unwrap();
        // As the shim has it: the share a mount of its own, shared.
        for flags in [MsFlags::MS_BIND, MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
            let src = flags.contains(MsFlags::MS_BIND).then_some(&staging);
            mount(src, &staging, None::<&str>, flags, None::<&str>).unwrap();
        }
        let share = Share::new(&staging, "sbx-rootfs").unwrap();
        let view = share.served().unwrap();
        // A pod's second container, after the VM started.
        share.bind(&late, "c2/mounts/0-late", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(view.join("c2/mounts/0-late/f")).unwrap(),
            "late"
        );
        assert!(std::fs::write(view.join("c2/mounts/0-late/f"), "x").is_err());
        assert!(unmount_under(&base));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mount_points_are_made_inside_the_rootfs_and_never_through_its_symlinks() {
        let base = std::env::temp_dir().join(format!("sandboxvm-mp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let rootfs = base.join("rootfs");
        let victim = base.join("victim");
        std::fs::create_dir_all(rootfs.join("proc")).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        // An image's symlinks: absolute ones to where the host has a
        // directory, and a relative one that climbs out.
        std::os::unix::fs::symlink(&victim, rootfs.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../victim", rootfs.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc/hosts", rootfs.join("hostsfile")).unwrap();
        let points = |list: &[(&str, bool)]| -> Vec<(PathBuf, bool)> {
            list.iter().map(|(p, f)| (PathBuf::from(p), *f)).collect()
        };
        make_mount_points(
            &rootfs,
            &points(&[
                ("proc", false),
                ("data/vol", false),
                ("run/secrets/token", true),
            ]),
        )
        .unwrap();
        assert!(rootfs.join("data/vol").is_dir());
        assert!(rootfs.join("run/secrets/token").is_file());
        // A symlink in place of the mount point itself is the agent's to
        // resolve: left alone.
        make_mount_points(&rootfs, &points(&[("hostsfile", true)])).unwrap();
        assert!(std::fs::symlink_metadata(rootfs.join("hostsfile"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Through the symlinks: resolved in the rootfs, where their targets
        // do not exist: left to the agent; the host directory untouched.
        make_mount_points(
            &rootfs,
            &points(&[("etc/hosts", true), ("up/x", true), ("etc/sub/file", true)]),
        )
        .unwrap();
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        assert!(!rootfs.join("victim").exists());
        // Modes whatever the umask: made by a child process under umask
        // 077 (the mask is the whole process's).
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "share::tests::umask_child", "--test-threads=1"])
            .env("SANDBOXVM_TEST_UMASK_ROOTFS", &rootfs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(rootfs.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(
            (mode("srv"), mode("srv/a/b"), mode("srv/f")),
            (0o755, 0o755, 0o644)
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Not a test by itself: the child of
    /// `mount_points_are_made_inside_the_rootfs_and_never_through_its_symlinks`.
    #[test]
    fn umask_child() {
        let Some(rootfs) = std::env::var_os("SANDBOXVM_TEST_UMASK_ROOTFS") else {
            return;
        };
        // SAFETY: umask only sets this (child) process's mask.
        unsafe { libc::umask(0o077) };
        let points = [
            (PathBuf::from("srv/a/b"), false),
            (PathBuf::from("srv/f"), true),
        ];
        make_mount_points(Path::new(&rootfs), &points).unwrap();
    }

    #[test]
    fn host_binds_come_through_the_share_and_unmount_cleanly() {
        if !root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let base = std::env::temp_dir().join(format!("sandboxvm-share-{}", std::process::id()));
        let host = base.join("host");
        std::fs::create_dir_all(host.join("vol")).unwrap();
        std::fs::write(host.join("hosts"), "127.0.0.1 me\n").unwrap();
        std::fs::write(host.join("vol/data"), "keep me").unwrap();
        let share = Share::new(&base.join("shared"), "sbx-rootfs").unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": host.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "source": host.join("vol"), "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": host.join("vol"), "options": ["rbind"]},
            ]
        });
        let guest = crate::guest_spec::amend(
            &spec,
            &Amend {
                id: "c1",
                share_dir: share.guest_path("c1"),
                netns: GuestNetns::Pod,
                sandbox_pid: None,
                pod_shm: false,
                drop_user_and_time: false,
                bundle_dir: base.clone(),
            },
        )
        .unwrap();
        share.bind_all("c1/", &guest.binds).unwrap();
        let amended: serde_json::Value = serde_json::from_str(&guest.json).unwrap();
        let m = &amended["mounts"];
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(
            m[1]["source"],
            "/run/sandboxvm/shares/sbx-rootfs/c1/mounts/0-hosts"
        );
        assert_eq!(
            std::fs::read_to_string(share.dir().join("c1/mounts/0-hosts")).unwrap(),
            "127.0.0.1 me\n"
        );
        // Read-only on the host side too.
        assert!(std::fs::write(share.dir().join("c1/mounts/0-hosts"), "x").is_err());
        assert_eq!(
            std::fs::read_to_string(share.dir().join("c1/mounts/1-vol/data")).unwrap(),
            "keep me"
        );
        assert_eq!(m[3]["type"], "tmpfs");
        assert_eq!(mounts_under(share.dir()).len(), 2);
        assert!(unmount_under(&base));
        std::fs::remove_dir_all(share.dir()).unwrap();
        // The sources are untouched by the removal.
        assert_eq!(
            std::fs::read_to_string(host.join("vol/data")).unwrap(),
            "keep me"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}

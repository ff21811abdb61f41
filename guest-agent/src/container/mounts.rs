//! Root filesystem setup, run by the container init inside its new mount
//! namespace (after fork, before exec). Errors are one-line strings sent
//! back to the agent through the error pipe.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, chroot, pivot_root};

use super::spec::{ContainerConfig, MountConfig};

type Result<T> = std::result::Result<T, String>;

/// `dest` (absolute, in the container) below `rootfs`, without `..`
/// escaping it lexically.
fn in_root(rootfs: &Path, dest: &Path) -> PathBuf {
    let mut out = rootfs.to_path_buf();
    for c in dest.components() {
        if let Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

fn mnt(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {} (type {}): {e}",
            src.map(|s| s.display().to_string())
                .unwrap_or_else(|| "none".into()),
            target.display(),
            fstype.unwrap_or("none")
        )
    })
}

/// Makes the mount point `target` where it is missing. Another container
/// of the pod can share a volume with this one and keep swapping the entry
/// (a directory, then a dangling symlink, then nothing): an entry that
/// appears between the check and the creation is looked at again, a
/// bounded number of times, before its error is the container's.
fn ensure_target(target: &Path, is_file: bool) -> Result<()> {
    const RACES: u32 = 50;
    let mut tries = 0;
    loop {
        match make_target(target, is_file) {
            Err(e) if raced(&e) && tries < RACES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r.map_err(|e| format!("create mount point {}: {e}", target.display())),
        }
    }
}

/// An entry in the way: made by someone else since the check, or a
/// symlink (never followed to make a file elsewhere).
fn raced(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AlreadyExists || e.raw_os_error() == Some(libc::ELOOP)
}

fn make_target(target: &Path, is_file: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if target.exists() {
        return Ok(());
    }
    if is_file {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)?;
    } else {
        fs::create_dir_all(target)?;
    }
    Ok(())
}

fn do_mount(rootfs: &Path, m: &MountConfig) -> Result<()> {
    let target = in_root(rootfs, &m.destination);
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    if m.bind {
        let src = m
            .source
            .as_deref()
            .ok_or_else(|| format!("bind mount {} has no source", m.destination.display()))?;
        ensure_target(&target, !src.is_dir())?;
        let rec = m.flags & MsFlags::MS_REC;
        mnt(Some(src), &target, None, MsFlags::MS_BIND | rec, None)?;
        let extra = m.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mnt(
                None,
                &target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None,
            )?;
        }
    } else {
        ensure_target(&target, false)?;
        let fstype = match m.typ.as_str() {
            "cgroup" => "cgroup2",
            t => t,
        };
        let src = m.source.clone().unwrap_or_else(|| PathBuf::from(fstype));
        let r = mnt(Some(&src), &target, Some(fstype), m.flags, data);
        if let Err(e) = r {
            // cgroup2 and sysfs can be refused in some nestings (sysfs in a
            // user namespace whose network namespace is not its own: the
            // guest's is bound instead, as runc does); they are not
            // essential to run the workload.
            if fstype == "sysfs" {
                let _ = bind_sysfs(&target, m.flags);
            } else if fstype != "cgroup2" {
                return Err(e);
            }
        }
    }
    if !m.propagation.is_empty() {
        mnt(None, &target, None, m.propagation, None)?;
    }
    Ok(())
}

/// The guest's /sys bound at `target`, read-only if `flags` ask for it.
fn bind_sysfs(target: &Path, flags: MsFlags) -> Result<()> {
    let sys = Path::new("/sys");
    mnt(
        Some(sys),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let keep =
        flags & (MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    if !keep.is_empty() {
        mnt(
            None,
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | keep,
            None,
        )?;
    }
    Ok(())
}

const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn setup_dev(rootfs: &Path) -> Result<()> {
    let dev = rootfs.join("dev");
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        if path.exists() {
            continue;
        }
        let made = mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        );
        if made.is_err() {
            // No mknod (e.g. a filesystem that refuses device nodes): bind
            // the agent's node instead.
            ensure_target(&path, true)?;
            mnt(
                Some(&Path::new("/dev").join(name)),
                &path,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
        // mknod is subject to the umask.
        let _ = nix::sys::stat::fchmodat(
            None,
            &path,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        );
    }
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = dev.join(name);
        if fs::symlink_metadata(&path).is_err() {
            symlink(target, &path).map_err(|e| format!("symlink {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Makes a node of `linux.devices` (replacing what the path held, as runc
/// does), with the spec's mode and owner, whatever the umask.
fn make_device(rootfs: &Path, d: &super::spec::DeviceConfig) -> Result<()> {
    let path = in_root(rootfs, &d.path);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    let _ = fs::remove_file(&path);
    let made = mknod(
        &path,
        d.kind,
        Mode::from_bits_truncate(d.mode),
        makedev(d.major, d.minor),
    );
    if made == Err(nix::errno::Errno::EPERM) {
        // In a user namespace no node can be made: the guest's node of the
        // same path and numbers is bound instead (mode and owner stay the
        // guest's), as runc binds the host's.
        return bind_guest_device(&path, d);
    }
    made.map_err(|e| format!("linux.devices {}: mknod: {e}", d.path.display()))?;
    nix::sys::stat::fchmodat(
        None,
        &path,
        Mode::from_bits_truncate(d.mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| format!("linux.devices {}: chmod: {e}", d.path.display()))?;
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
    )
    .map_err(|e| format!("linux.devices {}: chown: {e}", d.path.display()))?;
    Ok(())
}

fn bind_guest_device(path: &Path, d: &super::spec::DeviceConfig) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let name = d.path.display();
    let guest = fs::metadata(&d.path).map_err(|e| {
        format!("linux.devices {name}: no node can be made in a user namespace and the guest has none to bind: {e}")
    })?;
    let t = guest.file_type();
    let same_kind = match d.kind {
        SFlag::S_IFCHR => t.is_char_device(),
        SFlag::S_IFBLK => t.is_block_device(),
        _ => t.is_fifo(),
    };
    if !same_kind || guest.rdev() != makedev(d.major, d.minor) {
        return Err(format!(
            "linux.devices {name}: no node can be made in a user namespace and the guest's {name} is another device"
        ));
    }
    ensure_target(path, true)?;
    mnt(Some(&d.path), path, None, MsFlags::MS_BIND, None)
}

/// Sets up the container's root: mounts, /dev, pivot_root (or MS_MOVE +
/// chroot when pivot_root is refused, as on an initramfs root), masked and
/// read-only paths, read-only root. Runs in the new mount namespace.
pub fn setup_rootfs(cfg: &ContainerConfig) -> Result<()> {
    // Keep every mount we make out of the agent's namespace.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let rootfs = cfg.rootfs.as_path();
    // pivot_root needs the new root to be a mount point.
    mnt(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let dev_in_spec = cfg
        .mounts
        .iter()
        .any(|m| m.destination == Path::new("/dev"));
    if !dev_in_spec {
        let dev = rootfs.join("dev");
        ensure_target(&dev, false)?;
        mnt(
            Some(Path::new("tmpfs")),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        )?;
    }
    for m in &cfg.mounts {
        do_mount(rootfs, m)?;
    }
    if !cfg
        .mounts
        .iter()
        .any(|m| m.destination == Path::new("/dev/pts"))
    {
        let pts = rootfs.join("dev/pts");
        ensure_target(&pts, false)?;
        mnt(
            Some(Path::new("devpts")),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )?;
    }
    if cfg.process.terminal {
        // The terminal was opened in the agent's devpts; show that instance
        // in the container so `tty`/ttyname() find /dev/pts/N there.
        mnt(
            Some(Path::new("/dev/pts")),
            &rootfs.join("dev/pts"),
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    for f in &cfg.staged_etc {
        etc_file(rootfs, f)?;
    }
    setup_dev(rootfs)?;
    for d in &cfg.devices {
        make_device(rootfs, d)?;
    }
    enter_root(rootfs)?;
    // On the root once it is one (before, a shared root would join the
    // peer group of the mount it was bound from); private is what it is
    // already.
    let p = cfg.root_propagation;
    if !p.is_empty() && !p.contains(MsFlags::MS_PRIVATE) {
        mnt(None, Path::new("/"), None, p, None)?;
    }
    for p in &cfg.masked_paths {
        mask_path(p)?;
    }
    for p in &cfg.readonly_paths {
        readonly_path(p)?;
    }
    if cfg.readonly_root {
        mnt(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// A file shown over the rootfs's own: the spec's hostname in
/// /etc/hostname (when the rootfs has one, as Docker and Kubernetes do) and
/// the pod network's /etc/resolv.conf and /etc/hosts (made if missing when
/// /etc exists). A symlink there is left alone.
#[derive(Clone, Debug)]
pub struct EtcFile {
    /// Relative to the rootfs.
    pub rel: PathBuf,
    /// The agent's copy, bound over it.
    pub source: PathBuf,
    /// Make the mount point if the rootfs has none.
    pub create: bool,
}

/// The container's [`EtcFile`]s, written by the agent before the fork into
/// a directory of the container's own (a container in a user namespace
/// cannot write in the guest's /run, only look files up there); removed
/// when dropped, once the container is set up (its mounts keep the files).
pub struct StagedEtc {
    dir: PathBuf,
    pub files: Vec<EtcFile>,
}

impl Drop for StagedEtc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Writes the hostname and `etc_files` of `cfg` for the container `id`
/// (the directories 0711, the files 0444, whatever the umask).
pub fn stage_etc(cfg: &ContainerConfig, id: &str) -> Result<StagedEtc> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = Path::new("/run/sandboxvm/etc").join(id);
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    // A leftover of an earlier container of this id goes; the guard
    // removes this one's whatever fails below.
    let _ = fs::remove_dir_all(&dir);
    let mut staged = StagedEtc {
        dir: dir.clone(),
        files: Vec::new(),
    };
    for d in [
        Path::new("/run/sandboxvm"),
        Path::new("/run/sandboxvm/etc"),
        &dir,
    ] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(d)
            .map_err(|e| io(d, e))?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o711)).map_err(|e| io(d, e))?;
    }
    let hostname = cfg
        .hostname
        .as_ref()
        .map(|h| (PathBuf::from("etc/hostname"), format!("{h}\n"), false));
    let others = cfg
        .etc_files
        .iter()
        .map(|(r, t)| (r.clone(), t.clone(), true));
    for (i, (rel, text, create)) in hostname.into_iter().chain(others).enumerate() {
        let source = dir.join(i.to_string());
        fs::write(&source, text).map_err(|e| io(&source, e))?;
        fs::set_permissions(&source, fs::Permissions::from_mode(0o444))
            .map_err(|e| io(&source, e))?;
        staged.files.push(EtcFile {
            rel,
            source,
            create,
        });
    }
    Ok(staged)
}

/// Binds `f` over the rootfs's file, where the rootfs has a plain file (or
/// none and `f.create`, when its directory exists).
fn etc_file(rootfs: &Path, f: &EtcFile) -> Result<()> {
    let target = rootfs.join(&f.rel);
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_file() => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && f.create => {
            let parent_is_dir = target
                .parent()
                .is_some_and(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()));
            if !parent_is_dir || fs::File::create(&target).is_err() {
                return Ok(());
            }
        }
        _ => return Ok(()),
    }
    mnt(Some(&f.source), &target, None, MsFlags::MS_BIND, None)
}

fn enter_root(rootfs: &Path) -> Result<()> {
    chdir(rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked under the new one: detach it.
            mnt(
                None,
                Path::new("."),
                None,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None,
            )?;
            umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("unmount old root: {e}"))?;
        }
        Err(_) => {
            // pivot_root is refused on the initramfs root: move the rootfs
            // over / and chroot, as runc --no-pivot does.
            mnt(Some(rootfs), Path::new("/"), None, MsFlags::MS_MOVE, None)?;
            chroot(".").map_err(|e| format!("chroot {}: {e}", rootfs.display()))?;
        }
    }
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

fn mask_path(p: &Path) -> Result<()> {
    match fs::metadata(p) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => mnt(
            Some(Path::new("tmpfs")),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        ),
        Ok(_) => mnt(
            Some(Path::new("/dev/null")),
            p,
            None,
            MsFlags::MS_BIND,
            None,
        ),
    }
}

fn readonly_path(p: &Path) -> Result<()> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mnt(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    mnt(
        None,
        p,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sbx-mounts-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Another container of the pod keeps a dangling symlink where the
    /// mount point goes, then removes it: the mount point is made once
    /// the entry is gone, and the symlink's target never is.
    #[test]
    fn a_mount_point_raced_by_a_symlink_is_made_once_the_entry_goes() {
        let d = scratch("race");
        for is_file in [false, true] {
            let target = d.join(format!("sub{is_file}"));
            let elsewhere = d.join(format!("elsewhere{is_file}"));
            symlink(&elsewhere, &target).unwrap();
            let swap = {
                let target = target.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    fs::remove_file(&target).unwrap();
                })
            };
            ensure_target(&target, is_file).unwrap();
            swap.join().unwrap();
            let made = fs::symlink_metadata(&target).unwrap();
            assert_eq!(made.is_dir(), !is_file);
            assert!(!elsewhere.exists(), "followed the symlink");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    /// A symlink that stays is a clear error, never followed.
    #[test]
    fn a_mount_point_that_stays_a_dangling_symlink_is_refused() {
        let d = scratch("stays");
        for is_file in [false, true] {
            let target = d.join(format!("sub{is_file}"));
            let elsewhere = d.join(format!("elsewhere{is_file}"));
            symlink(&elsewhere, &target).unwrap();
            let e = ensure_target(&target, is_file).unwrap_err();
            assert!(e.starts_with("create mount point "), "{e}");
            assert!(!elsewhere.exists(), "followed the symlink");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}

//! Host mounts: a container's root filesystem from containerd's mount list
//! (usually one overlay), bind mounts into the pod's shared directory, the
//! shared mount itself, and finding and removing what is mounted below a
//! directory.

use std::path::Path;

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

fn mount_err(what: String) -> impl FnOnce(nix::Error) -> Error {
    move |source| Error::Mount { what, source }
}

/// Mounts containerd's `mounts` (a snapshot: overlay, or a bind of a
/// directory) on `target`, in order.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for m in mounts {
        let (flags, propagation, data) = protocol::mount_options::parse(&m.options);
        let typ = (!m.type_.is_empty() && m.type_ != "bind").then_some(m.type_.as_str());
        let flags = if m.type_ == "bind" {
            flags | MsFlags::MS_BIND
        } else {
            flags
        };
        let what = format!(
            "mount {} ({}) on {}",
            m.source,
            if m.type_.is_empty() { "none" } else { &m.type_ },
            target.display()
        );
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(m.source.as_str()),
            target,
            typ,
            flags & !MsFlags::MS_RDONLY,
            data,
        )
        .map_err(mount_err(what.clone()))?;
        // A bind mount only becomes read-only by a remount.
        if flags.contains(MsFlags::MS_RDONLY) {
            let remount = if flags.contains(MsFlags::MS_BIND) {
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY
            } else {
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY
            };
            mount(None::<&str>, target, None::<&str>, remount, data)
                .map_err(mount_err(format!("{what}: read-only")))?;
        }
        if !propagation.is_empty() {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                propagation,
                None::<&str>,
            )
            .map_err(mount_err(format!("{what}: propagation")))?;
        }
    }
    Ok(())
}

/// Bind-mounts `source` (recursively) on `target`.
pub fn bind(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err(format!(
        "bind-mount {} on {}",
        source.display(),
        target.display()
    )))
}

/// Makes `dir` a mount point of its own peer group (bind on itself, private,
/// then shared), so that what is mounted below it later also appears in the
/// mount namespaces that copied it, such as virtiofsd's.
pub fn make_shared(dir: &Path) -> Result<()> {
    bind(dir, dir)?;
    for (flag, what) in [
        (MsFlags::MS_PRIVATE, "private"),
        (MsFlags::MS_SHARED, "shared"),
    ] {
        if let Err(e) = mount(None::<&str>, dir, None::<&str>, flag, None::<&str>) {
            let _ = umount2(dir, MntFlags::MNT_DETACH);
            return Err(mount_err(format!("make {} {what}", dir.display()))(e));
        }
    }
    Ok(())
}

/// Unmounts everything below `dir`, then removes it; never removes a
/// directory that still has something mounted below it (a recursive delete
/// would descend into the container's rootfs or a host bind source).
pub fn remove_dir(dir: &Path) {
    if !sandboxvm::share::unmount_under(dir) {
        log::warn!("mounts remain below {}: not removing it", dir.display());
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

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

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, MountBuilder, Spec};

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
    /// The rewritten spec could not be built.
    #[error("cannot rewrite the spec's mounts: {0}")]
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
        mount(
            Some(src),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err(format!("bind mount: {e}")))?;
        if readonly {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| err(format!("read-only remount: {e}")))?;
        }
        Ok(self.guest_path(sub))
    }
}

/// Shares `bundle` with the guest through `dir` (the rootfs at `rootfs`,
/// host bind-mount sources under `mounts/`) as the share `tag`; returns the
/// spec JSON for the agent, whose rootfs is the share's `rootfs`.
pub fn share_bundle(
    dir: &Path,
    tag: &str,
    bundle: &crate::bundle::Bundle,
) -> Result<(Share, String), Error> {
    let share = Share::new(dir, tag)?;
    share.bind(&bundle.rootfs, "rootfs", false)?;
    let mut spec = bundle.spec.clone();
    rewrite_mounts(&mut spec, &share, "")?;
    let json = serde_json::to_string(&spec).map_err(|e| Error::Spec(e.to_string()))?;
    Ok((share, json))
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// Shares every host bind-mount source of `spec` under `prefix/mounts/` in
/// `share` and points the mounts at their guest paths; `/dev/shm` becomes
/// a guest tmpfs (shared memory cannot span the VM boundary).
pub fn rewrite_mounts(spec: &mut Spec, share: &Share, prefix: &str) -> Result<(), Error> {
    let mut out = Vec::new();
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        if !is_bind(m) {
            out.push(m.clone());
            continue;
        }
        if m.destination() == Path::new("/dev/shm") {
            out.push(
                MountBuilder::default()
                    .destination("/dev/shm")
                    .typ("tmpfs")
                    .source("shm")
                    .options(vec![
                        "nosuid".to_string(),
                        "noexec".into(),
                        "nodev".into(),
                        "mode=1777".into(),
                        "size=65536k".into(),
                    ])
                    .build()
                    .map_err(|e| Error::Spec(e.to_string()))?,
            );
            continue;
        }
        let Some(src) = m.source().clone() else {
            out.push(m.clone());
            continue;
        };
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let sub = format!("{prefix}mounts/{i}-{name}");
        let readonly = m.options().iter().flatten().any(|o| o == "ro");
        let guest = share.bind(&src, &sub, readonly)?;
        let mut m = m.clone();
        m.set_source(Some(guest));
        out.push(m);
    }
    spec.set_mounts(Some(out));
    Ok(())
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
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": host.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "source": host.join("vol"), "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": host.join("vol"), "options": ["rbind"]},
            ]
        }))
        .unwrap();
        rewrite_mounts(&mut spec, &share, "c1/").unwrap();
        let m = spec.mounts().clone().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            m[1].source().as_deref(),
            Some(Path::new(
                "/run/sandboxvm/shares/sbx-rootfs/c1/mounts/1-hosts"
            ))
        );
        assert_eq!(
            std::fs::read_to_string(share.dir().join("c1/mounts/1-hosts")).unwrap(),
            "127.0.0.1 me\n"
        );
        // Read-only on the host side too.
        assert!(std::fs::write(share.dir().join("c1/mounts/1-hosts"), "x").is_err());
        assert_eq!(
            std::fs::read_to_string(share.dir().join("c1/mounts/2-vol/data")).unwrap(),
            "keep me"
        );
        assert_eq!(m[3].typ().as_deref(), Some("tmpfs"));
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

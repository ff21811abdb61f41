//! OCI mount options (mount(8) style, as in a spec's `mounts[].options`
//! and containerd's rootfs mounts) as mount(2) flags: one reading of them
//! for the host (the shim mounting rootfs snapshots) and the guest (the
//! agent mounting a container's spec mounts).

use nix::mount::MsFlags;

/// The options [`parse`] turns into flags (others go to the filesystem as
/// data), as `sandboxvm features` lists them.
pub const FLAG_NAMES: &[&str] = &[
    "defaults",
    "ro",
    "rw",
    "bind",
    "rbind",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "sync",
    "async",
    "dirsync",
    "remount",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "shared",
    "rshared",
    "unbindable",
    "runbindable",
];

/// Decodes mount(8)-style options into flags, propagation flags and the
/// data string for the filesystem.
pub fn parse(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        if let Some(p) = propagation_of(o) {
            propagation = p;
            continue;
        }
        let (set, clear) = match o.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, propagation, data.join(","))
}

/// The propagation flags of a mount option or `linux.rootfsPropagation`
/// value (`private`, `rslave`, `shared`, `runbindable`...); `None` for
/// anything else.
pub fn propagation_of(name: &str) -> Option<MsFlags> {
    let (rec, base) = match name.strip_prefix('r') {
        Some(base) if !base.is_empty() => (MsFlags::MS_REC, base),
        _ => (MsFlags::empty(), name),
    };
    let p = match base {
        "private" => MsFlags::MS_PRIVATE,
        "slave" => MsFlags::MS_SLAVE,
        "shared" => MsFlags::MS_SHARED,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(p | rec)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_listed_flag_is_a_flag_not_data() {
        for name in super::FLAG_NAMES {
            let (_, _, data) = super::parse(&[name.to_string()]);
            assert_eq!(data, "", "{name}");
        }
    }

    use super::*;

    #[test]
    fn options_become_flags_and_data() {
        let o = |v: &[&str]| parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (f, p, d) = o(&["ro", "rbind", "nosuid", "rprivate"]);
        assert_eq!(
            f,
            MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID
        );
        assert_eq!(p, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(d, "");
        let (f, _, d) = o(&["index=off", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"]);
        assert_eq!(f, MsFlags::empty());
        assert_eq!(d, "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w");
        let (f, _, _) = o(&["ro", "rw"]);
        assert_eq!(f, MsFlags::empty());
        assert_eq!(
            o(&["runbindable"]).1,
            MsFlags::MS_UNBINDABLE | MsFlags::MS_REC
        );
        assert_eq!(o(&["slave"]).1, MsFlags::MS_SLAVE);
        assert_eq!(
            o(&["shared", "rshared"]).1,
            MsFlags::MS_SHARED | MsFlags::MS_REC
        );
        assert_eq!(propagation_of("r"), None);
        assert_eq!(propagation_of("readonly"), None);
    }
}

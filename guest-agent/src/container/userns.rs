//! User namespaces: `linux.uidMappings` / `linux.gidMappings` checked in
//! the agent, and a container process moved into a new user namespace with
//! those maps.
//!
//! The maps are written from outside the new namespace, by a child the
//! intermediate process leaves in the guest's own user namespace (inside,
//! a process may map only its own id, once). The intermediate process then
//! becomes root of the new namespace and makes the container's other
//! namespaces as that root, so they belong to the new one (runc's order).

use std::fs::File;
use std::io::{Read, Write};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, setresgid, setresuid, ForkResult, Gid, Pid, Uid};
use oci_spec::runtime::{Linux, LinuxIdMapping};

use super::Error;

/// The most lines a map may hold (the kernel's limit since Linux 4.15).
pub const MAX_MAP_LINES: usize = 340;

/// A new user namespace's maps, as `/proc/PID/uid_map` and `gid_map` take
/// them ("container-id guest-id count" lines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMaps {
    pub uid: String,
    pub gid: String,
}

/// The maps of the spec, checked: present exactly when a new user
/// namespace is made (a joined one has its maps already), at most
/// [`MAX_MAP_LINES`] lines of non-empty ranges that stay within 32 bits,
/// and mapping the container's root (the container is set up as it).
pub fn id_maps(linux: &Linux, new_userns: bool) -> Result<Option<IdMaps>, Error> {
    let uid = linux.uid_mappings().as_deref().unwrap_or_default();
    let gid = linux.gid_mappings().as_deref().unwrap_or_default();
    if !new_userns {
        if uid.is_empty() && gid.is_empty() {
            return Ok(None);
        }
        return Err(Error::InvalidSpec(
            "linux.uidMappings/gidMappings are set but no new user namespace is \
             (linux.namespaces has no \"user\" entry without a path)"
                .into(),
        ));
    }
    Ok(Some(IdMaps {
        uid: map_text("linux.uidMappings", uid)?,
        gid: map_text("linux.gidMappings", gid)?,
    }))
}

fn map_text(what: &str, map: &[LinuxIdMapping]) -> Result<String, Error> {
    let bad = |why: String| Err(Error::InvalidSpec(format!("{what}: {why}")));
    if map.is_empty() {
        return bad("a new user namespace needs at least one mapping".into());
    }
    if map.len() > MAX_MAP_LINES {
        return bad(format!(
            "{} mappings, the kernel takes at most {MAX_MAP_LINES}",
            map.len()
        ));
    }
    let mut text = String::new();
    for m in map {
        let (c, h, n) = (m.container_id(), m.host_id(), m.size());
        let end = |start: u32| u64::from(start) + u64::from(n) > 1 << 32;
        if n == 0 || end(c) || end(h) {
            return bad(format!(
                "the mapping containerID {c} hostID {h} size {n} is empty or runs past 2^32"
            ));
        }
        text.push_str(&format!("{c} {h} {n}\n"));
    }
    if !map.iter().any(|m| m.container_id() == 0) {
        return bad(
            "it must map the container's id 0 (the container is set up as its root)".into(),
        );
    }
    Ok(text)
}

/// Moves the calling (single-threaded, forked) process into a new user
/// namespace with `maps` and makes it root there.
pub fn enter_new(maps: &IdMaps) -> Result<(), String> {
    let me = nix::unistd::getpid();
    let pipe = || super::process::pipe().map_err(|e| e.to_string());
    let (go_rd, go_wr) = pipe()?;
    let (err_rd, err_wr) = pipe()?;
    // SAFETY: this process is single-threaded (forked from the agent); the
    // child only writes two files and _exits.
    let writer = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop((go_wr, err_rd));
            write_maps_when_told(me, maps, go_rd, err_wr)
        }
        ForkResult::Parent { child } => child,
    };
    drop((go_rd, err_wr));
    let unshared = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("unshare the user namespace: {e}"));
    // Told to go on only once unshared; EOF (dropped) otherwise.
    if unshared.is_ok() {
        let _ = (&go_wr).write_all(b"G");
    }
    drop(go_wr);
    let mut why = String::new();
    let _ = (&err_rd).read_to_string(&mut why);
    let status = waitpid(writer, None);
    unshared?;
    match status {
        Ok(WaitStatus::Exited(_, 0)) if why.is_empty() => {}
        _ if !why.is_empty() => return Err(why),
        s => return Err(format!("writing the user namespace's maps failed ({s:?})")),
    }
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| format!("become root (gid 0) in the user namespace: {e}"))?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| format!("become root (uid 0) in the user namespace: {e}"))?;
    Ok(())
}

/// The map writer (a child in the guest's user namespace): waits for its
/// parent to unshare, writes the parent's gid and uid maps, reports a
/// failure as text; never returns.
fn write_maps_when_told(target: Pid, maps: &IdMaps, go: File, mut err: File) -> ! {
    let mut b = [0u8; 1];
    let code = if matches!((&go).read(&mut b), Ok(1)) {
        let r = [("gid_map", &maps.gid), ("uid_map", &maps.uid)]
            .into_iter()
            .try_for_each(|(file, text)| {
                std::fs::write(format!("/proc/{target}/{file}"), text).map_err(|e| {
                    format!(
                        "write the user namespace's {file} ({}): {e}",
                        one_line(text)
                    )
                })
            });
        match r {
            Ok(()) => 0,
            Err(msg) => {
                let _ = err.write_all(msg.as_bytes());
                1
            }
        }
    } else {
        1
    };
    // SAFETY: ends the forked child without running the agent's handlers.
    unsafe { libc::_exit(code) }
}

fn one_line(text: &str) -> String {
    text.trim_end().replace('\n', ", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(uid: serde_json::Value, gid: serde_json::Value) -> Linux {
        serde_json::from_value(serde_json::json!({"uidMappings": uid, "gidMappings": gid})).unwrap()
    }

    fn one(c: u32, h: u32, n: u32) -> serde_json::Value {
        serde_json::json!([{"containerID": c, "hostID": h, "size": n}])
    }

    #[test]
    fn a_new_user_namespace_takes_the_specs_maps_as_the_kernel_reads_them() {
        let l = serde_json::from_value::<Linux>(serde_json::json!({
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 1000},
                            {"containerID": 1000, "hostID": 1000, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}],
        }))
        .unwrap();
        assert_eq!(
            id_maps(&l, true).unwrap().unwrap(),
            IdMaps {
                uid: "0 100000 1000\n1000 1000 1\n".into(),
                gid: "0 200000 65536\n".into(),
            }
        );
    }

    #[test]
    fn maps_without_a_new_user_namespace_or_a_namespace_without_maps_are_refused() {
        assert_eq!(id_maps(&Linux::default(), false).unwrap(), None);
        let maps = linux(one(0, 1000, 10), one(0, 1000, 10));
        let e = id_maps(&maps, false).unwrap_err().to_string();
        assert!(e.contains("no new user namespace"), "{e}");
        let e = id_maps(&linux(one(0, 1000, 10), serde_json::json!([])), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux.gidMappings: a new user namespace needs"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_overflowing_rootless_or_oversized_map_is_refused_in_one_line() {
        let many: Vec<_> = (0..=MAX_MAP_LINES as u32)
            .map(|i| serde_json::json!({"containerID": i, "hostID": 1000 + i, "size": 1}))
            .collect();
        for (uid, want) in [
            (one(0, 1000, 0), "is empty or runs past 2^32"),
            (one(0, u32::MAX, 2), "is empty or runs past 2^32"),
            (one(u32::MAX, 0, 2), "is empty or runs past 2^32"),
            (one(1, 1000, 10), "must map the container's id 0"),
            (
                serde_json::json!(many),
                "341 mappings, the kernel takes at most 340",
            ),
        ] {
            let e = id_maps(&linux(uid.clone(), one(0, 0, 1)), true)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{uid}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // The whole 32-bit range, to the last id, is a valid map.
        assert!(id_maps(&linux(one(0, 0, u32::MAX), one(0, 0, u32::MAX)), true).is_ok());
    }
}

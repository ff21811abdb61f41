//! The Unix sockets of a sandbox live in its state directory
//! (`<dir>/vmm/vsock.sock`, `virtiofsd.sock`) and their paths must fit a
//! `sockaddr_un`. (A guest connecting to host port N reaches
//! `vsock.sock_N` only if the host listens there, which the runtime never
//! does: a path too long for it just fails that connection.) Callers choose long roots and ids
//! (Docker's runtime root with 64-digit ids, the CRI's pod ids), so a
//! state directory's name is shortened, with a hash, until they fit.

use std::path::{Path, PathBuf};

/// Bytes a socket path may have: `sun_path` less its NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// The longest socket path made for the sandbox whose state directory is
/// `dir`: virtiofsd's.
pub fn longest_socket(dir: &Path) -> PathBuf {
    crate::sandbox::virtiofsd_socket_in(dir)
}

/// Whether the sockets of a sandbox in `dir` fit.
pub fn fit(dir: &Path) -> bool {
    longest_socket(dir).as_os_str().len() <= MAX_SOCKET_PATH
}

/// The state directory of `name` under `root`: `root/name`, or with the
/// name shortened ([`short_name`]) as far as needed for the sockets to fit
/// (not below a hash alone: a root too long for even that is reported
/// when the sandbox starts, see [`fit`]).
pub fn state_dir(root: &Path, name: &str) -> PathBuf {
    let full = root.join(name);
    if fit(&full) {
        return full;
    }
    let used = longest_socket(&root.join("x")).as_os_str().len() - 1;
    let room = MAX_SOCKET_PATH.saturating_sub(used).max(HASH_ONLY);
    root.join(short_name(name, room))
}

/// The shortest [`short_name`]: `x`, a dash and 16 hex digits.
const HASH_ONLY: usize = 18;

/// `name` if it has at most `max` bytes, else its first characters, a dash
/// and a hash of the whole name (16 hex digits), `max` bytes in all (at
/// least 18: `x-` and the hash).
pub fn short_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    // FNV-1a: the same in every build, as the directory must be for
    // `delete` by another binary.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let keep = max.saturating_sub(HASH_ONLY - 1);
    let end = (0..=keep.min(name.len()))
        .rev()
        .find(|&i| name.is_char_boundary(i))
        .unwrap_or(0);
    let prefix = if end == 0 { "x" } else { &name[..end] };
    format!("{prefix}-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_shortened_with_a_hash() {
        assert_eq!(short_name("pod1", 32), "pod1");
        let id = "a".repeat(32);
        assert_eq!(short_name(&id, 32), id);
        let cri = "3f1c0e4b9d2a7c6e5f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6";
        let short = short_name(cri, 32);
        assert_eq!(short.len(), 32);
        assert!(short.starts_with("3f1c0e4b9d2a7c6-"), "{short}");
        assert_eq!(short, short_name(cri, 32), "stable");
        let other = format!("{}7", &cri[..63]);
        assert_ne!(
            short_name(&other, 32),
            short,
            "the hash covers the whole id"
        );
        assert!(short_name("é".repeat(20).as_str(), 24).len() <= 24);
        assert_eq!(short_name(cri, 3).len(), 18, "a hash at least");
    }

    #[test]
    fn a_state_dir_is_shortened_only_as_far_as_the_sockets_need() {
        let id = "968a0b6b2824a68f6f17874dd1e0e346970cc44aee20ba4beed2e42bc802b0f6";
        let short_root = Path::new("/run/sandboxvm");
        assert_eq!(state_dir(short_root, id), short_root.join(id));
        // Docker's runtime root for an added runtime.
        let docker = Path::new("/var/run/docker/runtime-sandboxvm/moby");
        let dir = state_dir(docker, id);
        assert!(fit(&dir), "{}", dir.display());
        assert_eq!(longest_socket(&dir).as_os_str().len(), MAX_SOCKET_PATH);
        assert!(dir.starts_with(docker));
        assert_ne!(state_dir(docker, &format!("{}7", &id[..63])), dir);
        // A root too long for any name: a hash, reported at start.
        let long = Path::new("/").join("r".repeat(100));
        assert!(!fit(&state_dir(&long, id)));
    }
}

//! Writes Linux initramfs archives in the "newc" cpio format.
//!
//! The kernel unpacks an uncompressed newc archive without any decompressor
//! configured, and the archive can hold device nodes, so a guest's initramfs
//! (with `/dev/console`) can be made by an unprivileged process.
//!
//! ```
//! let mut out = Vec::new();
//! let mut cpio = initramfs::Writer::new(&mut out);
//! cpio.dir("dev", 0o755).unwrap();
//! cpio.char_device("dev/console", 0o600, 5, 1).unwrap();
//! cpio.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
//! cpio.finish().unwrap();
//! assert!(out.starts_with(b"070701"));
//! ```

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Errors from writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the archive failed.
    #[error("cannot write the initramfs archive: {0}")]
    Io(#[from] io::Error),
    /// An entry's name is empty, absolute or walks up with `..`.
    #[error("invalid initramfs entry name {0:?}: names are relative, without '..'")]
    BadName(String),
    /// The same name was added twice.
    #[error("initramfs entry {0:?} added twice")]
    Duplicate(String),
    /// A host file to copy in could not be read.
    #[error("cannot read {path}: {source}")]
    HostFile {
        /// The host path.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The entry is larger than the format's 32-bit size field.
    #[error("initramfs entry {0:?} is larger than 4 GiB")]
    TooLarge(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const TRAILER: &str = "TRAILER!!!";

/// Streams entries into a newc archive. Call [`Writer::finish`] at the end.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    names: BTreeSet<String>,
}

impl<W: Write> Writer<W> {
    /// Starts an archive that writes to `out`.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            next_ino: 1,
            names: BTreeSet::new(),
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, 0, 0, b"")
    }

    /// Adds a regular file with the given content.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    /// Adds a symbolic link `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, major, minor, b"")
    }

    /// Copies a regular file from the host, keeping its permission bits.
    pub fn host_file(&mut self, name: &str, host_path: &Path) -> Result<()> {
        let err = |source| Error::HostFile {
            path: host_path.display().to_string(),
            source,
        };
        let data = std::fs::read(host_path).map_err(err)?;
        let perm = std::fs::metadata(host_path)
            .map_err(err)?
            .permissions()
            .mode();
        self.file(name, perm, &data)
    }

    /// Writes the trailer and pads the archive to a 512-byte boundary.
    /// Returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.header(TRAILER, 0, 1, 0, 0, 0)?;
        let pad = (512 - (self.written % 512)) % 512;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rmajor: u32,
        rminor: u32,
        data: &[u8],
    ) -> Result<()> {
        let name = name.trim_end_matches('/');
        if name.is_empty()
            || name.starts_with('/')
            || name.split('/').any(|c| c == ".." || c.is_empty())
            || name == TRAILER
        {
            return Err(Error::BadName(name.to_string()));
        }
        if !self.names.insert(name.to_string()) {
            return Err(Error::Duplicate(name.to_string()));
        }
        let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge(name.to_string()))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header_with_ino(name, ino, mode, nlink, size, rmajor, rminor)?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad4()
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        rmajor: u32,
        rminor: u32,
    ) -> Result<()> {
        self.header_with_ino(name, 0, mode, nlink, size, rmajor, rminor)
    }

    #[allow(clippy::too_many_arguments)]
    fn header_with_ino(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rmajor: u32,
        rminor: u32,
    ) -> Result<()> {
        let namesize = name.len() as u32 + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check.
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += header.len() as u64 + u64::from(namesize);
        self.pad4()
    }

    fn pad4(&mut self) -> Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        self.out.write_all(&[0u8; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader, to check what the writer produced.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        let total = buf.len();
        loop {
            let pos = total - buf.len();
            assert_eq!(pos % 4, 0, "entry not 4-aligned");
            assert_eq!(&buf[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..6 + (i + 1) * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name = String::from_utf8(buf[110..110 + namesize as usize - 1].to_vec()).unwrap();
            let data_start = (pos + 110 + namesize as usize).div_ceil(4) * 4 - pos;
            let data = buf[data_start..data_start + size as usize].to_vec();
            let next = (pos + data_start + size as usize).div_ceil(4) * 4 - pos;
            buf = &buf[next..];
            if name == TRAILER {
                return out;
            }
            out.push((name, mode, data, rmaj, rmin));
        }
    }

    #[test]
    fn writes_entries_the_kernel_can_read() {
        let mut w = Writer::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].0, "dev");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            (entries[1].1, entries[1].3, entries[1].4),
            (S_IFCHR | 0o600, 5, 1)
        );
        assert_eq!(entries[2].2, b"#!/bin/sh\n");
        assert_eq!(entries[3].1, S_IFLNK | 0o777);
        assert_eq!(entries[3].2, b"busybox");
    }

    #[test]
    fn rejects_bad_and_duplicate_names() {
        let mut w = Writer::new(Vec::new());
        for bad in ["", "/abs", "a/../b", "a//b", TRAILER] {
            assert!(
                matches!(w.file(bad, 0o644, b""), Err(Error::BadName(_))),
                "{bad:?}"
            );
        }
        w.file("x", 0o644, b"1").unwrap();
        assert!(matches!(w.file("x", 0o644, b"2"), Err(Error::Duplicate(_))));
    }

    #[test]
    fn host_file_keeps_mode_and_content() {
        let dir = std::env::temp_dir().join(format!("initramfs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tool");
        std::fs::write(&p, b"binary").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o751)).unwrap();
        let mut w = Writer::new(Vec::new());
        w.host_file("bin/tool", &p).unwrap();
        let missing = w.host_file("bin/none", &dir.join("none"));
        assert!(matches!(missing, Err(Error::HostFile { .. })));
        let entries = parse(&w.finish().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(entries[0].1, S_IFREG | 0o751);
        assert_eq!(entries[0].2, b"binary");
    }
}

//! The guest console's log file, bounded: the guest decides how much it
//! prints, the host's `/run` tmpfs is small and shared. The log rotates to
//! `<path>.1` (one generation) when it reaches its limit, so at most twice
//! the limit is on disk and the newest output (what a reader of the tail
//! wants) is always kept.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Default size at which the log rotates.
pub const DEFAULT_LIMIT: u64 = 2 << 20;

/// A console log that rotates at a size limit.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The previous generation of the log at `path`.
pub fn previous(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

impl RotatingFile {
    /// Creates (truncates) the log at `path`, rotating at `limit` bytes.
    pub fn create(path: &Path, limit: u64) -> io::Result<RotatingFile> {
        let file = open_new(path)?;
        let _ = std::fs::remove_file(previous(path));
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            written: 0,
            limit: limit.max(1),
        })
    }

    fn rotate(&mut self) {
        // Whatever fails, the log stays bounded: a failed rename leaves the
        // log to be truncated by the new open; a failed open (a full disk)
        // truncates the current file and goes on in it.
        let _ = std::fs::rename(&self.path, previous(&self.path));
        match open_new(&self.path) {
            Ok(f) => self.file = f,
            Err(_) => {
                use std::io::Seek;
                let _ = self.file.set_len(0);
                let _ = self.file.seek(io::SeekFrom::Start(0));
            }
        }
        self.written = 0;
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.limit {
            self.rotate();
        }
        // A single write larger than the limit is cut to it.
        let n = buf.len().min(self.limit as usize);
        self.file.write_all(&buf[..n])?;
        self.written += n as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_stays_within_twice_the_limit_and_keeps_the_newest_output() {
        let dir = std::env::temp_dir().join(format!("sandboxvm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut f = RotatingFile::create(&path, 4096).unwrap();
        for i in 0..100_000u32 {
            f.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(previous(&path)).unwrap();
        assert!(now.len() <= 4096 && before.len() <= 4096);
        assert!(now.ends_with("line 99999\n"), "{now}");
        // The two generations join without a gap.
        let joined = before + &now;
        let nums: Vec<u32> = joined
            .lines()
            .map(|l| l["line ".len()..].parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        // One write larger than the limit is cut, not refused.
        f.write_all(&vec![b'x'; 10_000]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        // A new log starts without the old generation.
        drop(f);
        RotatingFile::create(&path, 4096).unwrap();
        assert!(!previous(&path).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_in_place_of_the_log_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("sandboxvm-console-ln-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.join("console.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(RotatingFile::create(&path, 4096).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

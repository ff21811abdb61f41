//! `--console-socket`: the container's terminal is a host pty whose master
//! is handed to the caller over a Unix socket (SCM_RIGHTS), as runc does;
//! the runtime keeps the slave and relays it to the guest's terminal.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// openpty or a terminal setting failed.
    #[error("cannot allocate a terminal: {0}")]
    Pty(nix::Error),
    /// The console socket could not be reached.
    #[error("console socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Sending the master failed.
    #[error("cannot send the terminal to the console socket: {0}")]
    Send(nix::Error),
}

/// The host side of a container terminal: the slave end, in raw mode (the
/// guest's pty does the line discipline).
pub struct HostPty {
    /// The slave end.
    pub slave: File,
}

/// Opens a pty, sends its master to `socket` and returns the slave.
pub fn send_to_socket(socket: &Path) -> Result<HostPty, Error> {
    let pty = nix::pty::openpty(None, None).map_err(Error::Pty)?;
    let mut t = termios::tcgetattr(&pty.slave).map_err(Error::Pty)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &t).map_err(Error::Pty)?;
    let stream = UnixStream::connect(socket).map_err(|source| Error::Socket {
        path: socket.display().to_string(),
        source,
    })?;
    send_fd(&stream, &pty.master, "/dev/ptmx")?;
    Ok(HostPty {
        slave: File::from(pty.slave),
    })
}

fn send_fd(stream: &UnixStream, fd: &OwnedFd, name: &str) -> Result<(), Error> {
    let fds = [fd.as_raw_fd()];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(Error::Send)?;
    Ok(())
}

/// Makes `tty` the controlling terminal of this process (which must be a
/// session leader), so that resizes on the master arrive as SIGWINCH.
pub fn make_controlling(tty: &File) -> std::io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument and touches no memory.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of a terminal: (rows, cols).
pub fn size_of(tty: &File) -> Option<(u32, u32)> {
    // SAFETY: winsize is plain old data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the call.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then(|| (ws.ws_row.into(), ws.ws_col.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::io::{IoSliceMut, Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_arrives_over_the_socket_and_talks_to_the_slave() {
        let dir = std::env::temp_dir().join(format!("sandboxvm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let receiver = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .unwrap();
            let mut fd = None;
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    fd = fds.first().copied();
                }
            }
            // SAFETY: the fd was just received and is owned by nobody else.
            unsafe { File::from_raw_fd(fd.unwrap()) }
        });
        let pty = send_to_socket(&path).unwrap();
        let mut master = receiver.join().unwrap();
        master.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 6];
        (&pty.slave).read_exact(&mut buf).unwrap();
        // Raw mode: no echo, no CR/LF translation.
        assert_eq!(&buf, b"hello\n");
        let ws = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
        let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
        assert_eq!(size_of(&pty.slave), Some((24, 80)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Relaying a guest process's stdio to host files (pipes, FIFOs, a pty
//! slave or the caller's own stdio), one thread per stream.

use std::io::{Read, Write};
use std::thread::JoinHandle;

use crate::agent::Agent;

/// Copies the process's stdout (or stderr) into `sink` until EOF; returns
/// when the stream ends or `sink` fails.
pub fn pump_out(
    agent: Agent,
    id: &str,
    exec_id: &str,
    stderr: bool,
    mut sink: impl Write + Send + 'static,
) -> JoinHandle<()> {
    let (id, exec_id) = (id.to_string(), exec_id.to_string());
    std::thread::spawn(move || loop {
        let data = match agent.read_output(&id, &exec_id, stderr) {
            Ok(d) if !d.is_empty() => d,
            _ => return,
        };
        if sink.write_all(&data).and_then(|_| sink.flush()).is_err() {
            return;
        }
    })
}

/// Copies `source` to the process's stdin until EOF, then closes its stdin
/// (`close` false: leave it open, e.g. for a terminal whose host side was
/// hung up).
pub fn pump_in(
    agent: Agent,
    id: &str,
    exec_id: &str,
    mut source: impl Read + Send + 'static,
    close: bool,
) -> JoinHandle<()> {
    let (id, exec_id) = (id.to_string(), exec_id.to_string());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match source.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
                Ok(n) => {
                    if agent.write_stdin(&id, &exec_id, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        if close {
            let _ = agent.close_stdin(&id, &exec_id);
        }
    })
}

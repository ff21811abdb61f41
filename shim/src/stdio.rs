//! A process's stdio: the FIFOs (or files) containerd hands over, pumped
//! to and from the guest agent, one thread per stream (as Kata does).
//!
//! Output FIFOs are opened read-write, which never blocks and keeps a
//! reader so the pump never gets EPIPE when the client goes away (as the
//! runc shim does); each is closed as soon as its stream ends, so that the
//! client sees EOF. The stdin FIFO is opened for reading in its thread,
//! which waits for the client's writer; its EOF closes the process's stdin.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sandboxvm::agent::Agent;

/// The stdio paths of a process, as containerd gives them.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// stdin FIFO ("" = none).
    pub stdin: String,
    /// stdout FIFO or `file://` path ("" = none).
    pub stdout: String,
    /// stderr FIFO or `file://` path ("" = none; unused with a terminal).
    pub stderr: String,
    /// The process has a terminal (stdout carries both streams).
    pub terminal: bool,
}

type Sink = Arc<Mutex<Option<File>>>;

/// The running pumps of one process.
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
    sinks: Vec<Sink>,
    stdin: Option<PathBuf>,
}

fn open_output(path: &str) -> std::io::Result<File> {
    if let Some(file) = path.strip_prefix("file://") {
        if let Some(dir) = Path::new(file).parent() {
            std::fs::create_dir_all(dir)?;
        }
        return OpenOptions::new().create(true).append(true).open(file);
    }
    OpenOptions::new().read(true).write(true).open(path)
}

fn lock(s: &Sink) -> std::sync::MutexGuard<'_, Option<File>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// Starts pumping process `exec_id` ("" = init) of container `cid`.
    /// A path that cannot be opened is logged and left out.
    pub fn start(agent: &Agent, cid: &str, exec_id: &str, paths: &Paths) -> Relay {
        let mut relay = Relay {
            outputs: Vec::new(),
            sinks: Vec::new(),
            stdin: None,
        };
        let streams = [(&paths.stdout, false), (&paths.stderr, true)];
        for (path, stderr) in streams {
            if path.is_empty() || (stderr && paths.terminal) {
                continue;
            }
            let file = match open_output(path) {
                Ok(f) => f,
                Err(e) => {
                    log::warn!("{cid} {exec_id}: cannot open {path}: {e}");
                    continue;
                }
            };
            let sink: Sink = Arc::new(Mutex::new(Some(file)));
            relay.sinks.push(sink.clone());
            let (agent, cid, exec_id) = (agent.clone(), cid.to_string(), exec_id.to_string());
            relay.outputs.push(std::thread::spawn(move || {
                loop {
                    let data = match agent.read_output(&cid, &exec_id, stderr) {
                        Ok(d) if !d.is_empty() => d,
                        _ => break,
                    };
                    let mut sink = lock(&sink);
                    let Some(f) = sink.as_mut() else { break };
                    if f.write_all(&data).is_err() {
                        break;
                    }
                }
                lock(&sink).take();
            }));
        }
        if !paths.stdin.is_empty() {
            let path = PathBuf::from(&paths.stdin);
            relay.stdin = Some(path.clone());
            let (agent, cid, exec_id) = (agent.clone(), cid.to_string(), exec_id.to_string());
            std::thread::spawn(move || pump_stdin(&agent, &cid, &exec_id, &path));
        }
        relay
    }

    /// Waits up to `timeout` for the output streams to end (a process that
    /// left children holding them may never end them), then closes the
    /// host side anyway.
    pub fn finish(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.outputs.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in std::mem::take(&mut self.outputs) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        for s in &self.sinks {
            lock(s).take();
        }
    }

    /// Lets a stdin thread still waiting for the client's writer go (it
    /// then sees EOF).
    pub fn release_stdin(&mut self) {
        if let Some(path) = self.stdin.take() {
            // A reader blocked in open() counts: a non-blocking writer can
            // open, which wakes it; closing at once gives it EOF.
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
        }
    }
}

fn pump_stdin(agent: &Agent, cid: &str, exec_id: &str, path: &Path) {
    let mut fifo = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{cid} {exec_id}: cannot open stdin {}: {e}", path.display());
            return;
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match fifo.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
            Ok(n) => {
                if agent.write_stdin(cid, exec_id, &buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = agent.close_stdin(cid, exec_id);
}
